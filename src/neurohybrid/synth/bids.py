"""BIDS writing for the virtual cohort: the raw dataset, its lesion derivatives and the truth folder.

Layout is the "Raw BIDS" contract of docs/architecture.md. Files go through neurohybrid.io (atomic
rename), and NIfTI gzip streams are deterministic (nibabel writes gzip with mtime 0 and no file
name), so the same seed gives the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from neurohybrid import __version__
from neurohybrid.io import save_volume, write_json, write_tsv

BIDS_VERSION = "1.9.0"
GENERATED_BY = [{"Name": "neurohybrid synth", "Version": __version__,
                 "Description": "virtual cohort on the MNI152 2009c template with mechanistic disease models"}]
# who made the data: the generator (synthetic, no people scanned); BIDS validators warn (NO_AUTHORS) without it
AUTHORS = ["neurohybrid synth (virtual cohort generator)"]
SESSION_TIME_COLUMN = {"glioma": "day", "alzheimer": "years", "stroke": "hours_since_onset"}
SESSION_TIME_DESCRIPTION = {
    "day": {"Description": "days since the subject's first session", "Units": "day"},
    "years": {"Description": "years since the subject's first visit", "Units": "year"},
    "hours_since_onset": {"Description": "hours from symptom onset to this session's imaging", "Units": "hour"},
}
PARTICIPANTS_JSON = {
    "participant_id": {"Description": "subject label, sub-<disorder><NN>"},
    "disorder": {"Description": "disorder of the virtual patient",
                 "Levels": {"glioma": "glioma", "alzheimer": "Alzheimer's disease", "stroke": "ischaemic stroke"}},
    "age": {"Description": "age at the first session", "Units": "year"},
    "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}},
    "onset_to_reperfusion_h": {"Description": "stroke: hours from onset to reperfusion; n/a = never reperfused or not a stroke subject",
                               "Units": "hour"},
}
# BIDS raw has no 'cbf' suffix (it is an ASL derivative); the contract keeps the CBF map in perf/,
# so validators are told to skip it.
BIDSIGNORE = "*_cbf.nii.gz\n*_cbf.json\n"


def sub_dir(root: Path, subject: str) -> Path:
    return Path(root) / f"sub-{subject}"


def write_dataset_description(root: Path, name: str, dataset_type: str = "raw", extra: dict | None = None) -> None:
    desc = {"Name": name, "BIDSVersion": BIDS_VERSION, "DatasetType": dataset_type, "GeneratedBy": GENERATED_BY,
            "License": "CC0 (synthetic data)", "Authors": AUTHORS}
    desc.update(extra or {})
    write_json(Path(root) / "dataset_description.json", desc)


def write_participants(root: Path, rows: list[dict]) -> None:
    frame = pd.DataFrame(rows, columns=["participant_id", "disorder", "age", "sex", "onset_to_reperfusion_h"])
    write_tsv(Path(root) / "participants.tsv", frame)
    write_json(Path(root) / "participants.json", PARTICIPANTS_JSON)


def write_sessions(root: Path, subject: str, disorder: str, sessions: list[tuple[str, float]]) -> None:
    column = SESSION_TIME_COLUMN[disorder]
    frame = pd.DataFrame({"session_id": [f"ses-{s}" for s, _ in sessions], column: [float(t) for _, t in sessions]})
    base = sub_dir(root, subject)
    write_tsv(base / f"sub-{subject}_sessions.tsv", frame, float_format="%.4f")
    write_json(base / f"sub-{subject}_sessions.json",
               {"session_id": {"Description": "session label"}, column: SESSION_TIME_DESCRIPTION[column]})


def session_path(root: Path, subject: str, session: str, datatype: str, suffix: str, ext: str = ".nii.gz",
                 entities: str = "") -> Path:
    ent = f"_{entities}" if entities else ""
    return sub_dir(root, subject) / f"ses-{session}" / datatype / f"sub-{subject}_ses-{session}{ent}_{suffix}{ext}"


def lesion_path(root: Path, subject: str, session: str, desc: str) -> Path:
    return (Path(root) / "derivatives" / "lesions" / f"sub-{subject}" / f"ses-{session}" / "anat"
            / f"sub-{subject}_ses-{session}_space-T1w_desc-{desc}_mask.nii.gz")


def write_image(path: Path, data: np.ndarray, affine: np.ndarray, dtype=np.float32) -> None:
    save_volume(path, np.asarray(data), affine, dtype=dtype)


def write_mr_image(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """MR magnitude images as int16, as scanners store them: rounding (< 0.5 units) is far below the
    noise (sigma >= 2.5 units at template intensities ~180), and the files are half the size."""
    save_volume(path, np.clip(np.rint(data), 0, 32767), affine, dtype=np.int16)


def write_mask(path: Path, mask: np.ndarray, affine: np.ndarray) -> None:
    save_volume(path, np.asarray(mask, dtype=bool), affine, dtype=np.uint8)


def anat_sidecar(suffix: str, extra: dict | None = None) -> dict:
    side = {"Manufacturer": "neurohybrid-synth", "MagneticFieldStrength": 3, "Modality": "MR",
            "Description": f"synthetic {suffix} image (template-based virtual subject)"}
    side.update(extra or {})
    return side


def write_json_sidecar(image_path: Path, sidecar: dict) -> None:
    """The .json beside an image (same name, .nii.gz replaced)."""
    image_path = Path(image_path)
    write_json(image_path.with_name(image_path.name.replace(".nii.gz", ".json")), sidecar)


def pet_sidecar(tracer: str = "AV1451") -> dict:
    """The BIDS-PET required fields for a static, already SUVR-scaled image."""
    return {
        "Modality": "PT",
        "Manufacturer": "neurohybrid-synth",
        "ManufacturersModelName": "virtual PET",
        "Units": "unitless",
        "BodyPart": "Brain",
        "TracerName": tracer,
        "TracerRadionuclide": "F18",
        "InjectedRadioactivity": 370.0,
        "InjectedRadioactivityUnits": "MBq",
        "InjectedMass": "n/a",
        "InjectedMassUnits": "n/a",
        "SpecificRadioactivity": "n/a",
        "SpecificRadioactivityUnits": "n/a",
        "ModeOfAdministration": "bolus",
        "TimeZero": "00:00:00",
        "ScanStart": 4800,
        "InjectionStart": 0,
        "FrameTimesStart": [4800],
        "FrameDuration": [1200],
        "AcquisitionMode": "list mode",
        "ImageDecayCorrected": True,
        "ImageDecayCorrectionTime": 0,
        "ReconMethodName": "synthetic (regional SUVR painted into parcels, Gaussian PSF)",
        "ReconMethodParameterLabels": ["none"],
        "ReconMethodParameterUnits": ["none"],
        "ReconMethodParameterValues": [0],
        "ReconFilterType": "Gaussian",
        "ReconFilterSize": 6.0,
        "AttenuationCorrection": "synthetic",
        "Description": "static tau PET, SUVR with inferior cerebellar grey matter reference (~1)",
    }
