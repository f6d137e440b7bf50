"""The infection stage with the TTA's plain and flipped slices as one network batch or as one call each, on one
volume, in one process (which to use on the CPU; GPUs use one batch).

    python benchmarks/tta_batching.py ../shared/data/covid-ct-md/P001 --engine torch --runs 2 \
        --json benchmarks/results/tta_batching_cpu_YYYY-MM-DD.json

Runs ``covfast.pipeline.infection.segment_infection`` with ``_runners(..., one_batch=True)`` and ``False``,
alternating, and prints the median seconds of each and whether the probability maps and masks are equal.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from datetime import date

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("volume")
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()

    from covfast.io import load_volume
    from covfast.pipeline import infection
    from covfast.pipeline.lung import lung_mask

    volume = load_volume(args.volume)
    lung = lung_mask(volume.hu, volume.spacing_mm)
    runners = infection._runners
    seconds, results = {True: [], False: []}, {}
    infection.segment_infection(volume.hu, lung, volume.spacing_mm, device=args.device, engine=args.engine)  # warm-up
    for _ in range(args.runs):
        for one_batch in (True, False):
            infection._runners = functools.partial(runners, one_batch=one_batch)
            start = time.perf_counter()
            results[one_batch] = infection.segment_infection(volume.hu, lung, volume.spacing_mm, device=args.device,
                                                             engine=args.engine)
            seconds[one_batch].append(time.perf_counter() - start)
    infection._runners = runners
    a, b = results[True], results[False]
    out = {
        "volume": args.volume, "engine": args.engine, "device": args.device, "runs": args.runs,
        "one_batch_s": seconds[True], "separate_calls_s": seconds[False],
        "one_batch_median_s": statistics.median(seconds[True]), "separate_median_s": statistics.median(seconds[False]),
        "prob_max_abs_diff": float(np.abs(a.prob - b.prob).max()),
        "masks_equal": bool(np.array_equal(a.mask, b.mask)),
        "engines": a.engines, "date": date.today().isoformat(), "command": " ".join(sys.argv),
    }
    print(json.dumps({k: v for k, v in out.items() if k != "engines"}, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
