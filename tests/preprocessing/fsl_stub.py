"""Stand-in FSL executables for tests: same command-line interface, trivial identity 'registration'.

Installed in a temporary bin/ under the names bet, fast, flirt, fnirt, invwarp, applywarp,
convert_xfm. Each parses the arguments nipype passes and writes the files FSL would write, so the
nipype plumbing and our pipeline run end to end. Transforms are identities in world space, so a
subject already in template space maps onto itself.
"""

import os
import sys

import nibabel as nib
import numpy as np


def opts(argv):
    out, pos = {}, []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "=" in a:
            k, v = a[2:].split("=", 1)
            out[k] = v
        elif a.startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            out[a.lstrip("-")] = argv[i + 1]
            i += 1
        elif a.startswith("-"):
            out[a.lstrip("-")] = True
        else:
            pos.append(a)
        i += 1
    return out, pos


def nii(p):
    return p if p.endswith((".nii.gz", ".nii")) else p + ".nii.gz"


def save(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), nii(path))


def resample(src, ref, interp):
    from nibabel.processing import resample_from_to

    ref = nib.load(nii(ref))
    return resample_from_to(nib.load(nii(src)), (ref.shape[:3], ref.affine), order=0 if interp == "nearest" else 1).get_fdata()


def main():
    tool = os.path.basename(sys.argv[0])
    o, pos = opts(sys.argv[1:])
    with open(os.environ.get("FSL_STUB_LOG", os.devnull), "a") as log:
        log.write(" ".join([tool] + sys.argv[1:]) + "\n")
    if tool == "bet":
        img = nib.load(nii(pos[0]))
        d = img.get_fdata()
        m = d > 0.05 * np.percentile(d[d > 0], 98)
        save(pos[1], d * m, img.affine)
        if "m" in o:
            save(nii(pos[1]).replace(".nii.gz", "_mask.nii.gz"), m, img.affine)
    elif tool == "fast":
        base = o.get("out") or o["o"]  # fslpy writes --out=BASE, nipype -o BASE
        img = nib.load(nii(sys.argv[-1]))  # the input comes last (a flag before it may look like an option)
        d = img.get_fdata()
        q = np.percentile(d[d > 0], [33, 66]) if (d > 0).any() else [1, 2]
        cls = np.digitize(d, q) * (d > 0)
        for k in range(3):
            save(f"{base}_pve_{k}", (cls == k) & (d > 0), img.affine)
        save(f"{base}_seg", cls, img.affine)
        save(f"{base}_pveseg", cls, img.affine)
        save(f"{base}_mixeltype", cls, img.affine)
        save(f"{base}_restore", d, img.affine)
    elif tool == "flirt":
        save(o["out"], resample(o["in"], o["ref"], "continuous"), nib.load(nii(o["ref"])).affine)
        np.savetxt(o["omat"], np.eye(4), fmt="%.6f")
    elif tool == "fnirt":
        ref = nib.load(nii(o["ref"]))
        save(o["cout"], np.zeros(ref.shape + (3,)), ref.affine)
        save(o["iout"], resample(o["in"], o["ref"], "continuous"), ref.affine)
        if "logout" in o:
            open(o["logout"], "w").write("stub\n")
    elif tool == "invwarp":
        ref = nib.load(nii(o["ref"]))
        save(o["out"], np.zeros(ref.shape + (3,)), ref.affine)
    elif tool == "applywarp":
        interp = "nearest" if o.get("interp") == "nn" else "continuous"
        save(o["out"], resample(o["in"], o["ref"], interp), nib.load(nii(o["ref"])).affine)
    elif tool == "convert_xfm":
        m = np.loadtxt(sys.argv[-1])
        np.savetxt(o["omat"], np.linalg.inv(m), fmt="%.6f")
    else:
        sys.exit(f"stub: unknown tool {tool}")


if __name__ == "__main__":
    main()
