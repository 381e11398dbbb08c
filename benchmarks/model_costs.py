"""CPU cost of model training and forecasting per disorder x family, in one process, one thread.

For each disorder: train every trained family on one fold's training subjects, then forecast one
held-out subject of that fold with every family, the way the workflow's grouped jobs do it (one
process per disorder x fold for training, one per subject for forecasting, same config, same
SubjectData objects). Prints a table of CPU seconds (process time) and wall seconds per family.

``--isolated`` loads the data afresh for every family (no ``SharedWork`` shared between them),
i.e. what one-process-per-family jobs would pay. ``--full`` runs the whole demo's model stage:
every fold's training and every subject's forecasts (with its fold's models), the data loaded
afresh where the workflow starts a new process; it prints per-disorder totals.

Numba compiles its kernels into an on-disk cache on first use: run once before measuring.

Usage (from the repository root, demo model data already built):

    python benchmarks/model_costs.py --results results --config results/config.yaml [--fold 0]
        [--disorders stroke,glioma] [--families sol,ude] [--isolated] [--train-only] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _clock():
    return time.process_time(), time.perf_counter()


def _since(start):
    cpu, wall = _clock()
    return cpu - start[0], wall - start[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="results", help="folder with inputs/ and targets/")
    p.add_argument("--config", default=None, help="resolved workflow config (default <results>/config.yaml)")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--disorders", default="glioma,alzheimer,stroke")
    p.add_argument("--families", default="", help="comma-separated subset (default: the config's families)")
    p.add_argument("--isolated", action="store_true", help="no work shared between families (fresh data per family)")
    p.add_argument("--full", action="store_true", help="every fold and every subject (the demo's whole model stage)")
    p.add_argument("--train-only", action="store_true",
                   help="training only (a second epoch budget: forecast costs do not depend on it)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)

    import torch
    import yaml

    torch.set_num_threads(1)
    from neurohybrid.disorders.base import SubjectData, TrainingPairs, get_disorder, inputs_path, target_path
    from neurohybrid.hybrid.device import seed_everything
    from neurohybrid.hybrid.splits import assign_folds, held_out_subjects, training_subjects

    results = Path(args.results)
    config = yaml.safe_load(Path(args.config or results / "config.yaml").read_text()) or {}
    config["device"] = "cpu"
    families = [f for f in args.families.split(",") if f] or list(config["models"]["families"])
    seed = int(config.get("seed", 0))
    subjects_of: dict[str, list[str]] = {}
    for d in sorted(results.glob("inputs/sub-*")):
        meta = json.loads(next(d.glob("*_desc-modelinputs.json")).read_text())
        subjects_of.setdefault(meta["disorder"], []).append(meta["subject"])

    def load(subject):
        return SubjectData.load(inputs_path(results / "inputs", subject))

    rows = []
    for name in [d for d in args.disorders.split(",") if d]:
        disorder = get_disorder(name)
        folds = assign_folds(subjects_of[name], int(config["models"]["n_folds"]), seed)
        # imports (torch, numba caches, scipy) are not a family's cost: load them once
        disorder.family("persistence", config, "cpu").forecast(load(subjects_of[name][0]), None)
        for fold in sorted(set(folds.values())) if args.full else [args.fold]:
            train_subj = training_subjects(folds, fold)
            test_subjects = [] if args.train_only else held_out_subjects(folds, fold)
            if not args.full:
                test_subjects = test_subjects[:1]
            def load_pairs(train_subj=train_subj):
                # one training process per disorder x fold: its families share the work on these pairs
                return TrainingPairs((load(s), SubjectData.load(target_path(results / "targets", s))) for s in train_subj)

            pairs = load_pairs()
            trained = {}
            for fam in families:
                family = disorder.family(fam, config, "cpu")
                if not family.trains_across_subjects:
                    continue
                if args.isolated:
                    pairs = load_pairs()
                seed_everything(seed)
                start = _clock()
                trained[fam] = family.train(pairs)
                cpu, wall = _since(start)
                rows.append(dict(disorder=name, family=fam, stage="train", fold=fold, subjects=",".join(train_subj),
                                 cpu_s=cpu, wall_s=wall))
                print(f"{name:10s} {fam:19s} train    fold {fold} cpu {cpu:7.2f} s  wall {wall:7.2f} s", file=sys.stderr,
                      flush=True)
            for test_subj in test_subjects:
                inputs = load(test_subj)  # one forecast process per subject: its families share this
                for fam in families:
                    family = disorder.family(fam, config, "cpu")
                    if args.isolated:
                        inputs = load(test_subj)
                    seed_everything(seed)
                    start = _clock()
                    family.forecast(inputs, trained.get(fam))
                    cpu, wall = _since(start)
                    rows.append(dict(disorder=name, family=fam, stage="forecast", fold=fold, subjects=test_subj, cpu_s=cpu,
                                     wall_s=wall))
                    print(f"{name:10s} {fam:19s} forecast {test_subj} cpu {cpu:7.2f} s  wall {wall:7.2f} s",
                          file=sys.stderr, flush=True)

    print(f"\n{'disorder':10s} {'family':19s} {'train cpu s':>11s} {'forecast cpu s':>14s}"
          + ("   (sums over folds / subjects)" if args.full else ""))
    totals = {"train": 0.0, "forecast": 0.0}
    for name in dict.fromkeys(r["disorder"] for r in rows):
        for fam in families:
            got: dict[str, float] = {}
            for r in rows:
                if r["disorder"] == name and r["family"] == fam:
                    got[r["stage"]] = got.get(r["stage"], 0.0) + r["cpu_s"]
            for k, v in got.items():
                totals[k] += v
            tr = f"{got['train']:11.2f}" if "train" in got else f"{'-':>11s}"
            print(f"{name:10s} {fam:19s} {tr} {got.get('forecast', float('nan')):14.2f}")
    print(f"{'total':30s} {totals['train']:11.2f} {totals['forecast']:14.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
