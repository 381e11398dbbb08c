import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from neurohybrid.errors import InputError
from neurohybrid.synth.cohort import generate_cohort


def _json(path):
    return json.loads(path.read_text())


def test_dataset_level_files(cohort):
    bids, truth, summary = cohort
    assert summary["subjects"] == ["sub-glioma01", "sub-ad01", "sub-stroke01"]
    desc = _json(bids / "dataset_description.json")
    assert desc["DatasetType"] == "raw" and desc["BIDSVersion"] and desc["GeneratedBy"][0]["Name"] == "neurohybrid synth"
    lesions = _json(bids / "derivatives" / "lesions" / "dataset_description.json")
    assert lesions["DatasetType"] == "derivative" and lesions["GeneratedBy"]
    parts = pd.read_csv(bids / "participants.tsv", sep="\t", na_values=["n/a"], keep_default_na=False)
    assert list(parts.columns) == ["participant_id", "disorder", "age", "sex", "onset_to_reperfusion_h"]
    assert list(parts.participant_id) == summary["subjects"]
    assert list(parts.disorder) == ["glioma", "alzheimer", "stroke"]
    assert parts.loc[parts.disorder != "stroke", "onset_to_reperfusion_h"].isna().all()
    assert set(_json(bids / "participants.json")) >= set(parts.columns)
    assert (bids / ".bidsignore").read_text().strip() and (bids / "README").exists()


def _sessions(bids, sub, column):
    frame = pd.read_csv(bids / sub / f"{sub}_sessions.tsv", sep="\t")
    assert list(frame.columns) == ["session_id", column]
    assert column in _json(bids / sub / f"{sub}_sessions.json")
    return frame


def _grid(path):
    img = nib.load(str(path))
    return img.shape[:3], img.affine


def test_glioma_subject(cohort):
    bids, _, _ = cohort
    sub = "sub-glioma01"
    ses = _sessions(bids, sub, "day")
    assert len(ses) == 3 and ses["day"].iloc[0] == 0 and np.all(np.diff(ses["day"]) > 0)
    ref = _grid(bids / sub / "ses-01" / "anat" / f"{sub}_ses-01_T1w.nii.gz")
    flair_volumes = []
    for s in ses.session_id:
        anat = bids / sub / s / "anat"
        for name in (f"{sub}_{s}_T1w", f"{sub}_{s}_ce-gadolinium_T1w", f"{sub}_{s}_FLAIR"):
            assert (anat / f"{name}.json").exists()
            shape, aff = _grid(anat / f"{name}.nii.gz")
            assert shape == ref[0] and np.allclose(aff, ref[1])
        les = bids / "derivatives" / "lesions" / sub / s / "anat"
        t1gd = np.asarray(nib.load(str(les / f"{sub}_{s}_space-T1w_desc-T1Gd_mask.nii.gz")).dataobj)
        flair = np.asarray(nib.load(str(les / f"{sub}_{s}_space-T1w_desc-FLAIR_mask.nii.gz")).dataobj)
        assert set(np.unique(flair)) <= {0, 1} and flair.sum() > 0
        assert (t1gd & ~flair.astype(bool)).sum() <= 0.05 * max(t1gd.sum(), 1)  # enhancing core inside oedema
        flair_volumes.append(int(flair.sum()))
    assert flair_volumes[-1] > flair_volumes[0]  # the tumour grows


def test_alzheimer_subject(cohort):
    bids, _, _ = cohort
    sub = "sub-ad01"
    ses = _sessions(bids, sub, "years")
    assert len(ses) >= 4 and ses["years"].iloc[0] == 0 and np.all(np.diff(ses["years"]) > 0)
    assert (bids / sub / "ses-01" / "anat" / f"{sub}_ses-01_T1w.nii.gz").exists()
    for s in ses.session_id:
        pet = bids / sub / s / "pet" / f"{sub}_{s}_trc-AV1451_pet"
        side = _json(pet.with_suffix(".json"))
        for key in ("TracerName", "TracerRadionuclide", "Units", "InjectedRadioactivity", "TimeZero",
                    "ScanStart", "InjectionStart", "FrameTimesStart", "FrameDuration", "ImageDecayCorrected",
                    "AttenuationCorrection", "ReconFilterType", "ReconFilterSize"):
            assert key in side
        assert nib.load(str(pet) + ".nii.gz").shape[:3] == _grid(bids / sub / "ses-01" / "anat" / f"{sub}_ses-01_T1w.nii.gz")[0]
    dwi = bids / sub / "ses-01" / "dwi" / f"{sub}_ses-01_dwi"
    img = nib.load(str(dwi) + ".nii.gz")
    bvals = np.loadtxt(str(dwi) + ".bval")
    bvecs = np.loadtxt(str(dwi) + ".bvec")
    assert img.ndim == 4 and img.shape[3] == bvals.size == bvecs.shape[1] >= 31 and bvecs.shape[0] == 3
    assert (bvals == 0).sum() == 1 and np.allclose(np.linalg.norm(bvecs[:, bvals > 0], axis=0), 1, atol=1e-5)
    data = np.asarray(img.dataobj, dtype=float)
    b0, dw = data[..., 0], data[..., bvals > 0].mean(-1)
    brain = b0 > 100
    assert brain.sum() > 100 and np.median(dw[brain] / b0[brain]) < 0.8  # diffusion attenuates the signal


def test_stroke_subject(cohort):
    bids, _, _ = cohort
    sub = "sub-stroke01"
    ses = _sessions(bids, sub, "hours_since_onset")
    assert list(ses.session_id) == ["ses-acute", "ses-followup"]
    assert 1 <= ses.hours_since_onset.iloc[0] <= 6 and ses.hours_since_onset.iloc[1] == 120
    cbf = np.asarray(nib.load(str(bids / sub / "ses-acute" / "perf" / f"{sub}_ses-acute_cbf.nii.gz")).dataobj)
    assert 15 < np.median(cbf[cbf > 5]) < 70
    les = bids / "derivatives" / "lesions" / sub
    core = np.asarray(nib.load(str(les / "ses-acute" / "anat" / f"{sub}_ses-acute_space-T1w_desc-infarct_mask.nii.gz")).dataobj)
    final = np.asarray(nib.load(str(les / "ses-followup" / "anat" / f"{sub}_ses-followup_space-T1w_desc-infarct_mask.nii.gz")).dataobj)
    assert final.sum() > 0 and final.sum() >= core.sum()
    assert np.all(final[core > 0] == 1)  # dead tissue stays dead
    assert np.median(cbf[final > 0]) < np.median(cbf[(cbf > 5) & (final == 0)])


def test_truth_inside_bids_is_refused(tmp_path):
    with pytest.raises(InputError, match="outside"):
        generate_cohort(tmp_path / "bids", tmp_path / "bids" / "derivatives" / "truth", glioma=1, sloppy=True)


def test_foreign_dataset_is_not_overwritten(tmp_path):
    (tmp_path / "bids").mkdir()
    (tmp_path / "bids" / "dataset_description.json").write_text('{"Name": "real patients", "BIDSVersion": "1.9.0"}')
    with pytest.raises(InputError, match="not written by neurohybrid synth"):
        generate_cohort(tmp_path / "bids", tmp_path / "truth", glioma=1, sloppy=True)


def test_cli_reports_bad_input(tmp_path, capsys):
    from neurohybrid.cli import main

    code = main(["synth", "--out", str(tmp_path / "b"), "--truth-out", str(tmp_path / "t"), "--sloppy"])
    assert code == 2
    assert "no subjects requested" in capsys.readouterr().err
