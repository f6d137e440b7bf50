"""Where the time of one ``covfast infer`` run goes: cProfile of the whole pipeline after a warm-up run.

    python benchmarks/profile_e2e.py VOLUME [--device cuda] [--batch-size N] [--top 45] [--out FILE.txt]

The warm-up pays imports, model loading and autotuning; the profiled run is the steady state that ``covfast
benchmark`` times. On a GPU, time spent waiting for kernels shows up at the synchronising calls (``.cpu()``,
``.item()``, ``torch.cuda.synchronize``). Printed: the report's ``timings_s``, then the functions with the largest
cumulative and own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("volume")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--out", help="also write the text here")
    args = parser.parse_args()

    from covfast.api import infer

    with tempfile.TemporaryDirectory() as scratch:
        def run():
            result = infer(args.volume, out_dir=Path(scratch) / "out", device=args.device, engine=args.engine,
                           batch_size=args.batch_size)
            if args.device == "cuda":
                import torch

                torch.cuda.synchronize()
            return result

        run()  # warm-up
        profiler = cProfile.Profile()
        profiler.enable()
        result = run()
        profiler.disable()
    text = io.StringIO()
    text.write(json.dumps(result.report["timings_s"]) + "\n")
    for key in ("cumulative", "tottime"):
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(args.top)
    print(text.getvalue())
    if args.out:
        Path(args.out).write_text(text.getvalue())


if __name__ == "__main__":
    main()
