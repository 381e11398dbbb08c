"""Structural connectome between DK parcels: dipy (default), MRtrix3 via nipype, or normative.

Endpoint assignment: tracking stops where anisotropy drops (grey matter), usually a voxel or two
short of the cortical label, so labels are first grown by ``SEARCH_RADIUS_VOX`` voxels into
unlabelled voxels (nearest label, like tck2connectome's ``-assignment_radial_search``); dipy's
``connectivity_matrix`` then counts streamlines by the labels under their two end points.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from neurohybrid.errors import InputError
from neurohybrid.io import load_image, write_json, write_tsv
from neurohybrid.io.tsv import read_connectome

SEARCH_RADIUS_VOX = 2.0
FA_STOP = 0.15
FA_SEED = 0.25


def grow_labels(labels: np.ndarray, radius_vox: float = SEARCH_RADIUS_VOX) -> np.ndarray:
    """Assign each unlabelled voxel within radius_vox of a label the nearest label."""
    dist, (ii, jj, kk) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    grown = labels[ii, jj, kk]
    return np.where((labels == 0) & (dist > radius_vox), 0, grown)


def _index_labels(dseg: np.ndarray, regions: pd.DataFrame) -> np.ndarray:
    """Atlas ids -> consecutive node indices 1..N in region-table order (0 = background)."""
    lut = np.zeros(int(max(dseg.max(), regions["id"].max())) + 1, dtype=np.int32)
    lut[regions["id"].to_numpy()] = np.arange(1, len(regions) + 1)
    return lut[dseg.astype(np.int64)]


def _on_grid(img: nib.Nifti1Image, ref: nib.Nifti1Image, interpolation: str, to_dwi=None) -> np.ndarray:
    """A T1w-grid image on the DWI grid: through the inverse of the DWI's rigid transform
    (`preprocess align`, which maps T1w points to DWI points) when given, else by world coordinates."""
    if to_dwi is not None:
        import ants

        from neurohybrid.preprocessing import ants_backend as ab

        interp = {"nearest": "genericLabel", "linear": "linear"}[interpolation]
        ref3 = nib.Nifti1Image(np.zeros(ref.shape[:3], np.float32), ref.affine)
        moving = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
        return ants.apply_transforms(ab.to_ants(ref3), ab.to_ants(moving), [str(to_dwi)], interpolator=interp,
                                     whichtoinvert=[True]).numpy()
    if img.shape[:3] == ref.shape[:3] and np.allclose(img.affine, ref.affine, atol=1e-3):
        return np.asarray(img.dataobj)
    from nilearn.image import resample_to_img

    return np.asarray(resample_to_img(img, nib.Nifti1Image(np.zeros(ref.shape[:3], np.uint8), ref.affine),
                                      interpolation=interpolation, force_resample=True, copy_header=True).dataobj)


def _load_dwi(nii, bval, bvec, subject):
    from dipy.core.gradients import gradient_table

    img = load_image(nii, subject=subject, ndim=4)
    try:
        bvals = np.loadtxt(bval, ndmin=1)
        bvecs = np.loadtxt(bvec, ndmin=2)
    except ValueError as exc:
        raise InputError(f"cannot read gradient table ({exc})", file=bval, subject=subject) from None
    if bvecs.shape[0] == 3 and bvecs.shape[1] != 3:
        bvecs = bvecs.T
    if len(bvals) != img.shape[3] or len(bvecs) != img.shape[3]:
        raise InputError(f"{img.shape[3]} volumes but {len(bvals)} b-values / {len(bvecs)} b-vectors",
                         file=nii, subject=subject)
    if not (bvals > 50).any() or not (bvals <= 50).any():
        raise InputError("DWI needs at least one b=0 and one diffusion-weighted volume", file=bval, subject=subject)
    return img, gradient_table(bvals, bvecs=bvecs)


def tensor_peaks(fit, mask, sphere=None):
    """Principal tensor eigenvectors as a dipy PeaksAndMetrics (one peak per voxel).

    peaks_from_model would evaluate the tensor ODF on every sphere vertex of every voxel (minutes
    on a brain); for a tensor the single peak is the principal eigenvector, so we snap it to the
    nearest sphere vertex directly.
    """
    from dipy.data import default_sphere
    from dipy.direction.peaks import PeaksAndMetrics

    sphere = sphere or default_sphere
    e1 = np.nan_to_num(fit.evecs[..., :, 0])  # (..., 3) principal direction
    fa = np.nan_to_num(fit.fa) * mask
    idx = np.argmax(np.abs(e1.reshape(-1, 3) @ sphere.vertices.T), axis=1).reshape(mask.shape)
    pam = PeaksAndMetrics()
    pam.sphere = sphere
    pam.peak_dirs = sphere.vertices[idx][..., None, :].astype(np.float64)
    pam.peak_values = fa[..., None].astype(np.float64)
    pam.peak_indices = np.where(mask, idx, -1)[..., None].astype(np.int32)
    pam.gfa = fa
    pam.qa = fa[..., None].astype(np.float64)
    pam.ang_thr = 60.0
    pam.qa_thr = 0.0
    pam.total_weight = 0.5
    pam.shm_coeff = None
    pam.odf = None
    return pam, fa


def dipy_streamlines(data, gtab, affine, mask, seed_mask, *, density=1, step_mm=0.5, seed=0):
    """Deterministic DTI tracking (EuDX on the principal eigenvector) seeded in seed_mask, stopping at FA < FA_STOP."""
    from dipy.reconst.dti import TensorModel
    from dipy.tracking import utils
    from dipy.tracking.local_tracking import LocalTracking
    from dipy.tracking.stopping_criterion import ThresholdStoppingCriterion
    from dipy.tracking.streamline import Streamlines

    fit = TensorModel(gtab).fit(data, mask=mask)
    pam, fa = tensor_peaks(fit, mask)
    seeds = utils.seeds_from_mask(seed_mask & (fa > FA_SEED), affine, density=density)
    if len(seeds) == 0:
        return Streamlines(), fa
    import warnings

    with warnings.catch_warnings():
        # the PeaksAndMetrics + LocalTracking route is deprecated in dipy 1.12 but still the
        # documented EuDX path; the replacement API changes between releases
        warnings.simplefilter("ignore", DeprecationWarning)
        tracker = LocalTracking(pam, ThresholdStoppingCriterion(fa, FA_STOP), seeds, affine, step_size=step_mm,
                                random_seed=seed)
        return Streamlines(tracker), fa


def count_connectivity(streamlines, labels_idx: np.ndarray, affine, n: int, min_length_mm: float = 5.0):
    """(counts, mean lengths in mm) between nodes 1..n from streamline end points (dipy)."""
    from dipy.tracking import utils
    from dipy.tracking.streamline import Streamlines, length

    streamlines = Streamlines([s for s in streamlines if len(s) > 1 and length(s) >= min_length_mm])
    counts = np.zeros((n, n))
    lengths = np.zeros((n, n))
    if len(streamlines) == 0:
        return counts, lengths
    mat, mapping = utils.connectivity_matrix(streamlines, affine, labels_idx.astype(np.int64), symmetric=True,
                                             return_mapping=True, mapping_as_streamlines=True)
    full = np.zeros((n + 1, n + 1))
    full[: mat.shape[0], : mat.shape[1]] = mat
    counts = full[1:, 1:]
    np.fill_diagonal(counts, 0.0)
    for (i, j), sl in mapping.items():
        if i == 0 or j == 0 or i == j:
            continue
        m = float(np.mean(list(length(sl))))
        lengths[i - 1, j - 1] = lengths[j - 1, i - 1] = m
    return counts, lengths


def dwi_connectome(nii, bval, bvec, dseg_img, wm_img, mask_img, regions, *, method="dipy", fast=False,
                   threads=None, subject=None, to_dwi=None) -> dict:
    dwi_img, gtab = _load_dwi(nii, bval, bvec, subject)
    dseg = np.rint(_on_grid(dseg_img, dwi_img, "nearest", to_dwi)).astype(np.int64)
    wm = _on_grid(wm_img, dwi_img, "linear", to_dwi) > 0.5
    mask = _on_grid(mask_img, dwi_img, "nearest", to_dwi) > 0
    if not mask.any():
        raise InputError("brain mask is empty on the DWI grid", file=nii, subject=subject)
    labels_idx = grow_labels(_index_labels(dseg, regions))
    n = len(regions)
    if method == "mrtrix":
        counts, lengths = mrtrix_connectome(nii, bval, bvec, labels_idx, dwi_img.affine, wm & mask,
                                            n=n, fast=fast, threads=threads, subject=subject)
        source = "dwi-mrtrix"
    else:
        data = np.asarray(dwi_img.dataobj, dtype=np.float32)
        seed_mask = wm & mask
        if fast:
            # sloppy mode: seed every other voxel along each axis (1/8 of the seeds)
            sub = np.zeros_like(seed_mask)
            sub[::2, ::2, ::2] = True
            seed_mask &= sub
        sl, _ = dipy_streamlines(data, gtab, dwi_img.affine, mask, seed_mask, density=1)
        counts, lengths = count_connectivity(sl, labels_idx, dwi_img.affine, n)
        source = "dwi-dipy"
    return {"weights": counts, "lengths": lengths, "names": list(regions["name"]), "source": source,
            "description": "streamline counts between DK parcels (end points, radial search "
                           f"{SEARCH_RADIUS_VOX:g} voxels); deterministic DTI tracking seeded in WM"}


def mrtrix_connectome(nii, bval, bvec, labels_idx, affine, seed_mask, *, n, fast, threads, subject):
    """tckgen (Tensor_Det) + tck2connectome (count, meanlength) through nipype's MRtrix3 interfaces."""
    if shutil.which("tckgen") is None or shutil.which("tck2connectome") is None:
        raise InputError("connectome method 'mrtrix' asked for but MRtrix3 (tckgen, tck2connectome) is not "
                         "on PATH (Debian: apt-get install mrtrix3)", file=nii, subject=subject)
    from nipype.interfaces import mrtrix3

    with tempfile.TemporaryDirectory(prefix="nh-mrtrix-") as work:
        work = Path(work)
        nib.save(nib.Nifti1Image(labels_idx.astype(np.int32), affine), work / "nodes.nii.gz")
        nib.save(nib.Nifti1Image(seed_mask.astype(np.uint8), affine), work / "seed.nii.gz")
        tck = mrtrix3.Tractography(
            in_file=str(nii), grad_fsl=(str(bvec), str(bval)), algorithm="Tensor_Det",
            seed_image=str(work / "seed.nii.gz"), select=2000 if fast else 20000,
            cutoff=FA_STOP, min_length=5.0, out_file=str(work / "tracks.tck"),
            nthreads=int(threads or 1))
        tck.run(cwd=str(work))
        out = {}
        radius_mm = SEARCH_RADIUS_VOX * float(np.mean(nib.affines.voxel_sizes(affine)))
        # nipype's BuildConnectome emits "-metric", which MRtrix 3.0.3 no longer has: counts are the
        # default edge value and mean length is "-scale_length -stat_edge mean", passed through args
        for metric, extra in (("count", ""), ("meanlength", " -scale_length -stat_edge mean")):
            conn = mrtrix3.BuildConnectome(
                in_file=str(work / "tracks.tck"), in_parc=str(work / "nodes.nii.gz"),
                zero_diagonal=True, out_file=str(work / f"{metric}.csv"), nthreads=int(threads or 1))
            conn.inputs.args = f"-assignment_radial_search {radius_mm:g} -symmetric{extra}"
            conn.run(cwd=str(work))
            m = np.loadtxt(work / f"{metric}.csv", delimiter=",", ndmin=2)
            full = np.zeros((n, n))
            k = min(n, m.shape[0])
            full[:k, :k] = m[:k, :k]
            out[metric] = full
    return out["count"], out["meanlength"]


