import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from neurohybrid.errors import InputError
from neurohybrid.io import atomic_path, load_volume, save_volume, write_tsv
from neurohybrid.io.tsv import read_connectome


def _save(path, data, affine=None):
    affine = np.eye(4) if affine is None else affine
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_load_volume_roundtrip(tmp_path):
    data = np.random.default_rng(0).random((4, 5, 6))
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    save_volume(tmp_path / "a.nii.gz", data, affine)
    loaded, aff = load_volume(tmp_path / "a.nii.gz", value_range=(0, 1))
    np.testing.assert_allclose(loaded, data, rtol=1e-6)
    np.testing.assert_allclose(aff, affine)


@pytest.mark.parametrize(
    "data, affine, message",
    [
        (np.full((3, 3, 3), np.nan), np.eye(4), "NaN"),
        (np.zeros((3, 3, 3, 2)), np.eye(4), "expected a 3D image"),
    ],
)
def test_bad_images_name_subject_and_file(tmp_path, data, affine, message):
    path = _save(tmp_path / "bad.nii.gz", data.astype(np.float32), affine)
    with pytest.raises(InputError) as err:
        load_volume(path, subject="01")
    text = str(err.value)
    assert message in text and "subject 01" in text and "bad.nii.gz" in text


def test_singular_affine(tmp_path):
    # nibabel refuses to write a singular affine, so patch the header bytes of a valid file:
    # NIfTI-1 keeps qform_code at byte 252 and srow_y (4 float32) at byte 296.
    path = tmp_path / "singular.nii"
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), np.eye(4)), str(path))
    raw = bytearray(path.read_bytes())
    raw[252:254] = np.int16(0).tobytes()
    raw[296:312] = np.zeros(4, np.float32).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="singular"):
        load_volume(path, subject="01")


def test_corrupt_and_missing_files(tmp_path):
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not a nifti at all")
    with pytest.raises(InputError, match="cannot read NIfTI"):
        load_volume(corrupt)
    with pytest.raises(InputError, match="file not found"):
        load_volume(tmp_path / "missing.nii.gz")


def test_value_range_checked(tmp_path):
    path = _save(tmp_path / "p.nii.gz", np.full((2, 2, 2), 1.5, np.float32))
    with pytest.raises(InputError, match=r"values must lie in \[0, 1\]"):
        load_volume(path, value_range=(0, 1))


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.tsv"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    write_tsv(target, pd.DataFrame({"a": [1, None]}))
    assert target.read_text() == "a\n1.0\nn/a\n"
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600


def test_read_connectome_checks(tmp_path):
    names = ["A", "B", "C"]
    w = np.array([[0, 1, 2], [1, 0, 3], [2, 3, 0]], float)
    good = tmp_path / "c.csv"
    pd.DataFrame(w, columns=names).to_csv(good, index=False)
    weights, got = read_connectome(good)
    assert got == names and np.array_equal(weights, w)

    asym = tmp_path / "asym.csv"
    w2 = w.copy()
    w2[0, 1] = 5
    pd.DataFrame(w2, columns=names).to_csv(asym, index=False)
    with pytest.raises(InputError, match="not symmetric"):
        read_connectome(asym)

    rect = tmp_path / "rect.csv"
    pd.DataFrame(w[:, :2], columns=names[:2]).to_csv(rect, index=False)
    with pytest.raises(InputError, match="must be square"):
        read_connectome(rect)

    dup = tmp_path / "dup.csv"
    dup.write_text("A,B,A\n0,1,2\n1,0,3\n2,3,0\n")
    with pytest.raises(InputError, match="repeated column name.*A") as err:
        read_connectome(dup, subject="ad01")
    assert "dup.csv" in str(err.value) and "ad01" in str(err.value)


def test_zero_voxel_size_without_affine_is_refused(tmp_path):
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), None)
    img.header["pixdim"][1:4] = [2.0, 0.0, 2.0]
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    path = tmp_path / "p0.nii.gz"
    nib.save(img, str(path))
    with pytest.raises(InputError, match="voxel size undefined") as err:
        load_volume(path, subject="g01")
    assert "p0.nii.gz" in str(err.value)
    # the same pixdims set, without qform/sform: read as stored
    img.header["pixdim"][1:4] = [2.0, 2.0, 2.0]
    nib.save(img, str(path))
    _, affine = load_volume(path)
    assert np.allclose(np.abs(np.diag(affine))[:3], 2.0)
