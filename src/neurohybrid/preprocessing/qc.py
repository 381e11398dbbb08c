"""Per-subject QC figure: registration overlay, tissue segmentation, parcellation (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neurohybrid.io import atomic_path


def _slices(vol):
    cx, cy, cz = (s // 2 for s in vol.shape)
    return [np.rot90(vol[cx, :, :]), np.rot90(vol[:, cy, :]), np.rot90(vol[:, :, cz])]


def qc_figure(path: Path, *, t1: np.ndarray, brain_mask: np.ndarray, template_gm: np.ndarray,
              probs: dict[str, np.ndarray], dseg: np.ndarray, title: str) -> None:
    """Three rows (registration, segmentation, parcellation) x sagittal/coronal/axial mid-slices.

    Row 1 draws the template GM/WM boundary (template GM warped to the subject, contour at 0.5)
    and the brain-mask outline over the N4-corrected T1w: misregistration shows as contours off
    the subject's own boundaries.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    vmax = np.percentile(t1[brain_mask > 0], 99) if brain_mask.any() else t1.max()
    tissue = np.argmax(np.stack([np.zeros_like(probs["GM"]) + 1e-3, probs["CSF"], probs["GM"], probs["WM"]]), 0)
    tissue = np.where(brain_mask > 0, tissue, 0)
    rng = np.random.default_rng(0)
    lut = ListedColormap(np.vstack([[0, 0, 0, 0], np.c_[rng.uniform(0.2, 1, (int(dseg.max()) or 1, 3)), np.ones(int(dseg.max()) or 1)]]))
    tis_lut = ListedColormap([[0, 0, 0, 0], [0.2, 0.4, 1, 0.6], [1, 0.6, 0.1, 0.6], [0.9, 0.9, 0.9, 0.6]])
    fig, axes = plt.subplots(3, 3, figsize=(9, 9), dpi=80)
    for col, (t, m, g, s, d) in enumerate(zip(_slices(t1), _slices(brain_mask), _slices(template_gm),
                                              _slices(tissue), _slices(dseg))):
        for row in range(3):
            axes[row, col].imshow(t, cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
            axes[row, col].axis("off")
        axes[0, col].contour(g, levels=[0.5], colors="lime", linewidths=0.6)
        axes[0, col].contour(m, levels=[0.5], colors="red", linewidths=0.6)
        axes[1, col].imshow(s, cmap=tis_lut, vmin=0, vmax=3, interpolation="nearest")
        axes[2, col].imshow(np.where(d > 0, d, 0), cmap=lut, vmin=0, vmax=max(int(dseg.max()), 1),
                            interpolation="nearest", alpha=0.7)
    axes[0, 0].set_title("registration: template GM (green), brain mask (red)", loc="left", fontsize=8)
    axes[1, 0].set_title("segmentation: CSF blue, GM orange, WM white", loc="left", fontsize=8)
    axes[2, 0].set_title("parcellation: DK atlas", loc="left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def align_qc_figure(path: Path, a_ref, images: dict, transforms: dict, *, sub: str, ses: str,
                    lesions: dict, resolve, load) -> Path:
    """One session after within-subject alignment, on the reference T1w grid: a row per image
    (sagittal/coronal/axial mid-slices). Row 1: the session's T1w with the reference T1w's outline
    (green; a misregistered visit shows as an offset); other rows: the modality (hot, 50 % opacity)
    over the session's T1w, both brought onto the reference grid by their saved transforms.
    Lesion masks are outlined in cyan on every row (through the transform of the image they were
    drawn on): a mask off its lesion shows a wrong mask grid or transform. ``load(image)`` reads
    an image as 3D (align passes its own reader, which turns DWI into its mean b0).
    """
    import ants
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neurohybrid.preprocessing import ants_backend as ab

    def on_ref(img, xfm, interpolator="linear"):
        moving = ab.to_ants(img)
        if xfm is None:
            return ants.resample_image_to_target(moving, a_ref, interp_type=interpolator).numpy()
        return ants.apply_transforms(a_ref, moving, [str(xfm)], interpolator=interpolator).numpy()

    ref = a_ref.numpy()
    t1 = on_ref(load(images["T1w"]), transforms.get("T1w")) if "T1w" in images else ref
    outline = ref > 0.3 * np.percentile(ref[ref > 0], 98) if (ref > 0).any() else ref > 0
    masks = []
    for mpath in lesions.values():
        masks.append(on_ref(nib_image(mpath), resolve(mpath), "nearestNeighbor") > 0.5)
    lesion = np.any(masks, axis=0) if masks else None
    rows = [("T1w", None)] + [(label, on_ref(load(im), transforms[label]))
                              for label, im in images.items() if label != "T1w"]
    vmax = np.percentile(t1[t1 > 0], 99) if (t1 > 0).any() else 1.0
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), dpi=70, squeeze=False)
    for r, (label, over) in enumerate(rows):
        for c, (bg, ol) in enumerate(zip(_slices(t1), _slices(outline))):
            ax = axes[r, c]
            ax.imshow(bg, cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
            if over is None:
                ax.contour(ol, levels=[0.5], colors="lime", linewidths=0.6)
            else:
                sl = _slices(over)[c]
                top = np.percentile(over[over > 0], 99) if (over > 0).any() else 1.0
                ax.imshow(np.ma.masked_less_equal(sl, 0.05 * top), cmap="hot", vmin=0, vmax=top, alpha=0.5,
                          interpolation="nearest")
            if lesion is not None:
                ax.contour(_slices(lesion)[c], levels=[0.5], colors="cyan", linewidths=0.6)
            ax.axis("off")
        axes[r, 0].set_title(f"{label}" + (" (green: reference T1w outline)" if over is None else " over T1w"),
                             loc="left", fontsize=8)
    fig.suptitle(f"sub-{sub} ses-{ses}: within-subject alignment (reference T1w grid)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def nib_image(path):
    import nibabel as nib

    img = nib.load(str(path))
    return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
