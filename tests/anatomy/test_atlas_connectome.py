import numpy as np
import pytest

from neurohybrid.anatomy.atlas import load_dk_atlas, canonical_name
from neurohybrid.anatomy.connectomes import normative_connectome
from neurohybrid.anatomy.templates import load_template
from neurohybrid.errors import InputError


@pytest.fixture(scope="module")
def atlas4():
    return load_dk_atlas(voxel_mm=4)


def test_region_table_has_83_canonical_unique_names(atlas4):
    _, table = atlas4
    assert list(table.columns) == ["id", "name", "label", "hemisphere", "structure"]
    assert len(table) == 83
    assert table["name"].is_unique
    assert "L_bankssts" in set(table["name"]) and "R_thalamusproper" in set(table["name"])
    assert "brainstem" in set(table["name"])
    for name, hemi, label in zip(table["name"], table["hemisphere"], table["label"]):
        assert name == (f"{hemi}_{label}" if hemi in ("L", "R") else label)
    assert (table["structure"] == "cortex").sum() == 68


def test_labels_on_template_grid_and_inside_brain(atlas4):
    img, table = atlas4
    template = load_template("t1", 4)
    assert img.shape == template.shape
    np.testing.assert_allclose(img.affine, template.affine)
    labels = np.asarray(img.dataobj)
    present = set(np.unique(labels)) - {0}
    # at 4 mm a few tiny regions may vanish; nearly all must survive and none may be foreign
    assert present <= set(table["id"])
    assert len(present) >= 80
    brain = np.asarray(load_template("brain", 4).dataobj) > 0
    inside = brain[labels > 0].mean()
    assert inside > 0.95


def test_world_alignment_left_right():
    # resampling in world coordinates: left-hemisphere labels must lie at x < 0 (RAS)
    img, table = load_dk_atlas(voxel_mm=4)
    labels = np.asarray(img.dataobj)
    ijk = np.argwhere(labels > 0)
    xyz = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    ids = labels[labels > 0]
    left = table.loc[table.hemisphere == "L", "id"].to_numpy()
    right = table.loc[table.hemisphere == "R", "id"].to_numpy()
    assert np.mean(xyz[np.isin(ids, left), 0] < 0) > 0.98
    assert np.mean(xyz[np.isin(ids, right), 0] > 0) > 0.98


def test_reference_grid_is_used():
    import nibabel as nib

    ref = nib.Nifti1Image(np.zeros((20, 24, 20), np.float32), np.diag([8.0, 8.0, 8.0, 1.0]) + np.array(
        [[0, 0, 0, -80], [0, 0, 0, -110], [0, 0, 0, -70], [0, 0, 0, 0]]))
    img, _ = load_dk_atlas(reference=ref)
    assert img.shape == ref.shape
    np.testing.assert_allclose(img.affine, ref.affine)
    assert (np.asarray(img.dataobj) > 0).sum() > 100


def test_canonical_name():
    assert canonical_name("insula", "l") == "L_insula"
    assert canonical_name("brainstem", "B") == "brainstem"


def test_normative_connectome_symmetric_nonnegative_and_named():
    weights, names = normative_connectome()
    assert weights.shape == (68, 68)
    assert np.all(weights >= 0) and np.allclose(weights, weights.T)
    assert np.all(np.diag(weights) == 0)
    assert (weights > 0).mean() > 0.1
    _, table = load_dk_atlas(voxel_mm=4)
    cortical = set(table.loc[table.structure == "cortex", "name"])
    assert set(names) == cortical
    assert "R_lateralorbitofrontal" in names


def test_normative_connectome_reorders_by_names():
    weights, names = normative_connectome()
    pick = ["L_insula", "R_insula", "L_entorhinal"]
    sub, got = normative_connectome(pick)
    assert got == pick
    idx = [names.index(n) for n in pick]
    np.testing.assert_array_equal(sub, weights[np.ix_(idx, idx)])
    with pytest.raises(InputError, match="L_nowhere"):
        normative_connectome(["L_nowhere"])


def test_cerebellar_reference_mask_is_posterior_inferior_gm():
    from neurohybrid.anatomy.atlas import cerebellar_reference_mask

    mask = cerebellar_reference_mask(4)
    data = np.asarray(mask.dataobj) > 0
    volume_ml = data.sum() * 64 / 1000
    assert 60 < volume_ml < 250
    xyz = np.argwhere(data) @ mask.affine[:3, :3].T + mask.affine[:3, 3]
    assert xyz[:, 1].max() < -40 and xyz[:, 2].max() < -25
    labels, _ = load_dk_atlas(voxel_mm=4)
    assert not np.any(np.asarray(labels.dataobj)[data])
