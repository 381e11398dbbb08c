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
