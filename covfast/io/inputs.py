"""Input discovery and dispatch: a path is a NIfTI file, a DICOM series folder or an enhanced (multi-frame) DICOM CT
file; folders of inputs expand."""

from __future__ import annotations

import os
from pathlib import Path

from covfast.errors import InputError
from covfast.io.dicom import DICOM_MAGIC, DICOM_PREAMBLE, holds_dicom, load_dicom_file, load_dicom_series
from covfast.io.nifti import GZIP_MAGIC, load_nifti, nifti_header_class
from covfast.io.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SAMPLE_NAME = "sample_ct.nii.gz"


def load_volume(path, series: str | None = None, max_voxels: int = 2**30) -> Volume:
    """Load a CT volume from a NIfTI file (``.nii``/``.nii.gz``) or a DICOM series folder.

    The kind is recognised from the content, not the name: gzip or a NIfTI header -> NIfTI; a folder -> DICOM.

    Args:
        path: NIfTI file or folder holding one DICOM series (or several: see ``series``).
        series: SeriesInstanceUID to read from a DICOM folder with several series; default the largest.
        max_voxels: refuse inputs whose header claims more voxels than this, before allocating.

    Returns:
        The volume in Hounsfield units, canonical orientation.

    Raises:
        InputError: missing path, unrecognised or bad input (one line naming the path and the problem).
    """
    volume = _load(path, series, max_voxels)
    volume.path = str(path)
    return volume


def _load(path, series: str | None, max_voxels: int) -> Volume:
    target = Path(path)
    if not target.exists():
        raise InputError(path, "does not exist")
    if target.is_dir():
        if not holds_dicom(target):
            raise InputError(path, "is a folder without DICOM files; expected a DICOM series folder")
        return load_dicom_series(target, series=series, max_voxels=max_voxels)
    try:
        with open(target, "rb") as file:
            head = file.read(DICOM_PREAMBLE + len(DICOM_MAGIC))
    except OSError as exc:
        raise InputError(path, f"cannot be read ({exc.strerror or exc})") from None
    if not head:
        raise InputError(path, "is an empty file (0 bytes)")
    if head[:2] == GZIP_MAGIC or nifti_header_class(head) is not None:
        return load_nifti(target, max_voxels=max_voxels)
    if head[DICOM_PREAMBLE:] == DICOM_MAGIC:
        return load_dicom_file(target, max_voxels=max_voxels)  # an enhanced multi-frame CT; a lone slice is refused
    raise InputError(path, "is neither a NIfTI file (.nii, .nii.gz) nor a DICOM series folder")


def _is_nifti_name(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


def find_inputs(paths: list[str]) -> list[str]:
    """Expand the command line's inputs into one path per volume.

    A file is one input as given. A folder that itself holds DICOM files is one input (a series folder).
    Any other folder is searched recursively for ``.nii``/``.nii.gz`` files and DICOM series folders.

    Args:
        paths: files and folders as the user gave them.

    Returns:
        Input paths in the order given, each folder's contents sorted by name, without duplicates.

    Raises:
        InputError: a path does not exist, or a folder holds no inputs.
    """
    found: list[str] = []
    for path in paths:
        target = Path(path)
        if not target.exists():
            raise InputError(path, "does not exist")
        if target.is_file() or holds_dicom(target):
            found.append(str(path))
            continue
        inside = []
        for folder, subfolders, files in os.walk(target):
            subfolders.sort()
            inside += [os.path.join(folder, name) for name in sorted(files) if _is_nifti_name(name)]
            series = [name for name in subfolders if holds_dicom(os.path.join(folder, name))]
            inside += [os.path.join(folder, name) for name in series]
            # A series folder is one input: do not descend into it.
            subfolders[:] = [name for name in subfolders if name not in series]
        if not inside:
            raise InputError(path, "is a folder with no NIfTI files (.nii, .nii.gz) or DICOM series")
        found += sorted(inside)
    return list(dict.fromkeys(found))


def sample_path() -> str:
    """Path of the shipped sample chest CT (``covfast/data/sample_ct.nii.gz``; see ``covfast/data/SAMPLE.md``)."""
    return str(Path(__file__).resolve().parent.parent / "data" / SAMPLE_NAME)
