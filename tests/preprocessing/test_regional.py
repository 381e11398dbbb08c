"""Alzheimer's subjects with regional SUVR tables instead of PET images: the tables go straight to
the model inputs, which equal those of the same regional values reached through the image steps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neurohybrid.anatomy.atlas import load_dk_atlas
from neurohybrid.cli import main
from neurohybrid.disorders.alzheimer.inputs import build_inputs
from neurohybrid.errors import InputError
from neurohybrid.io import save_volume, write_tsv
from neurohybrid.preprocessing.layout import Derivatives
from neurohybrid.preprocessing.parcellation import regional_volumes
from neurohybrid.preprocessing.pipeline import run_connectome
from neurohybrid.preprocessing.regional import has_tables, run_regional

SUB = "ad01"
SESSIONS = [("bl", 0.0), ("m12", 1.0), ("m24", 2.1)]


def adni_name(region: str) -> str:
    """ADNI/FreeSurfer-style column names: L_precuneus -> CTX_LH_PRECUNEUS."""
    side, _, label = region.partition("_")
    return f"CTX_{ {'L': 'LH', 'R': 'RH'}[side]}_{label.upper()}" if label else region.upper()


@pytest.fixture(scope="module")
def imaged(tmp_path_factory):
    """A subject whose image steps ran: DK labels on its grid, regional volumes and SUVR per visit
    (the files `preprocess anat` / `pet` write), and the normative connectome (`preprocess connectome`)."""
    root = tmp_path_factory.mktemp("imaged")
    bids, preproc = root / "bids", root / "preproc"
    for ses, _ in SESSIONS:
        (bids / f"sub-{SUB}" / f"ses-{ses}" / "anat").mkdir(parents=True)
    (bids / f"sub-{SUB}" / f"sub-{SUB}_sessions.tsv").write_text(
        "session_id\tyears\n" + "".join(f"ses-{s}\t{y}\n" for s, y in SESSIONS))
    labels, regions = load_dk_atlas(2.0)
    d = Derivatives(preproc, SUB)
    save_volume(d.dseg, np.asarray(labels.dataobj), labels.affine)
    volumes = regional_volumes(np.asarray(labels.dataobj), 8.0, regions)
    assert (volumes["volume_mm3"] > 0).all()  # every region on the subject grid
    write_tsv(d.volumes, volumes)
    rng = np.random.default_rng(0)
    suvr = {}
    for i, (ses, _) in enumerate(SESSIONS):
        suvr[ses] = 1.0 + 0.2 * i + 0.3 * rng.random(len(regions))
        write_tsv(d.suvr(ses), pd.DataFrame({"region": regions["name"], "suvr": suvr[ses]}))
    run_connectome(bids, SUB, preproc, method="normative")
    inputs, target = build_inputs(SUB, bids, preproc, {})
    return root, regions, volumes, suvr, inputs, target


def _tables_bids(root, name):
    """A copy of the raw BIDS (sessions only) to add regional tables to."""
    bids = root / name
    (bids / f"sub-{SUB}").mkdir(parents=True)
    (bids / f"sub-{SUB}" / f"sub-{SUB}_sessions.tsv").write_text(
        "session_id\tyears\n" + "".join(f"ses-{s}\t{y}\n" for s, y in SESSIONS))
    return bids


def _assert_same_inputs(a, b):
    assert a.meta == b.meta
    assert set(a.arrays) == set(b.arrays)
    for key in a.arrays:
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key], err_msg=key)


def test_a_long_table_with_adni_names_gives_the_image_inputs(imaged, tmp_path):
    root, regions, volumes, suvr, inputs, target = imaged
    bids = _tables_bids(tmp_path, "bids")
    rows = []
    for ses, _ in SESSIONS:
        for name, value, vol in zip(regions["name"], suvr[ses], volumes["volume_mm3"]):
            rows.append({"visit": ses, "region": adni_name(name), "suvr": repr(float(value)), "volume_mm3": vol})
        # composite and reference regions in an ADNI export, which the mapping does not list
        rows.append({"visit": ses, "region": "META_TEMPORAL", "suvr": "1.7", "volume_mm3": 1.0})
    folder = bids / "derivatives" / "regional" / f"sub-{SUB}"
    folder.mkdir(parents=True)
    pd.DataFrame(rows).sample(frac=1.0, random_state=1).to_csv(folder / f"sub-{SUB}_desc-suvr_pet.tsv", sep="\t", index=False)
    mapping = tmp_path / "adni_to_dk.tsv"
    pd.DataFrame({"source": [adni_name(n) for n in regions["name"]], "region": regions["name"]}).to_csv(
        mapping, sep="\t", index=False)
    assert has_tables(bids, SUB)

    preproc = tmp_path / "preproc"
    assert main(["preprocess", "regional", "--bids", str(bids), "--subject", SUB, "--out", str(preproc),
                 "--mapping", str(mapping)]) == 0
    inputs_t, target_t = build_inputs(SUB, bids, preproc, {})
    _assert_same_inputs(inputs, inputs_t)
    _assert_same_inputs(target, target_t)


def test_per_visit_tables_with_atlas_names_and_no_volumes(imaged, tmp_path):
    """Per-visit files, atlas names, no mapping: SUVR and connectome as from the images; volumes the atlas's."""
    root, regions, volumes, suvr, inputs, _ = imaged
    bids = _tables_bids(tmp_path, "bids")
    for ses, _ in SESSIONS:
        pet = bids / "derivatives" / "regional" / f"sub-{SUB}" / f"ses-{ses}" / "pet"
        pet.mkdir(parents=True)
        pd.DataFrame({"region": regions["name"], "suvr": suvr[ses]}).to_csv(
            pet / f"sub-{SUB}_ses-{ses}_desc-suvr_pet.tsv", sep="\t", index=False)
    preproc = tmp_path / "preproc"
    run_regional(bids, SUB, preproc)
    inputs_t, _ = build_inputs(SUB, bids, preproc, {})
    for key in ("suvr", "years", "connectome", "centroids"):
        np.testing.assert_array_equal(inputs_t.arrays[key], inputs.arrays[key], err_msg=key)
    # no volumes in the tables: the atlas's own (1 mm grid), close to the subject's here (the same atlas at 2 mm)
    ratio = inputs_t.arrays["volumes"] / inputs.arrays["volumes"]
    assert np.all(np.abs(ratio - 1.0) < 0.35) and np.median(np.abs(ratio - 1.0)) < 0.05


