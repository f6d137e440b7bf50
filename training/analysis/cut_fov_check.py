"""The lung mask on volumes whose field of view cuts the chest (one-off robustness check).

    python training/analysis/cut_fov_check.py P001 cap001 normal001 [--data ../shared/data/covid-ct-md]

Each COVID-CT-MD volume is cropped in-plane so that the lungs reach the image's edge: both lungs cut laterally by
5 px, the right lung cut by 15 px, all four sides cut by 5 px, both lungs cut by 40 px (px of the 512 x 512 grid;
counted from the full-FOV lung mask's extent). Printed per crop: Dice of the right and left lung against the
full-FOV mask on the same voxels, and the time.
"""

import argparse
import time

import numpy as np

from covfast.io import load_volume
from covfast.pipeline.lung import lung_mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--data", default="../shared/data/covid-ct-md")
    args = ap.parse_args()
    for case in args.cases:
        volume = load_volume(f"{args.data}/{case}")
        full = lung_mask(volume.hu, volume.spacing_mm)
        _, rows, cols = np.nonzero(full)
        every = slice(None)
        crops = {
            "both lungs cut laterally (5 px)": (every, every, slice(cols.min() + 5, cols.max() - 5)),
            "right lung cut (15 px)": (every, every, slice(cols.min() + 15, None)),
            "cut on all four sides (5 px)": (every, slice(rows.min() + 5, rows.max() - 5),
                                             slice(cols.min() + 5, cols.max() - 5)),
            "both cut deep (40 px)": (every, every, slice(cols.min() + 40, cols.max() - 40)),
        }
        for name, crop in crops.items():
            start = time.perf_counter()
            labels = lung_mask(np.ascontiguousarray(volume.hu[crop]), volume.spacing_mm)
            seconds = time.perf_counter() - start
            scores = [round(dice(labels == k, full[crop] == k), 3) for k in (1, 2)]
            print(f"{case} {name} {volume.hu[crop].shape}: Dice right / left {scores[0]} / {scores[1]}, {seconds:.2f} s")


if __name__ == "__main__":
    main()
