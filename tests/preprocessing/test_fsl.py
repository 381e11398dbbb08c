"""FSL backend: exact fslpy (fsl.wrappers) command lines, clear error without FSL, end-to-end run on
stub tools.

FSL cannot be installed here, so the tests replace each FSL executable by a stub (fsl_stub.py) in
a fake $FSLDIR/bin, which writes the files FSL would write with identity transforms. This
exercises FSL detection, every wrapper call, file naming and our pipeline around them; it does
not check FSL's numerical results.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("fsl.wrappers", reason="fslpy not installed (pinned in envs/requirements.lock)")

from neurohybrid.errors import InputError
from neurohybrid.preprocessing import fsl_backend as fb
from neurohybrid.preprocessing.pipeline import run_anat, run_lesions

HERE = Path(__file__).parent


def _img(path):
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), path)
    return path


def test_command_lines(tmp_path, monkeypatch, stub_fsl):
    """The exact FSL calls fslpy's wrappers build from our settings (cmdonly: nothing runs)."""
    monkeypatch.chdir(tmp_path)
    t = {n: _img(tmp_path / f"{n}.nii.gz") for n in ("t1", "tpl", "w", "coef", "dk")}
    (tmp_path / "a.mat").write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    p = str(tmp_path)
    b = os.environ["FSLDIR"] + "/bin"

    def line(cmd):
        return " ".join(cmd).replace(b + "/", "")

    assert line(fb.bet(t["t1"], tmp_path / "brain.nii.gz", cmdonly=True)) == \
        f"bet {p}/t1.nii.gz {p}/brain.nii.gz -m -R -f 0.5"
    assert line(fb.fast(t["t1"], tmp_path / "fast", cmdonly=True)) == f"fast --out={p}/fast --class=3 -t 1 -B {p}/t1.nii.gz"
    assert line(fb.flirt(t["t1"], t["tpl"], tmp_path / "fl.nii.gz", tmp_path / "o.mat", in_weight=t["w"], cmdonly=True)) == (
        f"flirt -in {p}/t1.nii.gz -ref {p}/tpl.nii.gz -out {p}/fl.nii.gz -omat {p}/o.mat -dof 12 -cost corratio "
        f"-searchrx -30 30 -searchry -30 30 -searchrz -30 30 -interp trilinear -inweight {p}/w.nii.gz")
    assert line(fb.fnirt(t["t1"], t["tpl"], tmp_path / "a.mat", tmp_path / "c.nii.gz", tmp_path / "wf.nii.gz",
                         inmask_file=t["w"], refmask_file=t["w"], cmdonly=True)) == (
        f"fnirt --in={p}/t1.nii.gz --ref={p}/tpl.nii.gz --aff={p}/a.mat --cout={p}/c.nii.gz --iout={p}/wf.nii.gz "
        f"--subsamp=4,2,1,1 --miter=5,5,5,5 --intmod=global_non_linear_with_bias --logout={p}/fnirt_log.txt "
        f"--inmask={p}/w.nii.gz --refmask={p}/w.nii.gz --lambda=300,75,30,30")
    assert line(fb.invwarp(t["coef"], t["t1"], tmp_path / "inv.nii.gz", cmdonly=True)) == \
        f"invwarp --warp={p}/coef.nii.gz --ref={p}/t1.nii.gz --out={p}/inv.nii.gz"
    assert line(fb.applywarp(t["dk"], t["t1"], t["coef"], tmp_path / "o.nii.gz", interp="nn", cmdonly=True)) == \
        f"applywarp --in={p}/dk.nii.gz --ref={p}/t1.nii.gz --out={p}/o.nii.gz --warp={p}/coef.nii.gz --interp=nn"
    assert line(fb.invert_matrix(tmp_path / "a.mat", tmp_path / "i.mat", cmdonly=True)) == \
        f"convert_xfm -omat {p}/i.mat -inverse {p}/a.mat"


