"""Dry runs: the DAG's shape on the default (demo) config and on a hand-made BIDS folder, config
and participants validation, and `snakemake --lint`. No job runs here."""

from __future__ import annotations

import re
import shlex
import shutil
from collections import Counter

import pandas as pd
import pytest
import yaml

from conftest import DEFAULT_CONFIG, REPO, snakemake, write_config, write_participants

from neurohybrid.registry import trained_families


def shell_commands(stdout: str) -> list[list[str]]:
    """The `neurohybrid ...` commands a dry run (-n -p) would execute, as argument lists."""
    commands = []
    for line in stdout.splitlines():
        if line.startswith("Shell command: "):
            command = shlex.split(line.removeprefix("Shell command: ").split(" > ")[0])
            if command[0] == "neurohybrid":  # run: rules print "None"
                if command[1] == "--resources":  # the global option, moved last so c[1] is the command
                    command = [command[0], *command[3:], *command[1:3]]
                commands.append(command)
    return commands


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def step(args: list[str]) -> str:
    return " ".join(args[1:3]) if args[1] in ("preprocess", "cohort", "plan") else args[1]


def dry_run(tmp_path, config_path):
    result = snakemake(tmp_path, config_path, "--dry-run", "--printshellcmds", "--cores", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return shell_commands(result.stdout)


def test_default_config_dag(tmp_path):
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    participants = pd.read_csv(REPO / config["participants"], sep="\t")
    subjects = {p.removeprefix("sub-"): d for p, d in zip(participants.participant_id, participants.disorder)}
    families = config["models"]["families"]
    cfg = write_config(tmp_path / "config.yaml", participants=str(REPO / config["participants"]))

    commands = dry_run(tmp_path, cfg)
    counts = Counter(step(c) for c in commands)
    n_ad = sum(d == "alzheimer" for d in subjects.values())
    folds = config["models"]["n_folds"]
    assert counts == {
        "resources": 2,  # extract (into resources/) and resolve (the run's manifest)
        "synth": 1,
        "preprocess align": len(subjects),
        "preprocess anat": len(subjects),
        "preprocess lesions": len(subjects) - n_ad,
        "preprocess pet": n_ad,
        "preprocess connectome": n_ad,
        "inputs": len(subjects),
        "train": folds * 3,  # one job per disorder x fold trains every cross-subject family
        "forecast": len(subjects),  # one job per subject fits and forecasts every family
        "evaluate": len(subjects),
        "cohort table": 1,
        "cohort stats": 1,
        "cohort figures": 1,
        # treatment planning: one job per subject, one cohort table + figure per disorder (in `rule all`)
        "plan glioma": sum(d == "glioma" for d in subjects.values()),
        "plan stroke": sum(d == "stroke" for d in subjects.values()),
        "plan alzheimer": n_ad,
        "plan cohort": 3,
    }

    # the demo cohort is generated inside output_dir, and evaluation (only) reads its ground truth
    synth = next(c for c in commands if c[1] == "synth")
    assert option(synth, "--out") == "results/sourcedata/bids"
    for c in commands:
        if c[1] == "evaluate":
            assert option(c, "--truth") == "results/groundtruth"
        elif c[1] != "cohort":
            assert "results/groundtruth" not in c[2:] or c[1] == "synth", c
    assert option(synth, "--truth-out") == "results/groundtruth"
    assert [option(synth, f"--{d}") for d in ("glioma", "alzheimer", "stroke")] == [
        str(sum(v == d for v in subjects.values())) for d in ("glioma", "alzheimer", "stroke")]

    # every subject is preprocessed with its disorder's model grid, from the generated BIDS
    for c in commands:
        if step(c) == "preprocess anat":
            subject = option(c, "--subject")
            assert option(c, "--bids") == "results/sourcedata/bids"
            assert float(option(c, "--model-voxel-mm")) == config[subjects[subject]]["model_voxel_mm"]

    # every command reading the template, atlas or normative connectome reads the run's manifest,
    # and the shipped ones are extracted into the working directory's resources/
    for c in commands:
        # the rigid within-subject alignment reads the subject's own images only
        reads_anatomy = (step(c).startswith("preprocess") and step(c) != "preprocess align") or c[1] == "inputs"
        assert (option(c, "--resources") == "results/resources.json") == reads_anatomy, c
    extract = next(c for c in commands if c[1:3] == ["resources", "extract"])
    resolve = next(c for c in commands if c[1:3] == ["resources", "resolve"])
    assert option(extract, "--out") == option(resolve, "--resources-dir") == "resources"
    assert option(resolve, "--out") == "results/resources.json"
    assert "--connectome" not in resolve and "--atlas" not in resolve

    # split guarantee: a forecast uses the fold models trained on its disorder's other subjects only
    trained_on = {option(c, "--out-dir"): set(option(c, "--subjects").split(",")) for c in commands if c[1] == "train"}
    for c in commands:
        if c[1] == "train":
            assert option(c, "--family").split(",") == trained_families(families, option(c, "--disorder"))
        if c[1] != "forecast":
            continue
        subject = option(c, "--subject")
        assert option(c, "--disorder") == subjects[subject]
        assert option(c, "--family").split(",") == families
        models = option(c, "--models-dir")
        assert models in trained_on, c
        assert subject not in trained_on[models]
        assert f"/{subjects[subject]}/" in models
        assert all(subjects[s] == subjects[subject] for s in trained_on[models])
    # each fold's model is trained on at least one subject, and every subject is tested exactly once
    assert all(trained_on.values())
    tested = Counter(option(c, "--subject") for c in commands if c[1] == "forecast")
    assert set(tested) == set(subjects) and set(tested.values()) == {1}
    evaluated = {option(c, "--subject"): option(c, "--model").split(",") for c in commands if c[1] == "evaluate"}
    assert evaluated == {s: families for s in subjects}

    # planning reads the inputs and forecasts, never the held-out targets or the ground truth; the
    # glioma targets are scored by evaluate
    for c in commands:
        if step(c) in ("plan glioma", "plan stroke", "plan alzheimer"):
            subject = option(c, "--subject")
            assert step(c) == f"plan {subjects[subject]}"
            assert option(c, "--out-dir") == f"results/plans/sub-{subject}"
            assert not any("results/targets" in a or "results/groundtruth" in a for a in c), c
            # glioma targets are also written in the subject's T1w space (preprocessing's transforms)
            assert option(c, "--preproc") == ("results/preproc" if subjects[subject] == "glioma" else None)
        if c[1] == "evaluate":
            subject = option(c, "--subject")
            expected = f"results/plans/sub-{subject}" if subjects[subject] == "glioma" else None
            assert option(c, "--plan-dir") == expected
    cohort_plans = {option(c, "--disorder"): c for c in commands if step(c) == "plan cohort"}
    assert set(cohort_plans) == {"glioma", "stroke", "alzheimer"}
    for disorder, c in cohort_plans.items():
        assert option(c, "--out") == f"results/cohort/treatment_{disorder}.tsv"
        assert ("--metrics" in c) == (disorder == "glioma")


def test_a_fold_trains_only_what_its_disorder_needs(tmp_path):
    """persistence + mechanistic: only stroke's mechanistic model has a fold component (its
    population prior of tissue sensitivity), so only stroke gets training jobs."""
    participants = write_participants(tmp_path / "p.tsv", [("glioma01", "glioma"), ("glioma02", "glioma"),
                                                           ("stroke01", "stroke"), ("stroke02", "stroke")])
    cfg = write_config(tmp_path / "config.yaml", participants=str(participants),
                       models={"families": ["persistence", "mechanistic"], "n_folds": 2})
    commands = dry_run(tmp_path, cfg)
    train = [c for c in commands if c[1] == "train"]
    assert sorted(option(c, "--disorder") for c in train) == ["stroke", "stroke"]
    assert {option(c, "--family") for c in train} == {"mechanistic"}
    for c in commands:
        if c[1] == "forecast":
            assert ("--models-dir" in c) == c[c.index("--subject") + 1].startswith("stroke"), c


def write_bids(root, subjects):
    """A tiny raw BIDS folder by hand (files only need to exist for a dry run)."""
    (root).mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "hand-made", "BIDSVersion": "1.9.0"}')
    for subject, disorder, sessions in subjects:
        sub = root / f"sub-{subject}"
        sub.mkdir()
        (sub / f"sub-{subject}_sessions.tsv").write_text(
            "session_id\tday\n" + "".join(f"ses-{s}\t{i}\n" for i, s in enumerate(sessions)))
        for s in sessions:
            anat = sub / f"ses-{s}" / "anat"
            anat.mkdir(parents=True)
            (anat / f"sub-{subject}_ses-{s}_T1w.nii.gz").write_bytes(b"")
            if disorder == "alzheimer":
                pet = sub / f"ses-{s}" / "pet"
                pet.mkdir()
                (pet / f"sub-{subject}_ses-{s}_trc-AV1451_pet.nii.gz").write_bytes(b"")
            else:
                lesions = root / "derivatives" / "lesions" / f"sub-{subject}" / f"ses-{s}" / "anat"
                lesions.mkdir(parents=True)
                for desc in (["T1Gd", "FLAIR"] if disorder == "glioma" else ["infarct"]):
                    (lesions / f"sub-{subject}_ses-{s}_space-T1w_desc-{desc}_mask.nii.gz").write_bytes(b"")


