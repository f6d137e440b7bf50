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
