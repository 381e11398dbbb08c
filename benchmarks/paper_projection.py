"""Project a configuration's wall time on C cores or on a Slurm cluster from measured job costs.

The DAG is the workflow's own (``snakemake -n`` for each job's rule, wildcards and threads;
``snakemake --dag`` for the edges; the two share job ids). Each job's duration comes from a cost
model fitted to snakemake's ``benchmark:`` files of a measured run (``<out>/benchmarks``):

- per-subject rules: the mean CPU time (``cpu_time``; the wall time ``s`` where it is missing) of
  that rule for subjects of the same disorder. CPU time, not wall time: every job runs one thread,
  and the measured run may have shared its cores with other work;
- ``train_model``: either from the measured run's benchmark files, linear in the number of
  training subjects (``a + b * n_train``, least squares per disorder over the measured folds), or,
  with ``--train-costs E=FILE ...`` (``benchmarks/model_costs.py --full --json`` rows measured at
  ``epochs: E``), ``a + n_train * (b + c * E)`` fitted per disorder over folds and epoch budgets,
  evaluated at each disorder's epochs in the projected configuration (or ``--epochs``; families
  with their own epoch budget land in ``a`` and ``b``);
  ``forecast`` then also comes from those rows (the sum over families per subject);
- ``synth_cohort``: the measured CPU time per generated subject times the number of subjects,
  divided over the job's threads;
- any other rule: its measured wall time (the cohort-level rules), else 0.

The schedule is a list scheduler: whenever cores are free, the ready job with the longest
remaining critical path starts (snakemake's own scheduler also favours jobs that unblock work).
On Slurm, every job additionally waits ``--slurm-latency`` seconds (submission, queueing,
start-up) and a job runs on one node of ``--cores-per-node`` cores.

Usage:

    python benchmarks/paper_projection.py --measured results_slice --configfile config/paper.yaml \
        --cores 64 [--nodes 4 --cores-per-node 32 --slurm-latency 30] \
        [--train-costs 2=costs_e2.json 4=costs_e4.json]

Validation: ``--measured results --configfile config/config.yaml --cores 2`` projects the demo
from its own job costs; compare with the measured ``make run`` wall time (README).
"""

from __future__ import annotations

import argparse
import heapq
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

PER_SUBJECT = ("preprocess_align", "preprocess_anat", "preprocess_lesions", "preprocess_pet", "preprocess_connectome",
               "preprocess_regional", "model_inputs", "forecast", "evaluate", "plan")


def dry_run_jobs(configfile: str) -> dict[int, dict]:
    """jobid -> {rule, wildcards, threads} from ``snakemake -n`` (one cheap DAG build)."""
    out = subprocess.run(["snakemake", "-n", "--configfile", configfile, "--forceall"],
                         capture_output=True, text=True, check=True).stdout
    jobs, current = {}, None
    for line in out.splitlines():
        s = line.strip()
        if m := re.match(r"^(?:localrule|rule) (\w+):$", s):
            current = {"rule": m.group(1), "wildcards": {}, "threads": 1}
        elif current is None:
            continue
        elif s.startswith("wildcards:"):
            current["wildcards"] = dict(kv.split("=", 1) for kv in s[len("wildcards:"):].strip().split(", "))
        elif s.startswith("threads:"):
            current["threads"] = int(s.split()[1])
        elif s.startswith("jobid:"):
            jobs[int(s.split()[1])] = current
    return jobs


def dag_edges(configfile: str) -> list[tuple[int, int]]:
    out = subprocess.run(["snakemake", "--dag", "--configfile", configfile, "--forceall"],
                         capture_output=True, text=True, check=True).stdout
    return [(int(a), int(b)) for a, b in re.findall(r"^\s*(\d+) -> (\d+)", out, flags=re.M)]


def _bench(path: Path) -> pd.Series:
    return pd.read_csv(path, sep="\t").iloc[-1]


