"""Time the report's ``distribution`` stage alone on covfast outputs, per grid step and per-lung count source.

    covfast infer ../shared/data/covid-ct-md/P001 -o runs/s13/reports -q --device cpu
    python benchmarks/distribution_grid.py runs/s13/reports/P001 --repeats 3

Reads the folder's masks back onto the input's canonical grid and times
:func:`covfast.pipeline.distribution.lesion_distribution` (mean of ``--repeats`` calls after one warm-up) with every
``GRID_STEP`` in ``--steps``, counting the per-lung infected voxels itself (the full-grid pass) or given them as the
pipeline does (from the reduction), and prints the odds ratio and its interval for each, so the cost of each choice
is seen beside what it does to the number.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from covfast.io import load_volume
from covfast.io.nifti import load_mask_like
from covfast.pipeline import distribution


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a covfast infer output folder")
    ap.add_argument("--steps", default="1,2,3,4")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    report = json.loads((args.folder / "report.json").read_text())
    volume = load_volume(report["input"]["path"])
    lung = load_mask_like(args.folder / "lung_mask.nii.gz", volume)
    infected = load_mask_like(args.folder / "infection_mask.nii.gz", volume)
    sick = (infected != 0) & (lung > 0)
    per_lung = (int((sick & (lung == 1)).sum()), int((sick & (lung == 2)).sum()))
    shipped = distribution.GRID_STEP
    print(f"{args.folder}: {volume.hu.shape}, shipped grid step {shipped}")
    print("step  per-lung counts        ms   odds ratio  95 % interval")
    for step in (int(s) for s in args.steps.split(",")):
        distribution.GRID_STEP = step
        for source, given in (("counted here", None), ("from reduction", per_lung)):
            distribution.lesion_distribution(lung, infected, volume.spacing_mm, 0.5, given)
            start = time.perf_counter()
            for _ in range(args.repeats):
                out = distribution.lesion_distribution(lung, infected, volume.spacing_mm, 0.5, given)
            ms = 1000 * (time.perf_counter() - start) / args.repeats
            interval = out["peripheral_odds_ratio_interval"]
            shown = "-" if interval is None else f"{interval[0]:.2f}-{interval[1]:.2f}"
            print(f"{step:>4}  {source:<16} {ms:8.0f}   {out['peripheral_odds_ratio']:9.3f}  {shown}")
    distribution.GRID_STEP = shipped
    print(f"numpy {np.__version__}; {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}")


if __name__ == "__main__":
    main()
