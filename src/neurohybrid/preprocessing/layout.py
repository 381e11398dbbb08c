"""Where raw inputs are found and where derivatives go (names from docs/architecture.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from neurohybrid import __version__
from neurohybrid.anatomy.templates import TEMPLATE_SPACE
from neurohybrid.errors import InputError
from neurohybrid.io import write_json

LESION_KINDS = ("T1Gd", "FLAIR", "infarct")
# masks kept beside the lesions and mapped onto the model grid with them, but never lesions (not
# masked out of the registration cost): the radiotherapy target of a treatment table
TREATMENT_KINDS = ("RTtarget",)


def subject_label(subject: str) -> str:
    return subject[4:] if subject.startswith("sub-") else subject


def sessions(bids: Path, sub: str) -> list[str]:
    """Session labels in time order: sessions.tsv when present, else sorted ses-* folders."""
    base = Path(bids) / f"sub-{sub}"
    if not base.is_dir():
        raise InputError("subject folder not found in the BIDS dataset", file=base, subject=sub)
    tsv = base / f"sub-{sub}_sessions.tsv"
    if tsv.exists():
        frame = pd.read_csv(tsv, sep="\t")
        if "session_id" in frame.columns and len(frame):
            time_cols = [c for c in ("day", "years", "hours_since_onset") if c in frame.columns]
            if time_cols:
                frame = frame.sort_values(time_cols[0], kind="stable")
            listed = [str(s)[4:] if str(s).startswith("ses-") else str(s) for s in frame["session_id"]]
            check_sessions_on_disk(bids, sub, listed, tsv)
            return listed
    found = sorted(p.name[4:] for p in base.glob("ses-*") if p.is_dir())
    if not found:
        raise InputError("no ses-* folders for this subject", file=base, subject=sub)
    return found


def raw_t1w(bids: Path, sub: str, ses: str) -> Path:
    return Path(bids) / f"sub-{sub}" / f"ses-{ses}" / "anat" / f"sub-{sub}_ses-{ses}_T1w.nii.gz"


def raw_lesion(bids: Path, sub: str, ses: str, kind: str) -> Path:
    """Where a user's lesion mask of one session lives (a BIDS derivative of the raw data)."""
    return (Path(bids) / "derivatives" / "lesions" / f"sub-{sub}" / f"ses-{ses}" / "anat"
            / f"sub-{sub}_ses-{ses}_space-T1w_desc-{kind}_mask.nii.gz")


def raw_lesions(bids: Path, sub: str, ses: str, kinds=LESION_KINDS) -> dict[str, Path]:
    """The session's lesion masks by kind, whatever their ``space-`` entity (``space-T1w``,
    ``space-FLAIR``, none): the mask's grid says which image it was drawn on (align.mask_transform)."""
    folder = raw_lesion(bids, sub, ses, "x").parent
    found = {}
    for kind in kinds:
        paths = sorted(folder.glob(f"sub-{sub}_ses-{ses}_*desc-{kind}_mask.nii.gz"))
        if len(paths) > 1:
            raise InputError(f"{len(paths)} {kind} masks for one session ({', '.join(p.name for p in paths)}): "
                             "keep one", file=folder, subject=sub)
        if paths:
            found[kind] = paths[0]
    return found


def check_sessions_on_disk(bids: Path, sub: str, listed: list[str], table: Path, *, need_folders: bool = True) -> None:
    """sessions.tsv and the session folders agree: a folder the table omits would be silently
    dropped (and a later session become the forecast target); with ``need_folders`` a listed
    session needs a folder of raw data or of lesion masks (the model-input step, which reads
    preprocessed data, leaves that to preprocessing)."""
    raw = Path(bids) / f"sub-{sub}"
    lesions = Path(bids) / "derivatives" / "lesions" / f"sub-{sub}"
    on_disk = {p.name[4:] for root in (raw, lesions) if root.is_dir() for p in root.glob("ses-*") if p.is_dir()}
    unlisted = sorted(on_disk - set(listed))
    if unlisted:
        raise InputError(f"session folder(s) ses-{', ses-'.join(unlisted)} on disk but not in the sessions table",
                         file=table, subject=sub)
    missing = [s for s in listed if s not in on_disk]
    if missing and need_folders:
        raise InputError(f"session(s) {', '.join(missing)} listed but no ses-{missing[0]} folder (raw or "
                         "derivatives/lesions)", file=table, subject=sub)


def raw_cbf(bids: Path, sub: str, ses: str) -> Path:
    return Path(bids) / f"sub-{sub}" / f"ses-{ses}" / "perf" / f"sub-{sub}_ses-{ses}_cbf.nii.gz"