def _cpu(row: pd.Series) -> float:
    cpu = float(row.get("cpu_time", np.nan))
    return cpu if np.isfinite(cpu) and cpu > 0 else float(row["s"])


def disorder_of_subject(subject: str) -> str:
    return "glioma" if subject.startswith("glioma") else "alzheimer" if subject.startswith("ad") else "stroke"


def fit_costs(measured: Path, also: Path | None = None) -> dict:
    """Cost model from a measured run's benchmark files and its resolved config; per-subject rules
    the run lacks (a slice measured ``--until model_inputs`` has no plan jobs) from ``also``."""
    import yaml

    bench = measured / "benchmarks"
    costs: dict = {"per_subject": {}, "train": {}, "other": {}}
    fallback = None  # ``also``'s cost model, fitted once when first needed
    for rule in PER_SUBJECT:
        rows = defaultdict(list)
        for f in sorted((bench / rule).glob("sub-*.tsv")):
            rows[disorder_of_subject(f.stem[len("sub-"):])].append(_cpu(_bench(f)))
        costs["per_subject"][rule] = {d: float(np.mean(v)) for d, v in rows.items()}
        if not rows and also is not None:
            fallback = fallback or fit_costs(also)
            if fallback["per_subject"][rule]:
                costs["per_subject"][rule] = fallback["per_subject"][rule]
                costs.setdefault("per_subject_from_also", []).append(rule)
    config = yaml.safe_load((measured / "config.yaml").read_text())
    n_train = _training_sizes(measured, config)
    for f in sorted((bench / "train_model").glob("*_fold-*.tsv")):
        disorder, fold = f.stem.split("_fold-")
        costs["train"].setdefault(disorder, []).append((n_train[disorder][int(fold)], _cpu(_bench(f))))
    synth = _bench(bench / "synth_cohort.tsv")
    n_subjects = sum(len(v) for v in _subjects_by_disorder(measured).values())
    costs["synth_cpu_per_subject"] = float(synth["cpu_time"]) / n_subjects
    for f in bench.glob("*.tsv"):
        if f.stem != "synth_cohort":
            costs["other"][f.stem] = float(_bench(f)["s"])
    return costs


def model_costs(files: dict[float, Path]) -> tuple[dict, dict]:
    """Per-disorder train model coefficients (a, b, c) and mean forecast cost per subject, from
    benchmarks/model_costs.py rows measured at several epoch budgets."""
    train, forecast = defaultdict(list), defaultdict(list)
    for epochs, path in files.items():
        rows = pd.DataFrame(json.loads(Path(path).read_text()))
        for (disorder, _fold), g in rows[rows.stage == "train"].groupby(["disorder", "fold"]):
            train[disorder].append((len(g.subjects.iloc[0].split(",")), epochs, g.cpu_s.sum()))
        for (disorder, _subject), g in rows[rows.stage == "forecast"].groupby(["disorder", "subjects"]):
            forecast[disorder].append(g.cpu_s.sum())
    coef = {}
    for disorder, pts in train.items():
        n, e, t = (np.array(v, float) for v in zip(*pts))
        design = np.column_stack([np.ones_like(n), n, n * e])
        coef[disorder] = np.linalg.lstsq(design, t, rcond=None)[0].clip(min=0).tolist()
    return coef, {d: float(np.mean(v)) for d, v in forecast.items()}


def _subjects_by_disorder(measured: Path) -> dict[str, list[str]]:
    out = defaultdict(list)
    for d in sorted((measured / "inputs").glob("sub-*")):
        subject = d.name[len("sub-"):]
        out[disorder_of_subject(subject)].append(subject)
    return out


def _training_sizes(measured: Path, config: dict) -> dict[str, dict[int, int]]:
    from neurohybrid.hybrid.splits import assign_folds

    sizes = {}
    for disorder, subjects in _subjects_by_disorder(measured).items():
        folds = assign_folds(subjects, int(config["models"]["n_folds"]), int(config.get("seed", 0)))
        held = defaultdict(int)
        for s in subjects:
            held[folds[s]] += 1
        sizes[disorder] = {f: len(subjects) - held[f] for f in held}
    return sizes


