"""Benchmark: training and forecasting the model families on CPU vs CUDA (issue 5), same config.

Reads the demo cohort's model data (``make run`` writes results/inputs, results/targets and the
resolved results/config.yaml), trains every cross-subject family of each disorder on fold 0's
training subjects, then forecasts one held-out subject with every family, once per device. Prints
one JSON line per (device, disorder, family) and a summary; ``--out`` also writes a TSV.

    .venv/bin/python benchmarks/bench_training_device.py --results results --devices cpu
    python benchmarks/bench_training_device.py --results results --devices cpu,cuda --out timing.tsv

The forecasts of the two devices are compared (max absolute difference of every continuous output,
fraction of differing voxels of every mask), which is the "same results within tolerance" check:
float32 kernels differ in summation order, so a mask may flip voxels that sit at its threshold.
Each device pass loads the data afresh (no shared per-subject work carried over), as a workflow
job does; ``--warmup`` first runs one untimed pass so Numba's JIT compilation is not charged to
whichever device comes first.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from neurohybrid.disorders.base import SubjectData, TrainingPairs, get_disorder, inputs_path, target_path
from neurohybrid.registry import FAMILY_NAMES as FAMILIES, is_trained
from neurohybrid.hybrid.device import resolve_device, seed_everything
from neurohybrid.hybrid.splits import assign_folds, held_out_subjects, training_subjects


def cohort(results: Path) -> dict[str, list[str]]:
    by_disorder: dict[str, list[str]] = {}
    for sidecar in sorted((results / "inputs").glob("sub-*/sub-*_desc-modelinputs.json")):
        meta = json.loads(sidecar.read_text())
        by_disorder.setdefault(meta["disorder"], []).append(meta["subject"])
    return by_disorder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_disorder(name, subjects, results, config, device, families):
    disorder = get_disorder(name)
    folds = assign_folds(subjects, int(config["models"]["n_folds"]), int(config["seed"]))
    train_ids, test_id = training_subjects(folds, 0), held_out_subjects(folds, 0)[0]
    # loaded per pass: each pass pays its own per-subject work, like one workflow job
    pairs = TrainingPairs((SubjectData.load(inputs_path(results / "inputs", s)), SubjectData.load(target_path(results / "targets", s)))
                         for s in train_ids)
    test_inputs = SubjectData.load(inputs_path(results / "inputs", test_id))
    rows, outputs = [], {}
    for fam in families:
        family = disorder.family(fam, config, device)
        trained, train_s = None, 0.0
        if is_trained(fam, name):
            seed_everything(int(config["seed"]))
            sync(device)
            t0 = time.perf_counter()
            trained = family.train(pairs)
            sync(device)
            train_s = time.perf_counter() - t0
            trained["train_subjects"] = train_ids
        seed_everything(int(config["seed"]))
        t0 = time.perf_counter()
        forecast = family.forecast(test_inputs, trained)
        sync(device)
        forecast_s = time.perf_counter() - t0
        outputs[fam] = {k: np.asarray(v) for k, v in forecast.outputs.items()}
        row = dict(device=device.type, disorder=name, family=fam, train_subjects=len(train_ids), test_subject=test_id,
                   train_seconds=round(train_s, 2), forecast_seconds=round(forecast_s, 2))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="output_dir of a finished demo run")
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--disorders", default="glioma,alzheimer,stroke")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the demo's training jobs use 2)")
    parser.add_argument("--warmup", action="store_true", help="one untimed pass on the first device first")
    parser.add_argument("--out", help="TSV of the timings")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    results = Path(args.results)
    config = yaml.safe_load((results / "config.yaml").read_text())
    subjects = cohort(results)
    families = [f for f in args.families.split(",") if f]
    all_rows, forecasts = [], {}
    passes = [(d, True) for d in args.devices.split(",")]
    if args.warmup:
        passes.insert(0, (passes[0][0], False))
    for dev, timed in passes:
        device = resolve_device(dev)
        config = {**config, "device": dev}
        for name in args.disorders.split(","):
            rows, outs = run_disorder(name, subjects[name], results, config, device, families)
            if timed:
                all_rows += rows
                forecasts[(dev, name)] = outs
    devices = args.devices.split(",")
    if len(devices) == 2:  # the same forecasts on both devices, within float tolerance
        for name in args.disorders.split(","):
            a, b = forecasts[(devices[0], name)], forecasts[(devices[1], name)]
            for fam in families:
                for k in a[fam]:
                    x, y = a[fam][k], b[fam][k]
                    if x.dtype == bool:
                        check, value = "mask_fraction_differing", float(np.mean(x != y)) if x.size else 0.0
                    else:
                        check = "max_abs_diff"
                        value = float(np.max(np.abs(x.astype(np.float64) - y))) if x.size else 0.0
                    print(json.dumps(dict(check=check, disorder=name, family=fam, output=k, value=value)), flush=True)
        for name in args.disorders.split(","):
            t = {d: sum(r["train_seconds"] for r in all_rows if r["device"] == d and r["disorder"] == name) for d in devices}
            print(json.dumps(dict(summary="train_seconds", disorder=name, **t,
                                  speedup=round(t[devices[0]] / max(t[devices[1]], 1e-9), 2))), flush=True)
    if args.out:
        import pandas as pd

        pd.DataFrame(all_rows).to_csv(args.out, sep="\t", index=False)


if __name__ == "__main__":
    main()
