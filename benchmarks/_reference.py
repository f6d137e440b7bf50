"""Modules of ``covfast.pipeline`` as they were at another git revision, to time old against new in one process.

The files are read with ``git show`` into a package of their own (``pipeline_reference``); their imports of each
other are pointed at that package, every other import at the installed covfast.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pipeline_reference"


def reference_modules(revision: str, names=("lung", "morphology")) -> dict:
    """``{name: module}``: ``covfast/pipeline/<name>.py`` at ``revision`` for each name (one that the revision lacks
    is left out, and the others then import the current one)."""
    scratch = Path(tempfile.mkdtemp(prefix="pipeline_ref_"))
    package = scratch / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    present = []
    for name in names:
        try:
            source = subprocess.run(["git", "show", f"{revision}:covfast/pipeline/{name}.py"], cwd=ROOT, check=True,
                                    capture_output=True, text=True).stdout
        except subprocess.CalledProcessError:
            continue
        present.append(name)
        (package / f"{name}.py").write_text(source)
    for name in present:
        path = package / f"{name}.py"
        source = path.read_text()
        for other in present:
            source = (source.replace(f"from covfast.pipeline import {other}\n", f"from {PACKAGE} import {other}\n")
                      .replace(f"from covfast.pipeline.{other} import", f"from {PACKAGE}.{other} import"))
        path.write_text(source)
    sys.path.insert(0, str(scratch))
    return {name: importlib.import_module(f"{PACKAGE}.{name}") for name in present}


def comparison_parser(description: str):
    """The command line both comparison scripts take: volumes, ``--reference REV``, ``--runs N``, ``--json FILE``."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("volumes", nargs="+")
    parser.add_argument("--reference", required=True, help="git revision to compare against")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json")
    return parser


def alternate(current, reference, runs: int) -> tuple[float, float, dict]:
    """Call ``reference`` then ``current`` ``runs`` times, alternating (background load hits both alike) ->
    (median current s, median reference s, ``{"current": ..., "reference": ...}`` outputs of the last calls)."""
    import statistics
    import time

    times = {"current": [], "reference": []}
    outputs = {}
    for _ in range(runs):
        for name, call in (("reference", reference), ("current", current)):
            start = time.perf_counter()
            outputs[name] = call()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["current"]), statistics.median(times["reference"]), outputs


def write_comparison(args, rows: list) -> None:
    """``args.json`` (when given): the rows with the date, command, commit (and whether covfast/ had uncommitted
    changes), the reference, the machine, threads, load average and versions."""
    if not args.json:
        return
    import datetime
    import json
    import os
    import platform

    import numpy as np
    import torch

    from covfast.info import cpu_name

    def git(*command):
        return subprocess.run(["git", *command], check=True, cwd=ROOT, capture_output=True, text=True).stdout.strip()

    Path(args.json).write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "command": " ".join(["python"] + sys.argv),
        "commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "covfast")),
        "reference": args.reference, "runs": args.runs, "machine": cpu_name(), "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()), "python": platform.python_version(), "numpy": np.__version__,
        "results": rows,
    }, indent=1) + "\n")
