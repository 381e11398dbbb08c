# Helpers shared by all rule files (participants table, folds, paths, per-job resources).
# Functions only (no rules), so the rule files stay declarative.

import json
import os
import re
from pathlib import Path

import jsonschema
import pandas as pd
import yaml

from snakemake.exceptions import WorkflowError

from neurohybrid import registry

DISORDERS = list(registry.DISORDERS)


def schema_path(name):
    """A schema shipped with the workflow, wherever snakemake is run from (--directory)."""
    return os.path.join(workflow.basedir, "workflow", "schemas", name)


def check_config(config):
    """Stop with one line naming the offending key (snakemake's validate prints the whole schema)."""
    with open(schema_path("config.schema.yaml")) as fh:
        validator = jsonschema.Draft202012Validator(yaml.safe_load(fh))
    errors = sorted(
        validator.iter_errors(config),
        key=lambda e: (len(e.path), list(map(str, e.path))),
    )
    if errors:
        error = errors[0]
        key = ".".join(str(p) for p in error.path)
        if error.validator == "additionalProperties":
            unknown = sorted(
                set(error.instance) - set(error.schema.get("properties", {}))
            )
            key = ".".join([*map(str, error.path), unknown[0]]) if unknown else key
            message = "unknown key (not in workflow/schemas/config.schema.yaml)"
        else:
            message = error.message
        raise WorkflowError(f"invalid config: key '{key or '(top level)'}': {message}")
    # model settings: one loader for every disorder, which knows each key the model code reads
    from neurohybrid.errors import InputError
    from neurohybrid.settings import check_keys

    from neurohybrid.evaluation import analysis

    try:
        check_keys(config)
        analysis.check(config.get("analysis"))  # metric names the scorers write
    except InputError as exc:
        raise WorkflowError(f"invalid config: {exc.problem}") from None


check_config(config)

# ---------------------------------------------------------------------------------------------
# where things live

OUT = config["output_dir"].rstrip("/")
DEMO = not config["bids_dir"]
# the demo cohort is generated inside output_dir; a user's BIDS folder is only ever read
BIDS = f"{OUT}/sourcedata/bids" if DEMO else config["bids_dir"].rstrip("/")
if not DEMO and not os.path.isdir(BIDS):
    # before any job (a dry run too): otherwise every subject fails on its own missing files
    raise WorkflowError(
        f"invalid config: bids_dir '{BIDS}' is not a folder (give the BIDS root, or \"\" for the demo cohort)"
    )
TRUTH = f"{OUT}/groundtruth"
PREPROC = f"{OUT}/preproc"
INPUTS = f"{OUT}/inputs"
TARGETS = f"{OUT}/targets"
MODELS = f"{OUT}/models"
FORECASTS = f"{OUT}/forecasts"
METRICS = f"{OUT}/metrics"
COHORT = f"{OUT}/cohort"
PLANS = f"{OUT}/plans"
LOGS = f"{OUT}/logs"
BENCH = f"{OUT}/benchmarks"
RESOLVED_CONFIG = f"{OUT}/config.yaml"
SUBJECT_INPUTS = f"{INPUTS}/sub-{{subject}}/sub-{{subject}}_desc-modelinputs"
SUBJECT_TARGET = f"{TARGETS}/sub-{{subject}}/sub-{{subject}}_desc-target"
SLOPPY = bool(config["sloppy"])


# ---------------------------------------------------------------------------------------------
# template, atlas, normative connectome: resources/ (extracted on the first run) or the user's


def user_resources(section):
    """{key: path} of the user's files in config `resources:`; pairs and existence checked now,
    before any job (their content is checked by the resolve_resources job)."""
    from neurohybrid.anatomy.resources import GROUPS, KEYS

    given = {k: str(section[k]) for k in KEYS if section.get(k)}
    for group, keys in GROUPS.items():
        missing = [k for k in keys if k not in given]
        if len(missing) not in (0, len(keys)):
            raise WorkflowError(
                f"invalid config: key 'resources.{missing[0]}': a user {group} needs "
                f"{', '.join(f'resources.{k}' for k in keys)} together"
            )
    for key, path in given.items():
        if not os.path.isfile(path):
            raise WorkflowError(
                f"invalid config: key 'resources.{key}': file {path} not found"
            )
    return given


