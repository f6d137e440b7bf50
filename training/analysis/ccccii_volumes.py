"""Write the CC-CCII common-pneumonia patient's three scans as NIfTI volumes that ``covfast infer`` reads.

The scans are 8-bit PNG slices without Hounsfield units; they are mapped back to approximate HU as the affinity
cache does (:func:`training.affinity.ccccii_hu`) at its assumed spacing (:data:`training.affinity.CCCCII_SPACING_MM`).
The orientation is a guess (the PNGs carry none), which the in-plane measures of the report do not depend on.

    python training/analysis/ccccii_volumes.py --out runs/s13/ccccii
    covfast infer runs/s13/ccccii/cp_3131.nii.gz runs/s13/ccccii/cp_3132.nii.gz runs/s13/ccccii/cp_3133.nii.gz \
        -o runs/s13/ccccii/reports -q --device cpu
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

from training.affinity import CCCCII_SCANS, CCCCII_SPACING_MM, ccccii_hu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    dz, dy, dx = CCCCII_SPACING_MM
    for scan in CCCCII_SCANS:
        hu = ccccii_hu(args.data, scan)  # [z, row, column]
        path = args.out / f"cp_{scan}.nii.gz"
        nib.save(nib.Nifti1Image(np.transpose(hu, (2, 1, 0)), np.diag([-dx, -dy, dz, 1.0])), str(path))
        print(f"{path}: {hu.shape[0]} slices")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
