"""Write a full-size chest CT volume for timing on a machine that cannot receive COVID-CT-MD P001.

The GPU machine takes at most 64 MiB of files per call (the repository included), too little for P001's DICOM
series next to the repository. Its timing needs a volume of P001's shape, not P001's fine detail, so this script
upsamples the shipped sample (P001 reduced to 256 x 256 x 74, ``covfast/data/SAMPLE.md``) back to
512 x 512 x 148 voxels (trilinear in HU, rounded to int16, voxel 0.748 x 0.748 x 2 mm as P001) and writes it as a
NIfTI file. Not for accuracy figures: its lesions are the sample's, smoothed.

    python benchmarks/make_timing_volume.py /tmp/p001_size.nii.gz
"""

from __future__ import annotations

import argparse

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from covfast.io import sample_path

FACTOR = 2


def upsample(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[X, Y, Z] HU array and its affine -> (array FACTOR times larger on each axis, int16; the matching affine).

    Voxel centres follow align_corners=False: the new voxel size is the old one / FACTOR, and the first new voxel
    centre sits a quarter of an old voxel before the first old centre.
    """
    volume = torch.from_numpy(data.astype(np.float32))[None, None]
    size = tuple(FACTOR * s for s in data.shape)
    out = F.interpolate(volume, size=size, mode="trilinear", align_corners=False)[0, 0]
    hu = torch.round(out).clamp(-32768, 32767).to(torch.int16).numpy()
    scale = np.diag([1.0 / FACTOR] * 3 + [1.0])
    shift = np.eye(4)
    shift[:3, 3] = -(FACTOR - 1) / (2.0 * FACTOR)  # in old voxel units
    return hu, affine @ shift @ scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="destination .nii.gz")
    args = parser.parse_args(argv)
    image = nib.load(sample_path())
    hu, affine = upsample(np.asarray(image.dataobj), image.affine)
    out = nib.Nifti1Image(hu, affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    nib.save(out, args.out)
    print(f"{args.out}: {hu.shape}, voxel {np.round(out.header.get_zooms(), 4)} mm")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