RESOURCES_SECTION = config.get("resources") or {}
RESOURCES_DIR = str(RESOURCES_SECTION.get("dir") or "resources").rstrip("/")
USER_RESOURCES = user_resources(RESOURCES_SECTION)
RESOURCES_MANIFEST = f"{OUT}/resources.json"


def _resource_files():
    from neurohybrid.anatomy.resources import FILES

    return dict(FILES)


RESOURCE_FILES = _resource_files()


# ---------------------------------------------------------------------------------------------
# participants: validated row by row so an error names the row, before any job is scheduled


def load_participants(path):
    if not os.path.isfile(path):
        raise WorkflowError(f"config key 'participants': table {path} not found")
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except Exception as exc:
        raise WorkflowError(f"participants table {path}: cannot be read as TSV ({exc})")
    if table.empty:
        raise WorkflowError(f"participants table {path}: no rows")
    with open(schema_path("participants.schema.yaml")) as fh:
        validator = jsonschema.Draft202012Validator(yaml.safe_load(fh))
    seen = {}
    for index, row in enumerate(table.to_dict("records")):
        line = index + 2  # header is line 1 of the file
        errors = sorted(validator.iter_errors(row), key=lambda e: list(e.path))
        if errors:
            field = ".".join(str(p) for p in errors[0].path) or "row"
            raise WorkflowError(
                f"participants table {path}, row {line} (participant_id {row.get('participant_id', '?')!r}): "
                f"{field}: {errors[0].message}"
            )
        label = row["participant_id"].removeprefix("sub-")
        if label in seen:
            raise WorkflowError(
                f"participants table {path}, row {line} (participant_id {row['participant_id']!r}): "
                f"duplicate of row {seen[label]}"
            )
        seen[label] = line
    table["subject"] = table["participant_id"].str.removeprefix("sub-")
    return table.set_index("subject", drop=False)


DEMO_PREFIX = {"glioma": "glioma", "alzheimer": "ad", "stroke": "stroke"}


def check_demo_participants(table, path):
    """The generator numbers its subjects <prefix>01, <prefix>02, ... per disorder."""
    for disorder, prefix in DEMO_PREFIX.items():
        rows = table[table["disorder"] == disorder]
        expected = [f"{prefix}{i + 1:02d}" for i in range(len(rows))]
        if sorted(rows["subject"]) != expected:
            wrong = sorted(set(rows["subject"]) - set(expected)) or expected
            line = next(
                (i + 2 for i, s in enumerate(table["subject"]) if s == wrong[0]), None
            )
            where = (
                f"row {line} (participant_id 'sub-{wrong[0]}')"
                if line
                else f"disorder {disorder}"
            )
            raise WorkflowError(
                f"participants table {path}, {where}: the demo cohort (bids_dir empty) names its {disorder} "
                f"subjects {prefix}01..{prefix}{len(rows):02d}; set bids_dir to use other subjects"
            )


PARTICIPANTS = load_participants(config["participants"])
if DEMO:
    check_demo_participants(PARTICIPANTS.reset_index(drop=True), config["participants"])
SUBJECTS = sorted(PARTICIPANTS["subject"])
DISORDER_OF = PARTICIPANTS["disorder"].to_dict()
SUBJECTS_OF = {d: sorted(s for s in SUBJECTS if DISORDER_OF[s] == d) for d in DISORDERS}
COHORT_DISORDERS = [d for d in DISORDERS if SUBJECTS_OF[d]]
FAMILIES = list(config["models"]["families"])


def one_of(names):
    """A wildcard regex matching exactly these names (and nothing else)."""
    return (
        "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) or "(?!)"
    )


def disorder_of(wildcards):
    return DISORDER_OF[wildcards.subject]


# the families a fold trains, per disorder (neurohybrid.registry)
TRAINED_OF = {d: registry.trained_families(FAMILIES, d) for d in DISORDERS}


# ---------------------------------------------------------------------------------------------
# subject-level folds, fixed at parse time (no subject in both a fold's training and test set)


