"""The runtime projection of benchmarks/paper_projection.py: its list schedule and cost fit."""

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "paper_projection", Path(__file__).parents[2] / "benchmarks" / "paper_projection.py")
projection = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(projection)


def _jobs(threads):
    return {j: {"rule": f"r{j}", "wildcards": {}, "threads": t} for j, t in threads.items()}


def test_schedule_of_a_fan_out_and_join():
    # 0 -> {1, 2, 3} -> 4: on 3 cores the middle jobs run side by side, on 1 core one after another
    jobs = _jobs({0: 1, 1: 1, 2: 1, 3: 1, 4: 1})
    edges = [(0, 1), (0, 2), (0, 3), (1, 4), (2, 4), (3, 4)]
    dur = {0: 1.0, 1: 5.0, 2: 3.0, 3: 2.0, 4: 1.0}
    assert projection.schedule(jobs, edges, dur, cores=3) == pytest.approx(7.0)
    assert projection.schedule(jobs, edges, dur, cores=1) == pytest.approx(12.0)
    # two cores: the longest job first (5), the others (3 then 2) beside it
    assert projection.schedule(jobs, edges, dur, cores=2) == pytest.approx(7.0)
    # a per-job latency adds up along the critical path
    assert projection.schedule(jobs, edges, dur, cores=3, latency=10.0) == pytest.approx(37.0)


def test_schedule_respects_threads_and_nodes():
    jobs = _jobs({0: 2, 1: 2, 2: 2})
    dur = {0: 4.0, 1: 4.0, 2: 4.0}
    assert projection.schedule(jobs, [], dur, cores=4) == pytest.approx(8.0)
    assert projection.schedule(jobs, [], dur, cores=6) == pytest.approx(4.0)
    # two nodes of 3 cores: one 2-thread job per node at a time
    assert projection.schedule(jobs, [], dur, cores=6, cores_per_node=3) == pytest.approx(8.0)


def test_train_cost_model_recovers_its_coefficients(tmp_path):
    a, b, c = 20.0, 3.0, 0.5
    files = {}
    for epochs in (2, 4):
        rows = []
        for fold, subjects in enumerate(["s1", "s1,s2,s3"]):
            n = len(subjects.split(","))
            # two families whose costs add up to the job's
            total = a + n * (b + c * epochs)
            rows += [dict(disorder="glioma", family=f, stage="train", fold=fold, subjects=subjects,
                          cpu_s=total * share, wall_s=0.0) for f, share in (("x", 0.25), ("y", 0.75))]
        rows.append(dict(disorder="glioma", family="x", stage="forecast", fold=0, subjects="s9",
                         cpu_s=float(epochs), wall_s=0.0))
        files[epochs] = tmp_path / f"e{epochs}.json"
        files[epochs].write_text(json.dumps(rows))
    coef, forecast = projection.model_costs(files)
    assert coef["glioma"] == pytest.approx([a, b, c])
    assert forecast["glioma"] == pytest.approx(3.0)


def _measured_run(root: Path, rules: dict[str, float], subjects=("glioma01", "glioma02")) -> Path:
    """A measured run's folder: benchmark files (cpu_time per rule and subject), inputs, config."""
    bench = root / "benchmarks"
    for rule, cpu in rules.items():
        for i, subject in enumerate(subjects):
            f = bench / rule / f"sub-{subject}.tsv"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(f"s\tcpu_time\n{100.0}\t{cpu + i}\n")
    for subject in subjects:
        (root / "inputs" / f"sub-{subject}").mkdir(parents=True)
    (bench / "synth_cohort.tsv").write_text("s\tcpu_time\n10\t8\n")
    (root / "config.yaml").write_text("seed: 0\nmodels:\n  n_folds: 2\n")
    return root


def test_per_subject_costs_and_the_rules_a_slice_lacks_come_from_the_other_run(tmp_path):
    slice_ = _measured_run(tmp_path / "slice", {"preprocess_anat": 40.0, "model_inputs": 6.0})
    other = _measured_run(tmp_path / "other", {"preprocess_anat": 999.0, "plan": 20.0})
    costs = projection.fit_costs(slice_, other)
    # the slice's own measurement wins; the mean over its subjects (CPU time, not wall time)
    assert costs["per_subject"]["preprocess_anat"] == {"glioma": 40.5}
    assert costs["per_subject"]["model_inputs"] == {"glioma": 6.5}
    # plan is missing from the slice: taken from the other run, and said so
    assert costs["per_subject"]["plan"] == {"glioma": 20.5}
    assert costs["per_subject_from_also"] == ["plan"]
    assert projection.fit_costs(slice_)["per_subject"]["plan"] == {}
    assert costs["synth_cpu_per_subject"] == 4.0


def test_each_disorder_trains_for_its_own_epochs():
    config = {"models": {"epochs": 60}, "stroke": {"epochs": 30}, "glioma": {"model_voxel_mm": 2.0}}
    epochs = projection.disorder_epochs(config, ["glioma", "stroke", "alzheimer"])
    assert epochs == {"glioma": 60.0, "stroke": 30.0, "alzheimer": 60.0}
    jobs = {0: {"rule": "train_model", "wildcards": {"disorder": "glioma", "fold": "0"}, "threads": 1},
            1: {"rule": "train_model", "wildcards": {"disorder": "stroke", "fold": "0"}, "threads": 1}}
    costs = {"train_coef": {"glioma": [10.0, 1.0, 0.5], "stroke": [0.0, 2.0, 1.0]}}
    dur = projection.durations(jobs, costs, n_train={"glioma": {0: 4}, "stroke": {0: 3}}, epochs=epochs)
    assert dur == {0: pytest.approx(10 + 4 * (1 + 0.5 * 60)), 1: pytest.approx(3 * (2 + 1.0 * 30))}
