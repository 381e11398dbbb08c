"""Tissue segmentation: ANTs Atropos with template GM/WM/CSF priors warped into the subject.

Reproducibility: Atropos seeds its internal random number generator from the clock unless it is
given ``--use-random-seed 0`` (``-r 0``), and the posteriors then differ run to run (by up to
~0.02 on a 4 mm image, even twice in one process). ``ants.prior_based_segmentation`` does not
forward that option, so we call ``ants.atropos`` with the same arguments plus ``r=0``: Atropos
then uses its constant seed and the posteriors are identical run to run.
"""

from __future__ import annotations

import numpy as np

TISSUES = ("CSF", "GM", "WM")  # Atropos class order = prior order


def atropos_segment(t1_n4, mask, priors: dict, *, prior_weight: float = 0.25, mrf: float = 0.1,
                    iterations: int = 10) -> dict[str, np.ndarray]:
    """Probability maps {CSF, GM, WM} inside the brain mask (each an array on the subject grid).

    priors: ANTsImages on the subject grid keyed by tissue. prior_weight 0.25 lets the intensity
    model move boundaries while the priors keep the classes anatomically labelled.
    """
    import ants

    prior_list = [priors[t] for t in TISSUES]
    # Atropos needs priors that sum to <= 1 and are non-negative inside the mask
    stack = np.stack([p.numpy().clip(0, None) for p in prior_list])
    total = stack.sum(0)
    stack = np.where(total > 1, stack / np.maximum(total, 1e-6), stack)
    prior_list = [t1_n4.new_image_like(s.astype(np.float32)) for s in stack]
    # ants.prior_based_segmentation(t1_n4, prior_list, mask, prior_weight, mrf, iterations), plus
    # r=0: Atropos' constant internal seed instead of a clock-seeded one (see module docstring)
    nhood = "x".join(["1"] * t1_n4.dimension)
    seg = ants.atropos(a=t1_n4, m=f"[{mrf},{nhood}]", c=f"[{iterations},0]", i=prior_list, x=mask,
                       priorweight=prior_weight, r=0)
    m = mask.numpy() > 0
    return {t: np.where(m, p.numpy(), 0.0).clip(0, 1) for t, p in zip(TISSUES, seg["probabilityimages"])}
