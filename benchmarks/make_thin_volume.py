"""Write a thin-slice version of a real CT volume (linear interpolation along the body axis) for timing and memory.

    python benchmarks/make_thin_volume.py ../shared/data/covid-ct-md/P001 /tmp/p001_thin.nii.gz --slice-mm 0.667

The volume is read with covfast's loader (canonical orientation, HU), resampled along its slice axis to the given
spacing (the first and last slice centres kept, HU rounded to int16) and written as NIfTI in canonical orientation.
P001 at 0.667 mm gives 444 slices of 512 x 512, the size of a thin-slice chest CT. Not for accuracy figures: the
in-between slices are interpolated, not measured.
"""

from __future__ import annotations

import argparse

import nibabel as nib
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("volume")
    parser.add_argument("out")
    parser.add_argument("--slice-mm", type=float, default=0.667)
    args = parser.parse_args()

    from covfast.io.inputs import load_volume

    volume = load_volume(args.volume)
    dz, dy, dx = volume.spacing_mm
    depth = volume.hu.shape[0]
    count = round((depth - 1) * dz / args.slice_mm) + 1
    position = np.linspace(0.0, depth - 1.0, count)
    below = np.clip(np.floor(position).astype(int), 0, depth - 2)
    weight = (position - below).astype(np.float32)[:, None, None]
    hu = volume.hu.astype(np.float32)
    thin = np.rint(hu[below] * (1 - weight) + hu[below + 1] * weight).astype(np.int16)
    step = (depth - 1) * dz / (count - 1)
    # Canonical [D, H, W] = (S, P, L): RAS affine columns for the array axes.
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = step, -dy, -dx, 1.0
    affine[:3, 3] = [0.0, 0.0, float(volume.z_mm[0])]
    image = nib.Nifti1Image(thin, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, args.out)
    print(f"{args.out}: {thin.shape} {nib.aff2axcodes(affine)}, {step:.3f} x {dy:.3f} x {dx:.3f} mm")


if __name__ == "__main__":
    main()
