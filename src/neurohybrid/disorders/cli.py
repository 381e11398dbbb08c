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


def cmd_train(args) -> int:
    import torch

    from neurohybrid.disorders.base import SubjectData, get_disorder, inputs_path, target_path
    from neurohybrid.hybrid.device import seed_everything
    from neurohybrid.io.atomic import atomic_path

    config = _load_config(args.config)
    disorder = get_disorder(args.disorder)
    family = disorder.family(args.family, config, _device(config))
    subjects = [s for s in args.subjects.split(",") if s]
    if not subjects:
        raise InputError("no training subjects given")
    pairs = [
        (SubjectData.load(inputs_path(args.inputs, s), subject=s), SubjectData.load(target_path(args.targets, s), subject=s))
        for s in subjects
    ]
    seed_everything(int(config.get("seed", 0)))
    start = time.perf_counter()
    checkpoint = family.train(pairs)
    checkpoint = {
        "disorder": args.disorder,
        "family": args.family,
        "train_subjects": subjects,
        "train_seconds": time.perf_counter() - start,
        "config": config,
        **checkpoint,
    }
    with atomic_path(args.out) as tmp:
        torch.save(checkpoint, tmp)
    return 0


def cmd_forecast(args) -> int:
    import torch

    from neurohybrid.disorders.base import SubjectData, get_disorder, inputs_path
    from neurohybrid.hybrid.device import seed_everything
    from neurohybrid.io.atomic import write_json

    config = _load_config(args.config)
    disorder = get_disorder(args.disorder)
    family = disorder.family(args.family, config, _device(config))
    inputs = SubjectData.load(inputs_path(args.inputs, args.subject), subject=args.subject)
    trained = None
    if family.trains_across_subjects:
        if not args.trained:
            raise InputError(f"family {args.family} needs --trained (a model trained on the fold's other subjects)")
        trained = torch.load(args.trained, map_location="cpu", weights_only=False)
        if args.subject in trained.get("train_subjects", []):
            # the split guarantee, checked where it matters
            raise InputError(f"{args.trained} was trained on this subject: refusing to forecast with it", subject=args.subject)
    seed_everything(int(config.get("seed", 0)))
    try:
        forecast = family.forecast(inputs, trained)
    except InputError as exc:
        raise exc.with_context(subject=args.subject) from None
    out_dir = Path(args.out_dir)
    disorder.write_forecast(forecast, inputs, args.family, out_dir)
    write_json(
        out_dir / f"sub-{args.subject}_model-{args.family}_desc-fit.json",
        {
            "subject": args.subject,
            "disorder": args.disorder,
            "model": args.family,
            "parameters": forecast.parameters,
            "fit_seconds": forecast.fit_seconds,
            "inference_seconds": forecast.inference_seconds,
            "trained_on": trained.get("train_subjects") if trained else None,
            **forecast.extra,
        },
    )
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

    p = subparsers.add_parser("train", help="train a family's cross-subject component on a fold's training subjects")
    p.add_argument("--disorder", required=True, choices=DISORDERS)
    p.add_argument("--family", required=True)
    p.add_argument("--subjects", required=True, help="comma-separated training subjects")
    p.add_argument("--inputs", required=True, help="model inputs root (results/inputs)")
    p.add_argument("--targets", required=True, help="targets root (results/targets)")
    p.add_argument("--config", help="resolved workflow config (YAML)")
    p.add_argument("--out", required=True, help="checkpoint path (.pt)")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("forecast", help="fit a subject and forecast its held-out session")
    p.add_argument("--disorder", required=True, choices=DISORDERS)
    p.add_argument("--family", required=True)
    p.add_argument("--subject", required=True)
    p.add_argument("--inputs", required=True, help="model inputs root (results/inputs)")
    p.add_argument("--trained", help="checkpoint from `neurohybrid train` (families with a cross-subject component)")
    p.add_argument("--config", help="resolved workflow config (YAML)")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_forecast)