def test_user_bids_dag(tmp_path):
    bids = tmp_path / "mybids"
    layout = [("gbm1", "glioma", ["pre", "post"]), ("gbm2", "glioma", ["a", "b", "c"]),
              ("tau1", "alzheimer", ["y0", "y1", "y2"]), ("tau2", "alzheimer", ["y0", "y1", "y2"]),
              ("isc1", "stroke", ["acute", "followup"]), ("isc2", "stroke", ["acute", "followup"])]
    write_bids(bids, layout)
    # a subject without its first T1w still gets its jobs: the command, not the DAG, reports the
    # missing file (naming subject and file), so --keep-going can finish the rest of the cohort
    (bids / "sub-isc2" / "ses-acute" / "anat" / "sub-isc2_ses-acute_T1w.nii.gz").unlink()
    participants = write_participants(tmp_path / "participants.tsv", [(s, d) for s, d, _ in layout])
    cfg = write_config(tmp_path / "config.yaml", bids_dir=str(bids), participants=str(participants),
                       output_dir="out", models={"families": ["persistence", "mechanistic", "residual"], "n_folds": 2})
    result = snakemake(tmp_path, cfg, "--dry-run", "--printshellcmds", "--cores", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    commands = shell_commands(result.stdout)
    counts = Counter(step(c) for c in commands)
    assert "synth" not in counts
    assert counts["preprocess align"] == 6 and counts["preprocess anat"] == 6
    assert counts["preprocess lesions"] == 4 and counts["preprocess pet"] == 2
    assert counts["train"] == 3 * 2 and counts["forecast"] == 6 and counts["evaluate"] == 6
    for c in commands:
        if "--bids" in c:
            assert option(c, "--bids") == str(bids)
        if c[1] == "evaluate":
            assert "--truth" not in c  # no ground truth outside the demo
        if c[1] == "forecast":
            assert option(c, "--out-dir") == f"out/forecasts/sub-{option(c, '--subject')}"
    # the user's raw files are inputs of the jobs that read them (provenance, reruns on change)
    anat_job = re.search(r"rule preprocess_anat:\n\s*input: ([^\n]*)\n(?:.*\n){0,8}?\s*wildcards: subject=gbm2",
                         result.stdout)
    assert anat_job, result.stdout[:2000]
    for s in ("a", "b", "c"):
        assert f"sub-gbm2_ses-{s}_T1w.nii.gz" in anat_job.group(1)


def test_user_resources_reach_the_resolve_job(tmp_path):
    """A user's atlas and connectome are inputs of the job that checks them and are passed to it."""
    files = {name: tmp_path / name for name in ("atlas.nii.gz", "atlas.tsv", "conn.tsv")}
    for path in files.values():
        path.write_bytes(b"")
    participants = write_participants(tmp_path / "p.tsv", [("ad01", "alzheimer"), ("ad02", "alzheimer")])
    cfg = write_config(tmp_path / "config.yaml", participants=str(participants),
                       resources={"atlas": str(files["atlas.nii.gz"]), "atlas_table": str(files["atlas.tsv"]),
                                  "connectome": str(files["conn.tsv"])})
    result = snakemake(tmp_path, cfg, "--dry-run", "--printshellcmds", "--cores", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    resolve = next(c for c in shell_commands(result.stdout) if c[1:3] == ["resources", "resolve"])
    assert option(resolve, "--atlas") == str(files["atlas.nii.gz"])
    assert option(resolve, "--atlas-table") == str(files["atlas.tsv"])
    assert option(resolve, "--connectome") == str(files["conn.tsv"])
    assert "--template-t1" not in resolve
    job = re.search(r"rule resolve_resources:\n\s*input: ([^\n]*)", result.stdout)
    assert job and str(files["conn.tsv"]) in job.group(1)


@pytest.mark.parametrize(
    "resources, expected",
    [
        ({"atlas": "ATLAS"}, "key 'resources.atlas_table': a user atlas needs resources.atlas, resources.atlas_table together"),
        ({"connectome": "no/such/conn.tsv"}, "key 'resources.connectome': file no/such/conn.tsv not found"),
        ({"atlas_path": "x"}, "key 'resources.atlas_path': unknown key"),
    ],
)
def test_bad_resources_config_stops_before_any_job(tmp_path, resources, expected):
    atlas = tmp_path / "atlas.nii.gz"
    atlas.write_bytes(b"")
    resources = {k: str(atlas) if v == "ATLAS" else v for k, v in resources.items()}
    cfg = write_config(tmp_path / "config.yaml", participants=str(REPO / "config" / "participants.tsv"),
                       output_dir="out", resources=resources)
    result = snakemake(tmp_path, cfg, "--cores", "1")
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_regional_table_subjects_skip_image_preprocessing(tmp_path):
    """An Alzheimer's subject with regional SUVR tables (derivatives/regional) and no images gets
    no image step: its tables go to `preprocess regional`, then to the model inputs."""
    bids = tmp_path / "mybids"
    layout = [("tau1", "alzheimer", ["y0", "y1", "y2"]), ("tau2", "alzheimer", ["y0", "y1", "y2"])]
    write_bids(bids, layout)
    shutil.rmtree(bids / "sub-tau2" / "ses-y0")  # no images at all for tau2, only its tables
    shutil.rmtree(bids / "sub-tau2" / "ses-y1")
    shutil.rmtree(bids / "sub-tau2" / "ses-y2")
    tables = bids / "derivatives" / "regional" / "sub-tau2"
    tables.mkdir(parents=True)
    (tables / "sub-tau2_desc-suvr_pet.tsv").write_text("session_id\tregion\tsuvr\ny0\tCTX_LH_PRECUNEUS\t1.2\n")
    mapping = tmp_path / "adni.tsv"
    mapping.write_text("source\tregion\nCTX_LH_PRECUNEUS\tL_precuneus\n")
    participants = write_participants(tmp_path / "participants.tsv", [(s, d) for s, d, _ in layout])
    cfg = write_config(tmp_path / "config.yaml", bids_dir=str(bids), participants=str(participants), output_dir="out",
                       preprocessing={"regional_mapping": str(mapping)}, models={"families": ["persistence"], "n_folds": 2})
    result = snakemake(tmp_path, cfg, "--dry-run", "--printshellcmds", "--cores", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    commands = shell_commands(result.stdout)
    by_subject = {}
    for c in commands:
        if "--subject" in c:
            by_subject.setdefault(option(c, "--subject"), []).append(step(c))
    assert sorted(by_subject["tau1"]) == ["evaluate", "forecast", "inputs", "plan alzheimer", "preprocess align",
                                          "preprocess anat", "preprocess connectome", "preprocess pet"]
    assert sorted(by_subject["tau2"]) == ["evaluate", "forecast", "inputs", "plan alzheimer", "preprocess regional"]
    regional = next(c for c in commands if step(c) == "preprocess regional")
    assert option(regional, "--mapping") == str(mapping) and option(regional, "--resources") == "out/resources.json"
    job = re.search(r"rule model_inputs:\n\s*input: ([^\n]*)\n(?:.*\n){0,8}?\s*wildcards: subject=tau2", result.stdout)
    assert job and "flags/preprocess_regional/sub-tau2.done" in job.group(1) and "preprocess_anat" not in job.group(1)


def model_job_resources(stdout):
    jobs = re.findall(r"rule (train_model|forecast|preprocess_anat):\n(?:\s+\S.*\n)*?\s+resources: ([^\n]*)", stdout)
    assert {rule for rule, _ in jobs} == {"train_model", "forecast", "preprocess_anat"}
    return jobs


def test_device_cuda_requests_a_gpu(tmp_path):
    """Model jobs ask for a GPU only with device: cuda (the default config's 'auto' asks for none)."""
    participants = write_participants(tmp_path / "p.tsv", [("glioma01", "glioma"), ("glioma02", "glioma")])
    results = {}
    for device in ("auto", "cuda"):
        cfg = write_config(tmp_path / f"{device}.yaml", participants=str(participants), device=device,
                           models={"families": ["residual"]})
        result = snakemake(tmp_path, cfg, "--dry-run", "--cores", "2")
        assert result.returncode == 0, result.stderr[-2000:]
        results[device] = model_job_resources(result.stdout)
    for device, gpus in (("auto", "gpu=0"), ("cuda", "gpu=1")):
        for rule, resources in results[device]:
            if rule == "preprocess_anat":
                assert "gpu" not in resources
            else:
                assert gpus in resources, (device, rule, resources)


@pytest.mark.parametrize(
    "override, expected",
    [
        ({"models": {"n_folds": 1}}, "key 'models.n_folds': 1 is less than the minimum of 2"),
        ({"preprocessing": {"backend": "ants", "fsat": True}}, "key 'preprocessing.fsat': unknown key"),
        ({"glioma": {"model_voxel_mm": -4.0}}, "key 'glioma.model_voxel_mm': -4.0 is less than or equal to the minimum of 0"),
        ({"models": {"n_folds": 2, "nfolds": 3}}, "config key 'models.nfolds': unknown model setting (did you mean 'n_folds'?)"),
        ({"stroke": {"model_voxel_mm": 4.0, "epoch": 3}}, "config key 'stroke.epoch': unknown model setting"),
        ({"glioma": {"model_voxel_mm": 4.0, "epochs": -3}}, "config key 'glioma.epochs': must be >= 1, got -3"),
        ({"bids_dir": "no/such/folder"}, "bids_dir 'no/such/folder' is not a folder"),
    ],
)
def test_invalid_config_key_stops_before_any_job(tmp_path, override, expected):
    cfg = write_config(tmp_path / "config.yaml", participants=str(REPO / "config" / "participants.tsv"),
                       output_dir="out", **override)
    result = snakemake(tmp_path, cfg, "--cores", "1")
    assert result.returncode != 0
    assert expected in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "rows, expected",
    [
        ("sub-g1\tglioma\nsub-g2\tmigraine\n", "row 3 (participant_id 'sub-g2'): disorder: 'migraine' is not one of"),
        ("sub-g1\tglioma\ng1\tglioma\n", "row 3 (participant_id 'g1'): duplicate of row 2"),
    ],
)
def test_invalid_participants_row_stops_before_any_job(tmp_path, rows, expected):
    table = tmp_path / "participants.tsv"
    table.write_text("participant_id\tdisorder\n" + rows)
    cfg = write_config(tmp_path / "config.yaml", participants=str(table), output_dir="out")
    result = snakemake(tmp_path, cfg, "--cores", "1")
    assert result.returncode != 0
    assert f"participants table {table}, {expected}" in result.stderr
    assert not (tmp_path / "out").exists()


def test_demo_cohort_needs_the_generators_subject_ids(tmp_path):
    table = write_participants(tmp_path / "p.tsv", [("glioma01", "glioma"), ("glioma03", "glioma")])
    cfg = write_config(tmp_path / "config.yaml", participants=str(table), output_dir="out")
    result = snakemake(tmp_path, cfg, "--cores", "1")
    assert result.returncode != 0
    assert f"participants table {table}, row 3 (participant_id 'sub-glioma03'): the demo cohort" in result.stderr
    assert not (tmp_path / "out").exists()


def test_lint_is_clean(tmp_path):
    cfg = write_config(tmp_path / "config.yaml", participants=str(REPO / "config" / "participants.tsv"))
    result = snakemake(tmp_path, cfg, "--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr
    assert "Congratulations" in result.stdout + result.stderr
