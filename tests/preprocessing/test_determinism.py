"""The ANTs stages of `preprocess anat` give identical bytes in two fresh processes.

Two processes, started with different environments (as a local run and a Slurm job would be:
ITK/OpenMP thread variables unset in one, set to 2 in the other, Slurm variables), each run N4,
the template registration (FAST schedule), warp the tissue priors and run Atropos on the same
tiny (8 mm) image, with the one ITK thread the workflow rules ask for. Every array must be equal.
Before the fix, Atropos seeded its random generator from the clock and the posteriors differed
between the processes (by ~1e-4 here, ~0.02 on a 4 mm subject).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

VOX = 8.0


def stages(out: Path) -> None:
    """Run in a child process: N4 -> registration -> warped priors -> Atropos; save every array."""
    import nibabel as nib

    from neurohybrid.anatomy.templates import load_template
    from neurohybrid.preprocessing import ants_backend as ab
    from neurohybrid.preprocessing.segmentation import TISSUES, atropos_segment

    ab.set_threads(1)  # what `neurohybrid preprocess anat --threads 1` (the rule) does first
    t1 = load_template("t1", VOX)
    rng = np.random.default_rng(0)
    x = np.linspace(-1, 1, t1.shape[0])[:, None, None]
    data = np.clip(t1.get_fdata() * (1 + 0.2 * x) + rng.normal(0, 2, t1.shape), 0, None)  # bias field + noise
    subject = ab.to_ants(nib.Nifti1Image(data.astype(np.float32), t1.affine))
    n4 = ab.n4(subject)
    with tempfile.TemporaryDirectory() as work:
        reg = ab.register(n4, ab.to_ants(t1), sched=ab.FAST, outprefix=f"{work}/reg_")
        warped = ab.apply(ab.to_ants(load_template("brain", VOX)), n4, reg.forward)
        mask = n4.new_image_like((warped.numpy() > 0.5).astype(np.float32))
        priors = {t: ab.apply(ab.to_ants(load_template(t.lower(), VOX)), n4, reg.forward) for t in TISSUES}
    probs = atropos_segment(n4, mask, priors, iterations=5)
    import ants

    # the library's own prior-based segmentation (clock-seeded): the same model up to seed noise
    ref = ants.prior_based_segmentation(n4, [priors[t] for t in TISSUES], mask, 0.25, 0.1, 5)
    m = mask.numpy() > 0
    np.savez(out, n4=n4.numpy(), mask=mask.numpy(), **{f"prior_{t}": p.numpy() for t, p in priors.items()},
             **{f"posterior_{t}": p for t, p in probs.items()},
             **{f"library_{t}": np.where(m, p.numpy(), 0.0).clip(0, 1)
                for t, p in zip(TISSUES, ref["probabilityimages"])})


def test_anat_stages_identical_in_two_processes(tmp_path):
    base = {k: v for k, v in os.environ.items()
            if k not in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "NSLOTS", "OMP_NUM_THREADS")}
    slurm_like = {**base, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "2", "NSLOTS": "2", "OMP_NUM_THREADS": "2",
                  "SLURM_JOB_ID": "1", "SLURM_CPUS_ON_NODE": "2", "TMPDIR": str(tmp_path)}
    outs = [tmp_path / "a.npz", tmp_path / "b.npz"]
    procs = [subprocess.Popen([sys.executable, __file__, str(out)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for out, env in zip(outs, (base, slurm_like))]
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log[-3000:]
    with np.load(outs[0]) as a, np.load(outs[1]) as b:
        assert sorted(a.files) == sorted(b.files)
        assert a["mask"].sum() > 1000  # a real brain mask, not an empty run
        for key in a.files:
            if not key.startswith("library_"):
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        for t in ("CSF", "GM", "WM"):
            assert a[f"posterior_{t}"].max() > 0.5, t
            # our call is ants.prior_based_segmentation's with a constant seed: same model
            np.testing.assert_allclose(a[f"posterior_{t}"], a[f"library_{t}"], atol=0.02, err_msg=t)


if __name__ == "__main__":
    stages(Path(sys.argv[1]))
