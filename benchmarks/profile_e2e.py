"""Where the time of one ``covfast infer`` run goes: cProfile of the whole pipeline after a warm-up run.

    python benchmarks/profile_e2e.py VOLUME [--device cuda] [--batch-size N] [--top 45] [--out FILE.txt]
        [--torch-profiler FILE.txt]

The warm-up pays imports, model loading and autotuning; the profiled run is the steady state that ``covfast
benchmark`` times. On a GPU, time spent waiting for kernels shows up at the synchronising calls (``.cpu()``,
``.item()``, ``torch.cuda.synchronize``). Printed: the report's ``timings_s``, then the functions with the largest
cumulative and own time. ``--torch-profiler`` profiles a third run with ``torch.profiler`` (CPU and, on a GPU, CUDA
activity) and writes its operator table twice, sorted by own CPU time and by own device time: how much of a stage
is kernels, launches and host-device copies.
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
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 on the CPU, 32 on a GPU")
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--out", help="also write the text here")
    parser.add_argument("--torch-profiler", metavar="FILE", help="also write torch.profiler's operator tables here")
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
        if args.torch_profiler:
            write_torch_profile(run, args.device, args.top, Path(args.torch_profiler))
    text = io.StringIO()
    text.write(json.dumps(result.report["timings_s"]) + "\n")
    for key in ("cumulative", "tottime"):
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(args.top)
    print(text.getvalue())
    if args.out:
        Path(args.out).write_text(text.getvalue())


def write_torch_profile(run, device: str, top: int, path: Path) -> None:
    """One more ``run()`` under torch.profiler; its operator tables (by own CPU time, by own device time) to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        result = run()
    averages = prof.key_averages()
    sections = [json.dumps(result.report["timings_s"]), averages.table(sort_by="self_cpu_time_total", row_limit=top)]
    if device == "cuda":
        sections.append(averages.table(sort_by="self_cuda_time_total", row_limit=top))
    path.write_text("\n\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
