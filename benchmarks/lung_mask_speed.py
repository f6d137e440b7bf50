"""Time the lung mask (``covfast.pipeline.lung.lung_mask``) against its code at another git revision, in one run.

    python benchmarks/lung_mask_speed.py ../shared/data/covid-ct-md/P001 ... --reference cf78627 --runs 5 \
        --json benchmarks/results/lung_mask_cpu_YYYY-MM-DD.json

Each volume is decoded once. The reference's ``lung.py`` and ``morphology.py`` are read with ``git show`` into a
module of their own, so the two versions run side by side in one process on the same arrays, alternating run by run
(background load hits both alike). Printed per volume: the median seconds of each, their ratio, and whether the two
label volumes are equal voxel for voxel.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _reference import alternate, comparison_parser, reference_modules, write_comparison


def main() -> None:
    args = comparison_parser(__doc__.splitlines()[0]).parse_args()

    from covfast.io.inputs import load_volume
    from covfast.pipeline import lung

    reference = reference_modules(args.reference, ("lung", "morphology"))["lung"]
    rows = []
    for path in args.volumes:
        volume = load_volume(path)
        hu, spacing = volume.hu, volume.spacing_mm
        lung.lung_mask(hu, spacing), reference.lung_mask(hu, spacing)  # warm-up
        current, old, labels = alternate(partial(lung.lung_mask, hu, spacing),
                                         partial(reference.lung_mask, hu, spacing), args.runs)
        row = {
            "volume": path, "shape": list(hu.shape), "current_s": current, "reference_s": old,
            "identical": bool(np.array_equal(labels["current"], labels["reference"])),
            "voxels_differing": int(np.count_nonzero(labels["current"] != labels["reference"])),
        }
        row["speedup"] = row["reference_s"] / row["current_s"]
        rows.append(row)
        print(f"{path}: current {row['current_s']:.3f} s, reference {row['reference_s']:.3f} s, "
              f"{row['speedup']:.2f}x, identical {row['identical']}")
    write_comparison(args, rows)


if __name__ == "__main__":
    main()
