"""Infected volumes of the MosMed radiologist masks: where the diagnosis' 10 mL gate comes from (issue 5).

    python training/analysis/mosmed_volumes.py ../shared/data/mosmed-masks/masks

Prints the count, the 0 / 5 / 10 / 25 / 50 / 75 / 100th percentiles in mL, and how many masks fall below the gate
(:data:`covfast.pipeline.diagnosis.MIN_INFECTED_ML`). The 50 masks are all MosMed category CT-1 (mild COVID-19).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

from covfast.pipeline.diagnosis import MIN_INFECTED_ML


def infected_ml(path: Path) -> float:
    """Volume in mL of the non-zero voxels of one mask."""
    image = nib.load(str(path))
    return float((np.asarray(image.dataobj) > 0).sum() * np.prod(image.header.get_zooms()[:3]) / 1000.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("masks", type=Path, help="folder of *_mask.nii.gz")
    args = parser.parse_args(argv)
    volumes = np.array([infected_ml(p) for p in sorted(args.masks.glob("*.nii*"))])
    if not len(volumes):
        raise SystemExit(f"{args.masks}: no NIfTI masks")
    q = np.percentile(volumes, [0, 5, 10, 25, 50, 75, 100])
    print(f"{len(volumes)} masks; percentiles 0/5/10/25/50/75/100 (mL): " + " / ".join(f"{v:.1f}" for v in q))
    print(f"below the {MIN_INFECTED_ML:g} mL gate: {int((volumes < MIN_INFECTED_ML).sum())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