def raw_pet(bids: Path, sub: str, ses: str) -> list[Path]:
    return sorted((Path(bids) / f"sub-{sub}" / f"ses-{ses}" / "pet").glob(f"sub-{sub}_ses-{ses}_trc-*_pet.nii.gz"))


def raw_dwi(bids: Path, sub: str, ses: str) -> tuple[Path, Path, Path] | None:
    base = Path(bids) / f"sub-{sub}" / f"ses-{ses}" / "dwi" / f"sub-{sub}_ses-{ses}_dwi"
    nii = Path(f"{base}.nii.gz")
    if not nii.exists():
        return None
    bval, bvec = Path(f"{base}.bval"), Path(f"{base}.bvec")
    for p in (bval, bvec):
        if not p.exists():
            raise InputError("DWI image present but its gradient file is missing", file=p, subject=sub)
    return nii, bval, bvec


@dataclasses.dataclass(frozen=True)
class Derivatives:
    """Output paths of one subject under the derivatives root."""

    root: Path
    sub: str

    @property
    def anat(self) -> Path:
        return self.root / f"sub-{self.sub}" / "anat"

    def a(self, suffix: str) -> Path:
        return self.anat / f"sub-{self.sub}_{suffix}"

    @property
    def preproc_t1w(self): return self.a("desc-preproc_T1w.nii.gz")
    @property
    def brain_mask(self): return self.a("desc-brain_mask.nii.gz")
    def probseg(self, tissue): return self.a(f"label-{tissue}_probseg.nii.gz")
    def model_probseg(self, tissue): return self.a(f"space-{TEMPLATE_SPACE}_res-model_label-{tissue}_probseg.nii.gz")
    @property
    def xfm_forward_stem(self): return self.a(f"from-T1w_to-{TEMPLATE_SPACE}_mode-image_xfm")
    @property
    def xfm_inverse_stem(self): return self.a(f"from-{TEMPLATE_SPACE}_to-T1w_mode-image_xfm")
    @property
    def forward_transforms(self):  # order for ants.apply_transforms: warp first, then affine
        return [self.a(f"from-T1w_to-{TEMPLATE_SPACE}_mode-image_xfm.nii.gz"),
                self.a(f"from-T1w_to-{TEMPLATE_SPACE}_mode-image_xfm.mat")]
    @property
    def inverse_transforms(self):
        return [self.a(f"from-{TEMPLATE_SPACE}_to-T1w_mode-image_xfm.mat"),
                self.a(f"from-{TEMPLATE_SPACE}_to-T1w_mode-image_xfm.nii.gz")]
    @property
    def dseg(self): return self.a("atlas-DK_dseg.nii.gz")
    @property
    def dseg_tsv(self): return self.a("atlas-DK_dseg.tsv")
    @property
    def volumes(self): return self.a("atlas-DK_desc-volumes.tsv")
    @property
    def cerebellum(self): return self.a("label-cerebellumGM_mask.nii.gz")
    @property
    def qc_png(self): return self.root / f"sub-{self.sub}" / "figures" / f"sub-{self.sub}_desc-qc.png"

    def model_lesion(self, ses, kind):
        return (self.root / f"sub-{self.sub}" / f"ses-{ses}" / "anat" /
                f"sub-{self.sub}_ses-{ses}_space-{TEMPLATE_SPACE}_res-model_desc-{kind}_mask.nii.gz")

    def model_cbf(self, ses):
        return (self.root / f"sub-{self.sub}" / f"ses-{ses}" / "perf" /
                f"sub-{self.sub}_ses-{ses}_space-{TEMPLATE_SPACE}_res-model_cbf.nii.gz")

    def suvr(self, ses):
        return (self.root / f"sub-{self.sub}" / f"ses-{ses}" / "pet" /
                f"sub-{self.sub}_ses-{ses}_atlas-DK_desc-suvr_pet.tsv")

    @property
    def connectivity(self):
        return self.root / f"sub-{self.sub}" / "dwi" / f"sub-{self.sub}_atlas-DK_connectivity.tsv"


def write_dataset_description(root: Path) -> None:
    path = Path(root) / "dataset_description.json"
    if path.exists():
        return
    write_json(path, {
        "Name": "neurohybrid preprocessing derivatives",
        "BIDSVersion": "1.8.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "neurohybrid", "Version": __version__,
                         "Description": "N4, brain extraction, ANTs/FSL registration, Atropos/FAST "
                                        "segmentation, DK parcellation, regional PET, connectome"}],
    })