def _assign_folds(subjects, n_folds, seed):
    from neurohybrid.hybrid.splits import assign_folds

    return assign_folds(subjects, n_folds, seed)


def _check_fold_sizes():
    for d in COHORT_DISORDERS:
        if TRAINED_OF[d] and len(SUBJECTS_OF[d]) < 2:
            raise WorkflowError(
                f"participants table {config['participants']}: disorder {d} has {len(SUBJECTS_OF[d])} subject; "
                f"its cross-subject families in config key 'models.families' ({', '.join(TRAINED_OF[d])}) need at least 2"
            )


_check_fold_sizes()
FOLDS = {
    d: _assign_folds(
        SUBJECTS_OF[d], int(config["models"]["n_folds"]), int(config["seed"])
    )
    for d in COHORT_DISORDERS
    if len(SUBJECTS_OF[d]) >= 2
}


def fold_of(subject):
    return FOLDS[DISORDER_OF[subject]][subject]


def training_subjects(disorder, fold):
    return sorted(s for s, k in FOLDS[disorder].items() if k != int(fold))


def fold_ids(disorder):
    return sorted(set(FOLDS.get(disorder, {}).values()))


# ---------------------------------------------------------------------------------------------
# sessions and raw files


def sessions_table(subject):
    return f"{BIDS}/sub-{subject}/sub-{subject}_sessions.tsv"


def raw_files(*patterns):
    """Input function: the subject's raw files, for provenance and ordering.

    Demo: the generator's per-subject output (its DAG edge). User BIDS: only files that exist,
    so a missing one fails that subject's job with a message naming it (and --keep-going carries
    on with the others) instead of stopping the whole DAG.
    """

    def inputs(wildcards):
        if DEMO:
            return [sessions_table(wildcards.subject)]
        root = Path(BIDS)
        found = []
        for pattern in patterns:
            found.extend(
                str(p)
                for p in sorted(root.glob(pattern.format(subject=wildcards.subject)))
            )
        return found

    return inputs


def truth_dir():
    """Ground truth of the demo cohort (read only by evaluation); nothing for a user's BIDS."""
    return [TRUTH] if DEMO else []


# ---------------------------------------------------------------------------------------------
# per-job settings that depend on config (threads, memory and runtime are set in the rules and
# adjusted per site in workflow/profiles/)


def gpu_count():
    """Model jobs request a GPU only when the config asks for CUDA explicitly."""
    return 1 if config["device"] == "cuda" else 0


def model_voxel_mm(wildcards):
    return config[disorder_of(wildcards)]["model_voxel_mm"]


def fast_flag():
    return "--fast" if (SLOPPY or config["preprocessing"].get("fast", False)) else ""


def _table_subjects():
    """Alzheimer's subjects of a user's BIDS who bring regional SUVR tables instead of PET images
    (<bids>/derivatives/regional/sub-<id>/): they skip image preprocessing."""
    if DEMO:
        return set()
    from neurohybrid.preprocessing.regional import has_tables

    return {s for s in SUBJECTS_OF["alzheimer"] if has_tables(BIDS, s)}


TABLE_SUBJECTS = _table_subjects()
IMAGE_SUBJECTS = [s for s in SUBJECTS if s not in TABLE_SUBJECTS]
REGIONAL_MAPPING = config["preprocessing"].get("regional_mapping") or ""
if TABLE_SUBJECTS and REGIONAL_MAPPING and not os.path.isfile(REGIONAL_MAPPING):
    raise WorkflowError(
        f"invalid config: key 'preprocessing.regional_mapping': file {REGIONAL_MAPPING} not found"
    )


def connectome_subjects():
    if config["preprocessing"].get("connectome_all_subjects", False):
        return IMAGE_SUBJECTS
    return [s for s in SUBJECTS_OF["alzheimer"] if s not in TABLE_SUBJECTS]


# ---------------------------------------------------------------------------------------------
# input functions of the model rules
def disorder_preprocessing(wildcards):
    """What `neurohybrid inputs` reads beyond the structural outputs, by disorder."""
    subject = wildcards.subject
    if subject in TABLE_SUBJECTS:
        return [rules.preprocess_regional.output[0].format(subject=subject)]
    if DISORDER_OF[subject] == "alzheimer":
        return [
            rules.preprocess_pet.output[0].format(subject=subject),
            rules.preprocess_connectome.output.tsv.format(subject=subject),
        ]
    return [rules.preprocess_lesions.output[0].format(subject=subject)]