def normative_for_subject(dseg_img, regions, *, csv=None, subject=None) -> dict:
    """The normative connectome on the subject's 83 DK regions (zero rows for regions it lacks)."""
    names = list(regions["name"])
    weights = np.zeros((len(names), len(names)))
    pos = {nm: i for i, nm in enumerate(names)}
    if csv is not None:
        w, src_names = read_connectome(csv, subject=subject)
        source = "normative-csv"
        csv_name = csv
    else:
        from neurohybrid.anatomy.connectomes import connectome_file, normative_connectome
        from neurohybrid.anatomy.resources import active_source

        w_all, all_names = normative_connectome()
        keep = [nm for nm in all_names if nm in pos]
        w, src_names = normative_connectome(names=keep)
        # evaluation scores kappa against the generator's only on the shipped connectome
        source = "normative" if active_source("connectome") == "shipped" else "normative-user"
        csv_name = connectome_file()
    unknown = [nm for nm in src_names if nm not in pos]
    if len(unknown) == len(src_names):
        raise InputError("none of the connectome's region names are DK region names", file=csv_name, subject=subject)
    idx_src = [i for i, nm in enumerate(src_names) if nm in pos]
    idx_dst = [pos[src_names[i]] for i in idx_src]
    weights[np.ix_(idx_dst, idx_dst)] = w[np.ix_(idx_src, idx_src)]
    # a region missing from this subject's parcellation cannot carry connections
    present = set(np.unique(np.asarray(dseg_img.dataobj)).astype(int))
    absent = [i for i, rid in enumerate(regions["id"]) if int(rid) not in present]
    weights[absent, :] = 0.0
    weights[:, absent] = 0.0
    return {"weights": weights, "lengths": None, "names": names, "source": source,
            "description": "normative DK-68 structural connectivity (tvb-data) mapped by region name"
                           if csv is None and source == "normative"
                           else f"user-supplied connectome {Path(csv or csv_name).name} mapped by region name",
            "unmapped": unknown}


def write_connectome(path: Path, result: dict) -> None:
    path = Path(path)
    names = result["names"]
    w = np.asarray(result["weights"], float)
    w = 0.5 * (w + w.T)
    write_tsv(path, pd.DataFrame(w, columns=names))
    side = {"Source": result["source"], "Description": result["description"], "Regions": len(names),
            "Atlas": "DK", "Weights": "streamline count" if result["source"].startswith("dwi") else "normative weight"}
    if result.get("lengths") is not None:
        lpath = path.with_name(path.name.replace("_connectivity.tsv", "_desc-meanlength_connectivity.tsv"))
        write_tsv(lpath, pd.DataFrame(np.asarray(result["lengths"], float), columns=names))
        side["MeanLengthFile"] = lpath.name
    if result.get("unmapped"):
        side["UnmappedRegions"] = result["unmapped"]
    write_json(path.with_suffix("").with_suffix(".json"), side)