def train_cost(points: list[tuple[int, float]], n: int) -> float:
    x = np.array([p[0] for p in points], float)
    y = np.array([p[1] for p in points], float)
    if len(set(x)) < 2:
        return float(y.mean() / x.mean() * n)
    b, a = np.polyfit(x, y, 1)
    return float(max(a, 0.0) + max(b, 0.0) * n)


def disorder_epochs(config: dict, disorders) -> dict[str, float]:
    """Each disorder's training epochs in a merged configuration: its own section's ``epochs``, else
    ``models.epochs`` (how neurohybrid.disorders reads them)."""
    return {d: float((config.get(d) or {}).get("epochs", config["models"]["epochs"])) for d in disorders}


def durations(jobs: dict[int, dict], costs: dict, *, n_train: dict,
              epochs: float | dict[str, float] | None = None) -> dict[int, float]:
    """Seconds per job; ``epochs`` is one budget for every disorder or one per disorder."""
    n_subjects = sum(1 for j in jobs.values() if j["rule"] == "model_inputs")
    out = {}
    for jid, job in jobs.items():
        rule, wc = job["rule"], job["wildcards"]
        if rule == "forecast" and "forecast" in costs:
            out[jid] = costs["forecast"][disorder_of_subject(wc["subject"])]
        elif rule in PER_SUBJECT:
            out[jid] = costs["per_subject"].get(rule, {}).get(disorder_of_subject(wc["subject"]), 0.0)
        elif rule == "train_model" and "train_coef" in costs:
            a, b, c = costs["train_coef"][wc["disorder"]]
            n = n_train[wc["disorder"]][int(wc["fold"])]
            e = epochs[wc["disorder"]] if isinstance(epochs, dict) else epochs
            out[jid] = a + n * (b + c * e)
        elif rule == "train_model":
            out[jid] = train_cost(costs["train"][wc["disorder"]], n_train[wc["disorder"]][int(wc["fold"])])
        elif rule == "synth_cohort":
            out[jid] = costs["synth_cpu_per_subject"] * n_subjects / job["threads"]
        else:
            out[jid] = costs["other"].get(rule, 0.0)
    return out