@pytest.mark.parametrize("case, message", [
    ("unknown region", "1 region name(s) are not atlas regions"),
    ("unknown visit", "visit 'm36' is not a session of sub-ad01_sessions.tsv"),
    ("non-positive suvr", "suvr must be a positive number in every row; region L_bankssts has '-1.0'"),
    ("duplicate region", "region(s) listed twice in one visit: L_bankssts"),
    ("no session column", "long regional table needs a 'session_id' (or 'visit') column"),
])
def test_bad_tables_stop_with_one_clear_error(imaged, tmp_path, case, message):
    _, regions, _, suvr, _, _ = imaged
    bids = _tables_bids(tmp_path, "bids")
    table = pd.concat([pd.DataFrame({"session_id": f"ses-{ses}", "region": regions["name"], "suvr": suvr[ses]})
                       for ses, _ in SESSIONS], ignore_index=True)
    if case == "unknown region":
        table.loc[0, "region"] = "L_notaregion"
    elif case == "unknown visit":
        table.loc[table["session_id"] == "ses-m24", "session_id"] = "m36"
    elif case == "non-positive suvr":
        table.loc[0, "suvr"] = -1.0
    elif case == "duplicate region":
        table.loc[1, "region"] = table.loc[0, "region"]
    else:
        table = table.drop(columns=["session_id"])
    folder = bids / "derivatives" / "regional" / f"sub-{SUB}"
    folder.mkdir(parents=True)
    path = folder / f"sub-{SUB}_desc-suvr_pet.tsv"
    table.to_csv(path, sep="\t", index=False)
    with pytest.raises(InputError) as err:
        run_regional(bids, SUB, tmp_path / "preproc")
    assert message in str(err.value) and str(path) in str(err.value) and "subject ad01" in str(err.value)


def test_a_mapping_may_not_merge_regions(tmp_path):
    from neurohybrid.preprocessing.regional import read_mapping

    path = tmp_path / "map.tsv"
    path.write_text("source\tregion\nA\tL_precuneus\nB\tL_precuneus\n")
    with pytest.raises(InputError, match="mapped from more than one source name: L_precuneus"):
        read_mapping(path)
