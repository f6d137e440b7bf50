"""Time the lung mask (``covfast.pipeline.lung.lung_mask``) against its code at another git revision, in one run.

    python benchmarks/lung_mask_speed.py ../shared/data/covid-ct-md/P001 ... --reference cf78627 --runs 5 \
        --json benchmarks/results/lung_mask_cpu_YYYY-MM-DD.json

Each volume is decoded once. The reference's ``lung.py`` and ``morphology.py`` are read with ``git show`` into a
module of their own, so the two versions run side by side in one process on the same arrays, alternating run by run
(background load hits both alike). Printed per volume: the median seconds of each, their ratio, and whether the two
label volumes are equal voxel for voxel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _reference import reference_modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("volumes", nargs="+")
    parser.add_argument("--reference", required=True, help="git revision to compare against")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch

    from covfast.info import cpu_name
    from covfast.io.inputs import load_volume
    from covfast.pipeline import lung

    reference = reference_modules(args.reference, ("lung", "morphology"))["lung"]
    rows = []
    for path in args.volumes:
        volume = load_volume(path)
        hu, spacing = volume.hu, volume.spacing_mm
        new_labels, ref_labels = lung.lung_mask(hu, spacing), reference.lung_mask(hu, spacing)  # warm-up
        times = {"current": [], "reference": []}
        for _ in range(args.runs):
            for name, run in (("reference", reference.lung_mask), ("current", lung.lung_mask)):
                start = time.perf_counter()
                run(hu, spacing)
                times[name].append(time.perf_counter() - start)
        row = {
            "volume": path, "shape": list(hu.shape),
            "current_s": statistics.median(times["current"]), "reference_s": statistics.median(times["reference"]),
            "identical": bool(np.array_equal(new_labels, ref_labels)),
            "voxels_differing": int(np.count_nonzero(new_labels != ref_labels)),
        }
        row["speedup"] = row["reference_s"] / row["current_s"]
        rows.append(row)
        print(f"{path}: current {row['current_s']:.3f} s, reference {row['reference_s']:.3f} s, "
              f"{row['speedup']:.2f}x, identical {row['identical']}")
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=True, cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        Path(args.json).write_text(json.dumps({
            "date": date.today().isoformat(), "command": " ".join(["python"] + sys.argv), "commit": commit,
            "reference": args.reference, "runs": args.runs, "machine": cpu_name(),
            "threads": torch.get_num_threads(), "load_average": list(os.getloadavg()), "python": platform.python_version(), "numpy": np.__version__,
            "results": rows,
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