def schedule(jobs, edges, dur, *, cores: int, latency: float = 0.0, cores_per_node: int | None = None) -> float:
    """Makespan of a longest-remaining-path list schedule on `cores` (optionally in nodes)."""
    succ, npred = defaultdict(list), defaultdict(int)
    for a, b in edges:
        succ[a].append(b)
        npred[b] += 1
    rank: dict[int, float] = {}
    for jid in _topological(jobs, succ, npred)[::-1]:
        rank[jid] = dur[jid] + latency + max((rank[s] for s in succ[jid]), default=0.0)
    nodes = [cores_per_node] * (cores // cores_per_node) if cores_per_node else [cores]
    ready = [(-rank[j], j) for j in jobs if npred[j] == 0]
    heapq.heapify(ready)
    running: list[tuple[float, int, int, int]] = []  # (end, job, node, cores held)
    left = dict(npred)
    t = 0.0
    while ready or running:
        waiting = []
        while ready:
            r, j = heapq.heappop(ready)
            need = min(jobs[j]["threads"], cores_per_node or cores)
            node = next((i for i, free in enumerate(nodes) if free >= need), None)
            if node is None:
                waiting.append((r, j))
                continue
            nodes[node] -= need
            heapq.heappush(running, (t + latency + dur[j], j, node, need))
        for item in waiting:
            heapq.heappush(ready, item)
        t, j, node, need = heapq.heappop(running)
        nodes[node] += need
        for s in succ[j]:
            left[s] -= 1
            if left[s] == 0:
                heapq.heappush(ready, (-rank[s], s))
    return t


def _topological(jobs, succ, npred):
    left = {j: npred[j] for j in jobs}
    order, stack = [], [j for j in jobs if left[j] == 0]
    while stack:
        j = stack.pop()
        order.append(j)
        for s in succ[j]:
            left[s] -= 1
            if left[s] == 0:
                stack.append(s)
    return order


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measured", required=True, help="output folder of the measured run")
    p.add_argument("--configfile", required=True, help="the configuration to project")
    p.add_argument("--cores", type=int, nargs="+", default=[64])
    p.add_argument("--nodes", type=int, nargs="*", default=[], help="Slurm node counts to project")
    p.add_argument("--cores-per-node", type=int, default=32)
    p.add_argument("--slurm-latency", type=float, default=30.0, help="seconds per job (submit, queue, start)")
    p.add_argument("--train-costs", nargs="*", default=[], metavar="E=FILE",
                   help="benchmarks/model_costs.py --json rows measured at epochs E")
    p.add_argument("--epochs", type=float, default=None,
                   help="one epoch budget for every disorder (default: each disorder's, from --configfile)")
    p.add_argument("--also-measured", default=None,
                   help="another measured run for the per-subject rules the first one lacks (e.g. plan)")
    args = p.parse_args(argv)

    import yaml

    from neurohybrid.hybrid.splits import assign_folds

    costs = fit_costs(Path(args.measured), Path(args.also_measured) if args.also_measured else None)
    if args.train_costs:
        files = {float(e): Path(f) for e, f in (item.split("=", 1) for item in args.train_costs)}
        costs["train_coef"], costs["forecast"] = model_costs(files)
    jobs, edges = dry_run_jobs(args.configfile), dag_edges(args.configfile)
    merged = yaml.safe_load(Path("config/config.yaml").read_text())
    for key, value in (yaml.safe_load(Path(args.configfile).read_text()) or {}).items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    by_disorder = defaultdict(list)
    for job in jobs.values():
        if job["rule"] == "model_inputs":
            by_disorder[disorder_of_subject(job["wildcards"]["subject"])].append(job["wildcards"]["subject"])
    n_train = {}
    for disorder, subjects in by_disorder.items():
        folds = assign_folds(sorted(subjects), int(merged["models"]["n_folds"]), int(merged.get("seed", 0)))
        n_train[disorder] = {f: sum(1 for s in subjects if folds[s] != f) for f in set(folds.values())}
    epochs = args.epochs if args.epochs is not None else disorder_epochs(merged, n_train)
    dur = durations(jobs, costs, n_train=n_train, epochs=epochs)
    # rules whose jobs got no measured cost (they count as 0 s: the projection is then a lower bound)
    unmeasured = sorted({jobs[j]["rule"] for j, d in dur.items() if d == 0.0 and jobs[j]["rule"] != "all"})
    rule_totals = defaultdict(float)
    for jid, d in dur.items():
        rule_totals[jobs[jid]["rule"]] += d * jobs[jid]["threads"]
    result = {
        "configfile": args.configfile, "measured": args.measured, "epochs": epochs,
        "jobs": len(jobs), "core_seconds_by_rule": {k: round(v) for k, v in sorted(rule_totals.items())},
        "core_seconds_total": round(sum(rule_totals.values())),
        "critical_path_s": round(schedule(jobs, edges, dur, cores=10**6)),
        "makespan_s": {str(c): round(schedule(jobs, edges, dur, cores=c)) for c in args.cores},
        "slurm_makespan_s": {
            str(n): round(schedule(jobs, edges, dur, cores=n * args.cores_per_node,
                                   latency=args.slurm_latency, cores_per_node=args.cores_per_node))
            for n in args.nodes},
        "slurm": {"cores_per_node": args.cores_per_node, "latency_s": args.slurm_latency},
        "train_points": costs["train"], "train_coef_a_b_c": costs.get("train_coef"),
        "forecast_cpu_s_per_subject": costs.get("forecast"),
        "per_subject_rules_from_also_measured": costs.get("per_subject_from_also", []),
        "rules_without_cost": unmeasured,
    }
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
