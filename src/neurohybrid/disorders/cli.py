"""`neurohybrid inputs | train | forecast`: the model stages the workflow calls per subject and fold."""

from __future__ import annotations

import time
from pathlib import Path

from neurohybrid.disorders import DISORDERS
from neurohybrid.errors import InputError


def _load_config(path) -> dict:
    import yaml

    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        raise InputError("config file not found", file=path)
    return yaml.safe_load(path.read_text()) or {}


def _device(config: dict):
    from neurohybrid.hybrid.device import resolve_device

    return resolve_device(config.get("device", "auto"))


def cmd_inputs(args) -> int:
    from neurohybrid.disorders.base import get_disorder, inputs_path, target_path

    disorder = get_disorder(args.disorder)
    config = _load_config(args.config)
    try:
        inputs, target = disorder.build_inputs(args.subject, Path(args.bids), Path(args.preproc), config)
    except InputError as exc:
        raise exc.with_context(subject=args.subject) from None
    inputs.save(inputs_path(args.inputs_out, args.subject))
    target.save(target_path(args.targets_out, args.subject))
    return 0


def _families(disorder, names: str, config: dict, device) -> list:
    """The families named in a comma-separated list, validated before any work starts."""
    names = [n for n in names.split(",") if n]
    if not names:
        raise InputError("no model family given")
    return [disorder.family(name, config, device) for name in names]


def checkpoint_path(models_dir, family: str) -> Path:
    return Path(models_dir) / f"model-{family}.pt"


def cmd_train(args) -> int:
    """Train the cross-subject component of each family on one fold's training subjects.

    One process for all families of a disorder x fold: the subjects' data are read once and the
    per-subject work the families share (e.g. mechanistic fits) is done once (``SharedWork``).
    """
    import torch

    from neurohybrid.disorders.base import SubjectData, TrainingPairs, get_disorder, inputs_path, target_path
    from neurohybrid.hybrid.device import seed_everything
    from neurohybrid.io.atomic import atomic_path

    config = _load_config(args.config)
    disorder = get_disorder(args.disorder)
    families = _families(disorder, args.family, config, _device(config))
    subjects = [s for s in args.subjects.split(",") if s]
    if not subjects:
        raise InputError("no training subjects given")
    # read once; the families share the work done on them (SubjectData.shared, TrainingPairs.shared)
    pairs = TrainingPairs(
        (SubjectData.load(inputs_path(args.inputs, s), subject=s), SubjectData.load(target_path(args.targets, s), subject=s))
        for s in subjects
    )
    for family in families:
        if not family.trains_across_subjects:
            raise InputError(f"family {family.name} has no cross-subject component to train")
        seed_everything(int(config.get("seed", 0)))  # each family's result independent of the list's order
        start = time.perf_counter()
        checkpoint = family.train(pairs)
        checkpoint = {
            "disorder": args.disorder,
            "family": family.name,
            "train_subjects": subjects,
            "train_seconds": time.perf_counter() - start,
            "config": config,
            **checkpoint,
        }
        with atomic_path(checkpoint_path(args.out_dir, family.name)) as tmp:
            torch.save(checkpoint, tmp)
        print(f"trained {args.disorder}/{family.name} on {len(subjects)} subjects in {checkpoint['train_seconds']:.1f} s", flush=True)
    return 0


def _trained(family, subject: str, models_dir) -> dict | None:
    """The family's fold checkpoint, refused when it was trained on the subject itself."""
    import torch

    if not family.trains_across_subjects:
        return None
    if not models_dir:
        raise InputError(f"family {family.name} needs --models-dir (models trained on the fold's other subjects)")
    path = checkpoint_path(models_dir, family.name)
    if not path.exists():
        raise InputError(f"no trained model for family {family.name}", file=path, subject=subject)
    trained = torch.load(path, map_location="cpu", weights_only=False)
    if subject in trained.get("train_subjects", []):
        # the split guarantee, checked where it matters
        raise InputError(f"{path} was trained on this subject: refusing to forecast with it", subject=subject)
    return trained


def cmd_forecast(args) -> int:
    """Fit the subject and forecast its held-out session with each family, in one process."""
    from neurohybrid.disorders.base import SubjectData, get_disorder, inputs_path
    from neurohybrid.hybrid.device import seed_everything
    from neurohybrid.io.atomic import write_json

    config = _load_config(args.config)
    disorder = get_disorder(args.disorder)
    families = _families(disorder, args.family, config, _device(config))
    inputs = SubjectData.load(inputs_path(args.inputs, args.subject), subject=args.subject)
    checkpoints = [_trained(family, args.subject, args.models_dir) for family in families]
    out_dir = Path(args.out_dir)
    for family, trained in zip(families, checkpoints):
        seed_everything(int(config.get("seed", 0)))
        try:
            forecast = family.forecast(inputs, trained)
        except InputError as exc:
            raise exc.with_context(subject=args.subject) from None
        disorder.write_forecast(forecast, inputs, family.name, out_dir)
        write_json(
            out_dir / f"sub-{args.subject}_model-{family.name}_desc-fit.json",
            {
                "subject": args.subject,
                "disorder": args.disorder,
                "model": family.name,
                "parameters": forecast.parameters,
                "fit_seconds": forecast.fit_seconds,
                "inference_seconds": forecast.inference_seconds,
                "trained_on": trained.get("train_subjects") if trained else None,
                **forecast.extra,
            },
        )
        print(f"forecast sub-{args.subject} {family.name}: fit {forecast.fit_seconds:.1f} s", flush=True)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("inputs", help="build a subject's model inputs and held-out target")
    p.add_argument("--disorder", required=True, choices=DISORDERS)
    p.add_argument("--subject", required=True, help="subject label without 'sub-'")
    p.add_argument("--bids", required=True, help="raw BIDS root")
    p.add_argument("--preproc", required=True, help="preprocessing derivatives root")
    p.add_argument("--config", help="resolved workflow config (YAML)")
    p.add_argument("--inputs-out", required=True)
    p.add_argument("--targets-out", required=True)
    p.set_defaults(func=cmd_inputs)

    p = subparsers.add_parser("train", help="train families' cross-subject components on a fold's training subjects")
    p.add_argument("--disorder", required=True, choices=DISORDERS)
    p.add_argument("--family", required=True, help="comma-separated model families, e.g. residual,ude")
    p.add_argument("--subjects", required=True, help="comma-separated training subjects")
    p.add_argument("--inputs", required=True, help="model inputs root (results/inputs)")
    p.add_argument("--targets", required=True, help="targets root (results/targets)")
    p.add_argument("--config", help="resolved workflow config (YAML)")
    p.add_argument("--out-dir", required=True, help="folder of the fold's checkpoints (model-<family>.pt)")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("forecast", help="fit a subject and forecast its held-out session with each family")
    p.add_argument("--disorder", required=True, choices=DISORDERS)
    p.add_argument("--family", required=True, help="comma-separated model families")
    p.add_argument("--subject", required=True)
    p.add_argument("--inputs", required=True, help="model inputs root (results/inputs)")
    p.add_argument("--models-dir", help="the subject's fold checkpoints from `neurohybrid train` (families with a cross-subject component)")
    p.add_argument("--config", help="resolved workflow config (YAML)")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_forecast)
