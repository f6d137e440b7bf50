"""Time the ``covfast infer`` command line against lungmask's U-Net on the same input, on the same machine.

Run by hand (not part of the test suite)::

    python benchmarks/lungmask_compare.py ../shared/data/covid-ct-md/P001 --runs 5 --json runs/e2e.json \\
        --lungmask-python /tmp/lmvenv/bin/python

covfast: ``--runs`` runs of ``covfast infer INPUT -o OUT --device cpu`` under ``/usr/bin/time -v`` (wall clock
including interpreter start and imports, peak RSS, the report's ``timings_s``; the infection network runs when
its weights are installed, ``infection_source`` records it), then the same with ``--infection-mask`` (a
density-thresholded 0/1/2 mask written on the input's grid, which replaces the network), so the reduction and the
preview's overlay run without the network. The median of each figure is printed and written to ``--json``.

lungmask (optional, ``--lungmask-python``: a separate environment with ``lungmask`` and ``SimpleITK``): its weights
cannot be downloaded here, so a freshly initialised ``lungmask.resunet.UNet`` with R231's architecture (same
computation, random weights) is saved and timed through the public ``LMInferer.apply`` on the image read with
SimpleITK's ``ImageSeriesReader``, without lungmask's volume postprocessing, once (about 140 s on 2 cores). The
script runs itself in that environment with ``--lungmask-worker``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIME_FIELDS = {
    "wall_s": r"Elapsed \(wall clock\) time.*: (.+)",
    "peak_rss_kb": r"Maximum resident set size.*: (\d+)",
    "user_s": r"User time.*: ([\d.]+)",
    "system_s": r"System time.*: ([\d.]+)",
}


def _clock_seconds(text: str) -> float:
    """``h:mm:ss`` or ``m:ss.ss`` (GNU time's elapsed format) -> seconds."""
    seconds = 0.0
    for part in text.strip().split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def time_command(argv: list[str]) -> dict:
    """Run ``argv`` under GNU ``/usr/bin/time -v``; return wall_s, peak_rss_kb, user_s, system_s."""
    proc = subprocess.run(["/usr/bin/time", "-v", *argv], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    found = {}
    for key, pattern in TIME_FIELDS.items():
        value = re.search(pattern, proc.stderr).group(1)
        found[key] = _clock_seconds(value) if key == "wall_s" else float(value)
    return found


def write_threshold_mask(input_path: str, mask_path: Path) -> None:
    """Write the benchmark suite's density-thresholded infection mask on the input's grid."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_bench_e2e import threshold_infection_mask

    from covfast.io import load_volume, write_nifti_like

    volume = load_volume(input_path)
    write_nifti_like(volume, threshold_infection_mask(volume.hu), mask_path)


def time_covfast(input_path: str, runs: int, scratch: Path, extra: list[str]) -> dict:
    """Median wall, peak RSS and per-stage seconds of ``runs`` command-line runs (after one warm-up run)."""
    covfast_exe = shutil.which("covfast") or sys.exit("covfast is not on PATH (activate the venv)")
    out = scratch / "out"
    argv = [covfast_exe, "infer", input_path, "-o", str(out), "--device", "cpu", "-q", *extra]
    time_command(argv)  # warm the page cache so every timed run reads the input from memory
    samples = []
    for _ in range(runs):
        sample = time_command(argv)
        report = json.loads(next(out.glob("*/report.json")).read_text())
        sample["stages_s"] = report["timings_s"]
        sample["infection_source"] = report["infection_source"]  # None: no model installed, the stage was skipped
        samples.append(sample)
    stages = sorted({stage for sample in samples for stage in sample["stages_s"]})
    return {
        "command": " ".join(["covfast", *argv[1:]]),
        "runs": samples,
        "median": {
            **{key: statistics.median(s[key] for s in samples) for key in TIME_FIELDS},
            "stages_s": {st: statistics.median(s["stages_s"].get(st, 0.0) for s in samples) for st in stages},
        },
    }


def lungmask_worker(input_path: str, scratch: Path) -> dict:
    """Inside the lungmask environment: time R231's U-Net (random weights) on the DICOM series, once."""
    import numpy as np
    import SimpleITK as sitk
    import torch
    from lungmask import LMInferer
    from lungmask.resunet import UNet

    torch.manual_seed(0)
    model = UNet(n_classes=3, padding=True, depth=5, up_mode="upsample", batch_norm=True, residual=False)
    weights = scratch / "r231_random.pth"
    torch.save(model.state_dict(), weights)
    start = time.perf_counter()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(input_path))
    image = reader.Execute()
    read_s = time.perf_counter() - start
    inferer = LMInferer(modelpath=str(weights), force_cpu=True, volume_postprocessing=False)
    start = time.perf_counter()
    labels = inferer.apply(image)
    apply_s = time.perf_counter() - start
    return {
        "read_s": read_s,
        "apply_s": apply_s,
        "shape": list(np.asarray(labels).shape),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "lungmask": _version("lungmask"),
        "SimpleITK": sitk.Version.VersionString(),
    }


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def time_lungmask(python: str, input_path: str, scratch: Path) -> dict:
    argv = [python, __file__, input_path, "--lungmask-worker", "--scratch", str(scratch)]
    timed = time_command(argv)
    return {
        **json.loads((scratch / "lungmask.json").read_text()),
        "process": timed,
        "command": " ".join(argv[1:]).replace(str(scratch), "SCRATCH"),
    }


def environment() -> dict:
    import numpy
    import torch

    import covfast

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        ),
        "?",
    )
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain"], check=False, capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "covfast": covfast.__version__,
        "git_rev": rev + ("+dirty" if dirty else ""),
        "loadavg_1_5_15": list(os.getloadavg()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input", help="a DICOM series folder or NIfTI file")
    parser.add_argument("--runs", type=int, default=5, help="timed covfast runs per variant (median reported)")
    parser.add_argument("--lungmask-python", metavar="PYTHON", help="python of an environment with lungmask")
    parser.add_argument("--no-covfast", action="store_true", help="time lungmask only")
    parser.add_argument("--json", metavar="FILE", help="write every measurement as JSON")
    parser.add_argument("--lungmask-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.lungmask_worker:
        scratch = Path(args.scratch)
        (scratch / "lungmask.json").write_text(json.dumps(lungmask_worker(args.input, scratch)))
        return 0

    results: dict = {"environment": environment(), "input": args.input}
    with tempfile.TemporaryDirectory(prefix="covfast_bench_") as tmp:
        scratch = Path(tmp)
        if not args.no_covfast:
            mask = scratch / "infection_mask.nii.gz"
            write_threshold_mask(args.input, mask)
            results["covfast"] = time_covfast(args.input, args.runs, scratch, [])
            results["covfast_infection_mask"] = time_covfast(
                args.input, args.runs, scratch, ["--infection-mask", str(mask)]
            )
            for key in ("covfast", "covfast_infection_mask"):
                results[key]["command"] = results[key]["command"].replace(str(scratch), "SCRATCH")
        if args.lungmask_python:
            results["lungmask"] = time_lungmask(args.lungmask_python, args.input, scratch)
            if "covfast_infection_mask" in results:
                # The mask variant never runs the infection network: read, lung mask, reduction, outputs.
                results["ratio_covfast_infection_mask_wall_to_lungmask_apply"] = (
                    results["covfast_infection_mask"]["median"]["wall_s"] / results["lungmask"]["apply_s"]
                )
    results["environment"]["loadavg_after"] = list(os.getloadavg())
    text = json.dumps(results, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