def model_grid_outputs(wildcards):
    """The structural outputs on the model grid (none for a subject with regional tables only)."""
    if wildcards.subject in TABLE_SUBJECTS:
        return []
    return [
        path.format(subject=wildcards.subject)
        for path in rules.preprocess_anat.output.model_grid
    ]


def training_data(wildcards):
    subjects = training_subjects(wildcards.disorder, wildcards.fold)
    return {
        "inputs": expand(f"{SUBJECT_INPUTS}.npz", subject=subjects),
        "targets": expand(f"{SUBJECT_TARGET}.npz", subject=subjects),
    }


def fold_models_dir(disorder, fold):
    return f"{MODELS}/{disorder}/fold-{fold}"


def trained_models(wildcards):
    """The fold models a subject's forecasts use: trained without that subject."""
    disorder = DISORDER_OF[wildcards.subject]
    if not TRAINED_OF[disorder]:
        return []
    return fold_models_dir(disorder, fold_of(wildcards.subject))


def all_fold_models():
    """Every fold's model folder (the cohort figures plot their training curves)."""
    return [
        fold_models_dir(d, k)
        for d in COHORT_DISORDERS
        if TRAINED_OF[d]
        for k in fold_ids(d)
    ]


def models_dir_flag(wildcards):
    disorder = DISORDER_OF[wildcards.subject]
    if not TRAINED_OF[disorder]:
        return ""
    return f"--models-dir {fold_models_dir(disorder, fold_of(wildcards.subject))}"


def glioma_plan(wildcards):
    """The subject's planning folder when its radiotherapy targets are scored (glioma), else nothing."""
    if DISORDER_OF[wildcards.subject] == "glioma":
        return [f"{PLANS}/sub-{wildcards.subject}"]
    return []


def plan_subject_space(wildcards):
    """What a glioma plan needs to write its targets in the subject's T1w space: the preprocessed
    T1w and the template-to-T1w transforms (ANTs backend only); nothing for other subjects.
    """
    backend = (config.get("preprocessing") or {}).get("backend", "ants")
    if DISORDER_OF[wildcards.subject] != "glioma" or backend != "ants":
        return []
    anat = f"{PREPROC}/sub-{wildcards.subject}/anat/sub-{wildcards.subject}"
    return [
        f"{anat}_desc-preproc_T1w.nii.gz",
        f"{anat}_from-MNI152NLin2009cSym_to-T1w_mode-image_xfm.mat",
        f"{anat}_from-MNI152NLin2009cSym_to-T1w_mode-image_xfm.nii.gz",
    ]


def cohort_figure(name, caption, label):
    """A cohort figure as a report item (caption paths are relative to the rule files)."""
    return report(
        f"{COHORT}/figures/{name}.png",
        caption=f"../report/{caption}.rst",
        category="Cohort",
        subcategory="Figures",
        labels={"figure": label},
    )


# ---------------------------------------------------------------------------------------------
# provenance: the resolved config and the derivatives' dataset_description.json


def provenance_config():
    """The config as resolved for this run: the config file(s) plus any --config overrides."""
    return json.loads(json.dumps(config))


def write_provenance(resolved, config_out, description_out):
    import snakemake as _snakemake

    from neurohybrid import __version__
    from neurohybrid.io import atomic_path, write_json

    with atomic_path(config_out) as tmp:
        tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
    write_json(
        description_out,
        {
            "Name": "neurohybrid derivatives",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [
                {
                    "Name": "neurohybrid",
                    "Version": __version__,
                    "Description": "hybrid mechanistic + deep-learning models",
                },
                {"Name": "snakemake", "Version": _snakemake.__version__},
            ],
            "SourceDatasets": [
                {
                    "URL": Path(os.path.abspath(BIDS)).as_uri(),
                    "Description": (
                        "demo cohort generated by neurohybrid synth"
                        if DEMO
                        else "input BIDS dataset"
                    ),
                }
            ],
        },
    )
