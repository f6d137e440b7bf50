"""The lung mask on volumes whose field of view cuts the chest (one-off robustness check).

    python training/analysis/cut_fov_check.py P001 cap001 normal001 [--data ../shared/data/covid-ct-md]

Each COVID-CT-MD volume is cropped in-plane so that the lungs reach the image's edge: both lungs cut laterally by
5 px, the right lung cut by 15 px, all four sides cut by 5 px, both lungs cut by 40 px (px of the 512 x 512 grid;
counted from the full-FOV lung mask's extent). Printed per crop: Dice of the right and left lung against the
full-FOV mask on the same voxels, and the time. With ``--hole-shares``, also for the complete volume and each crop
the border-touching air components that pass the cut-lung rule's first two tests (inside the body's outline, thick)
and the share of their per-slice holes (vessels), which the third test thresholds (``_CUT_LUNG_MIN_HOLE_SHARE``).
"""

import argparse
import time

import cc3d
import numpy as np

from covfast.io import load_volume
from covfast.pipeline import lung as lung_module
from covfast.pipeline import morphology
from covfast.pipeline.lung import fill_holes_per_slice, lung_mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1))


def hole_shares(hu: np.ndarray, spacing_mm) -> list[tuple[int, float]]:
    """(voxels, hole share) of the border-touching air components that pass the first two cut-lung tests, on the lung
    mask's working grid."""
    step_h = max(1, round(1.25 / spacing_mm[1]))
    step_w = max(1, round(1.25 / spacing_mm[2]))
    air = hu[:, ::step_h, ::step_w] < -320
    spacing = (spacing_mm[0], spacing_mm[1] * step_h, spacing_mm[2] * step_w)
    components = cc3d.connected_components(air, connectivity=6)
    border = lung_module._in_plane_border_ids(components)
    saved = lung_module._CUT_LUNG_MIN_HOLE_SHARE
    lung_module._CUT_LUNG_MIN_HOLE_SHARE = 0.0  # the first two tests only
    try:
        passed = lung_module._cut_lungs(air, components, border[border != 0], spacing)
    finally:
        lung_module._CUT_LUNG_MIN_HOLE_SHARE = saved
    found = []
    for i in passed:
        member = components == i
        box = morphology.bounding_box(member)
        air_box = member[box]
        holes = np.count_nonzero(fill_holes_per_slice(air_box) & ~air_box)
        found.append((int(np.count_nonzero(air_box)), round(float(holes / np.count_nonzero(air_box)), 4)))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--data", default="../shared/data/covid-ct-md")
    ap.add_argument("--hole-shares", action="store_true")
    args = ap.parse_args()
    for case in args.cases:
        volume = load_volume(f"{args.data}/{case}")
        full = lung_mask(volume.hu, volume.spacing_mm)
        _, rows, cols = np.nonzero(full)
        every = slice(None)
        if args.hole_shares:
            print(f"{case} complete: border components (voxels, hole share) {hole_shares(volume.hu, volume.spacing_mm)}")
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
            if args.hole_shares:
                shares = hole_shares(np.ascontiguousarray(volume.hu[crop]), volume.spacing_mm)
                print(f"    border components (voxels, hole share) {shares}")


if __name__ == "__main__":
    main()