def _subject_in_template_space(root: Path, vox=8.0):
    from neurohybrid.anatomy.templates import load_template

    t1 = load_template("t1", vox)
    anat = root / "sub-01" / "ses-1" / "anat"
    anat.mkdir(parents=True)
    nib.save(t1, anat / "sub-01_ses-1_T1w.nii.gz")
    les = root / "derivatives/lesions/sub-01/ses-1/anat"
    les.mkdir(parents=True)
    m = np.zeros(t1.shape, np.uint8)
    m[10:13, 14:17, 10:13] = 1
    nib.save(nib.Nifti1Image(m, t1.affine), les / "sub-01_ses-1_space-T1w_desc-infarct_mask.nii.gz")
    return t1, m


def test_fsl_requested_but_absent_is_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("FSLDIR", raising=False)
    _subject_in_template_space(tmp_path / "bids")
    with pytest.raises(InputError, match="FSLDIR is not set") as exc:
        run_anat(tmp_path / "bids", "01", tmp_path / "out", backend="fsl", model_voxel_mm=8.0)
    assert exc.value.subject == "01"
    assert not (tmp_path / "out" / "sub-01").exists()


@pytest.fixture
def stub_fsl(tmp_path, monkeypatch):
    bindir = tmp_path / "fslstub" / "bin"
    bindir.mkdir(parents=True)
    (tmp_path / "fslstub" / "etc").mkdir()
    (tmp_path / "fslstub" / "etc" / "fslversion").write_text("6.0.7\n")
    for tool in fb.TOOLS:
        exe = bindir / tool
        exe.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(HERE)!r})\n"
                       "import fsl_stub\nfsl_stub.main()\n")
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("FSLDIR", str(tmp_path / "fslstub"))
    monkeypatch.setenv("FSLOUTPUTTYPE", "NIFTI_GZ")
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    log = tmp_path / "fsl_calls.log"
    monkeypatch.setenv("FSL_STUB_LOG", str(log))
    return log


def test_fsl_pipeline_runs_on_stub_tools(tmp_path, stub_fsl):
    from neurohybrid.anatomy.atlas import load_dk_atlas

    t1, lesion = _subject_in_template_space(tmp_path / "bids")
    out = tmp_path / "out"
    run_anat(tmp_path / "bids", "01", out, backend="fsl", model_voxel_mm=8.0)
    calls = [line.split()[0] for line in stub_fsl.read_text().splitlines()]
    assert set(calls) == set(fb.TOOLS)
    flirt_call = [line for line in stub_fsl.read_text().splitlines() if line.startswith("flirt")][0]
    assert "-inweight" in flirt_call  # cost-function masking reaches FLIRT
    a = out / "sub-01" / "anat"
    dseg = np.asarray(nib.load(a / "sub-01_atlas-DK_dseg.nii.gz").dataobj)
    mask = nib.load(a / "sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
    dk, _ = load_dk_atlas(8.0)
    # identity stub transforms: the atlas comes back unchanged inside the brain mask
    assert np.array_equal(dseg, np.where(mask, np.asarray(dk.dataobj), 0))
    assert "FSL" in (a / "sub-01_from-T1w_to-MNI152NLin2009cSym_mode-image_xfm.json").read_text()
    for t in ("GM", "WM", "CSF"):
        assert (a / f"sub-01_label-{t}_probseg.nii.gz").exists()
    assert (out / "sub-01" / "figures" / "sub-01_desc-qc.png").exists()
    # later steps use applywarp with the saved FNIRT coefficients
    run_lesions(tmp_path / "bids", "01", out, model_voxel_mm=8.0)
    m = nib.load(out / "sub-01/ses-1/anat/sub-01_ses-1_space-MNI152NLin2009cSym_res-model_desc-infarct_mask.nii.gz")
    assert np.array_equal(m.get_fdata() > 0, lesion > 0)
