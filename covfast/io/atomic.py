"""Atomic file writes: an interrupted or failed write never leaves a partial file under the final name."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from covfast.errors import OutputError


def atomic_write(path, write_fn: Callable[[BinaryIO], None]) -> None:
    """Write a file atomically: temporary file in the same folder, fsync, then ``os.replace``.

    Args:
        path: final file path; its folder must exist.
        write_fn: called with a binary file object open on the temporary file; writes the whole content
            (e.g. ``lambda f: f.write(data)``, ``lambda f: fig.savefig(f, format="png")``).

    Raises:
        OutputError: the folder does not exist or cannot be written (no file is left behind).
        Exception: whatever ``write_fn`` raises, after the temporary file is removed.
    """
    path = Path(path)
    folder = path.parent
    try:
        # A hidden name in the same folder: os.replace is then a rename within one file system.
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".partial")
    except OSError as exc:
        raise OutputError(path, f"cannot write into {folder}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as file:
            write_fn(file)
            file.flush()
            os.fsync(file.fileno())
        # mkstemp creates the file 0600; outputs are meant to be read by others like any plainly written file.
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError):
            raise OutputError(path, f"cannot write: {exc.strerror or exc}") from None
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    """Persist the rename itself (the folder entry); not every platform or file system allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
