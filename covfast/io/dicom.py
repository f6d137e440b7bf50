"""DICOM series folders: series selection, slice ordering along the normal, HU rescaling and the RAS affine.

Pixel data that is JPEG lossless (as in COVID-CT-MD) is decoded with libjpeg-turbo through ``imagecodecs``
when it is installed (about 6x faster than pylibjpeg here, and it releases the GIL so slices decode in
threads); every other transfer syntax goes through pydicom's own decoders (pylibjpeg, numpy).
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError

from covfast.errors import InputError
from covfast.io.volume import (
    WINDOWED_EXPORT_PROBLEM,
    Volume,
    canonical_view,
    check_hounsfield,
    check_size,
    grid_geometry,
)

try:
    import imagecodecs
except ImportError:  # optional accelerator; pydicom + pylibjpeg decode the same data more slowly
    imagecodecs = None

DICOM_PREAMBLE = 128
DICOM_MAGIC = b"DICM"
_JPEG_LOSSLESS = {"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"}
# Slices further apart than this multiple of the median spacing mean slices are missing.
_GAP_FACTOR = 1.5
_INT16 = np.iinfo(np.int16)
_PIXEL_DATA = pydicom.tag.Tag("PixelData")
# Decoding threads: libjpeg-turbo releases the GIL, so use the cores there are (this CPU has 2).
_DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))


def is_dicom_file(path) -> bool:
    """Whether a file carries the DICOM Part 10 marker ("DICM" after the 128-byte preamble)."""
    try:
        with open(path, "rb") as file:
            head = file.read(DICOM_PREAMBLE + len(DICOM_MAGIC))
    except OSError:
        return False
    return head[DICOM_PREAMBLE:] == DICOM_MAGIC


def holds_dicom(folder) -> bool:
    """Whether a folder directly contains at least one DICOM file (i.e. it is a series folder)."""
    return any(entry.is_file() and is_dicom_file(entry.path) for entry in os.scandir(folder))


def _read_images(folder: Path) -> tuple[list[tuple[bytes, pydicom.Dataset]], list[str]]:
    """Read and parse every DICOM image file directly in a folder; other files are ignored.

    Returns:
        ``(images, warnings)``: (file bytes, parsed dataset) for each file with pixel data and a position.
    """
    images, warnings = [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file():
            continue
        with open(entry.path, "rb") as file:
            head = file.read(DICOM_PREAMBLE + len(DICOM_MAGIC))
            if head[DICOM_PREAMBLE:] != DICOM_MAGIC:
                continue
            data = head + file.read()
        try:
            dataset = pydicom.dcmread(io.BytesIO(data))
        except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
            warnings.append(f"skipped unreadable DICOM file {entry.name}: {exc}")
            continue
        images += _images_of(entry.name, data, dataset, warnings)
    return images, warnings


def _images_of(name: str, data: bytes, dataset: pydicom.Dataset, warnings: list[str]) -> list:
    """The (file bytes, dataset) images of one parsed file: itself when it is a positioned single-frame image, one
    per frame for a multi-frame (enhanced) CT image, none for anything else (reports, a frame without position)."""
    if "PixelData" not in dataset:
        return []
    if "PerFrameFunctionalGroupsSequence" in dataset:
        frames = _expand_frames(dataset)
        if frames is None:
            warnings.append(f"skipped multi-frame DICOM file {name}: its frames have no position or orientation")
            return []
        # The file's bytes go with its first frame only: the series' hash takes them once.
        return [(data if k == 0 else b"", frame) for k, frame in enumerate(frames)]
    if "ImagePositionPatient" in dataset and "ImageOrientationPatient" in dataset:
        return [(data, dataset)]
    return []


class _Frames:
    """The stored pixels of a multi-frame image, decoded once (by whichever decoding thread asks first)."""

    def __init__(self, dataset: pydicom.Dataset):
        self.dataset = dataset
        self._pixels = None
        self._lock = threading.Lock()

    def frame(self, index: int) -> np.ndarray:
        with self._lock:
            if self._pixels is None:
                pixels = self.dataset.pixel_array
                self._pixels = pixels.reshape(-1, *pixels.shape[-2:])
        return self._pixels[index]


# Functional groups of an enhanced (multi-frame) image that carry what a single-frame slice has at its top level.
_FRAME_GROUPS = {
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness"),
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept"),
}
_MULTIFRAME_ONLY = {pydicom.tag.Tag(name) for name in ("PixelData", "PerFrameFunctionalGroupsSequence",
                                                       "SharedFunctionalGroupsSequence", "NumberOfFrames")}


def _expand_frames(dataset: pydicom.Dataset) -> list[pydicom.Dataset] | None:
    """One dataset per frame of an enhanced multi-frame image, shaped like a single-frame slice: the image's own
    attributes with each frame's position, orientation, pixel spacing and rescale taken from its functional groups
    (per-frame first, then shared); None when a frame lacks a position or an orientation."""
    shared = dataset.SharedFunctionalGroupsSequence[0] if dataset.get("SharedFunctionalGroupsSequence") else None
    common = {tag: element for tag, element in dataset.items() if tag not in _MULTIFRAME_ONLY}
    pixels = _Frames(dataset)
    frames = []
    for index, groups in enumerate(dataset.PerFrameFunctionalGroupsSequence):
        frame = pydicom.Dataset(dict(common))  # its own dict: Dataset keeps the one it is given
        frame.file_meta = dataset.file_meta
        for group, names in _FRAME_GROUPS.items():
            item = next((source[group][0] for source in (groups, shared)
                         if source is not None and source.get(group)), None)
            for name in names:
                if item is not None and name in item:
                    setattr(frame, name, item[name].value)
        if "ImagePositionPatient" not in frame or "ImageOrientationPatient" not in frame:
            return None
        frame.NumberOfFrames = 1
        frame._covfast_frames, frame._covfast_frame = pixels, index
        frames.append(frame)
    return frames


def _choose_series(folder: Path, images, series: str | None) -> tuple[str, list, list[str]]:
    """Group images by SeriesInstanceUID and pick the requested series, else the largest (with a warning)."""
    groups = defaultdict(list)
    for data, dataset in images:
        groups[str(dataset.get("SeriesInstanceUID", ""))].append((data, dataset))
    if not groups:
        raise InputError(folder, "holds no DICOM image series (no DICOM files with pixel data and position)")
    if series is not None:
        if series not in groups:
            raise InputError(folder, f"has no series {series}; series found: {', '.join(sorted(groups))}")
        return series, groups[series], []
    uid = max(sorted(groups), key=lambda key: len(groups[key]))
    warnings = []
    if len(groups) > 1:
        others = ", ".join(f"{key} ({len(groups[key])} slices)" for key in sorted(groups) if key != uid)
        warnings.append(
            f"{folder}: {len(groups)} DICOM series in the folder; read the largest, {uid} ({len(groups[uid])} "
            f"slices); others: {others}; choose one with --series UID"
        )
    return uid, groups[uid], warnings


def _geometry_key(dataset: pydicom.Dataset) -> tuple:
    """What the slices of one volume share: orientation (to 1e-3) and image size; localizers get their own key."""
    image_type = [str(v).upper() for v in dataset.get("ImageType", [])]
    if "LOCALIZER" in image_type:
        return ("localizer",)
    orientation = tuple(round(float(v), 3) + 0.0 for v in dataset.ImageOrientationPatient)
    return (orientation, int(dataset.Rows), int(dataset.Columns))


def _drop_strays(folder: Path, uid: str, members) -> tuple[list, list[str]]:
    """Leave out the few images of a series that do not belong to its volume (a localizer or scout with the same
    SeriesInstanceUID: ImageType LOCALIZER, another orientation or another image size), with a warning.

    Only a minority is dropped (at most max(3, 10 %) of the images); a series that really mixes geometries is left
    whole for :func:`_order_slices` / :func:`_check_pixels` to refuse.
    """
    groups = defaultdict(list)
    for member in members:
        groups[_geometry_key(member[1])].append(member)
    if len(groups) == 1:
        return members, []
    volume_keys = [key for key in groups if key != ("localizer",)]
    if not volume_keys:
        return members, []
    main = max(volume_keys, key=lambda key: len(groups[key]))
    strays = len(members) - len(groups[main])
    if strays > max(3, 0.1 * len(members)):
        return members, []
    warning = (
        f"{folder}: left out {strays} image(s) of series {uid} that are not slices of its volume (a localizer or "
        "scout: another orientation or image size, or ImageType LOCALIZER)"
    )
    return groups[main], [warning]


def _order_slices(folder: Path, members) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """Sort a series' slices along the slice normal and check it has no gaps or duplicates.

    Returns:
        ``(members sorted, row_cosine [3], column_cosine [3], positions [N, 3] LPS mm)``.
    """
    orientation = np.array([float(v) for v in members[0][1].ImageOrientationPatient], dtype=np.float64)
    for _, dataset in members:
        if not np.allclose([float(v) for v in dataset.ImageOrientationPatient], orientation, atol=1e-4):
            raise InputError(folder, "series mixes slice orientations (ImageOrientationPatient differs)")
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    normal = np.cross(row_cosine, column_cosine)
    positions = np.array([[float(v) for v in d.ImagePositionPatient] for _, d in members], dtype=np.float64)
    order = np.argsort(positions @ normal, kind="stable")
    members = [members[i] for i in order]
    positions = positions[order]
    if len(members) < 2:
        raise InputError(folder, "series has a single slice (a 2D image); expected a 3D CT volume")
    steps = np.diff(positions @ normal)
    median = float(np.median(steps))
    if median <= 0 or steps.min() < 1e-3 * median:
        raise InputError(folder, "series has several slices at the same position (duplicate or mixed acquisitions)")
    gap = int(np.argmax(steps))
    if steps[gap] > _GAP_FACTOR * median:
        raise InputError(
            folder,
            f"missing slices: a gap of {steps[gap]:.2f} mm between slices {gap} and {gap + 1} "
            f"(median spacing {median:.2f} mm)",
        )
    return members, row_cosine, column_cosine, positions


# Imaging modalities whose pixels are not Hounsfield units (CT, and OT / SC exports of CT, are let through).
_NOT_CT = frozenset({"MR", "PT", "NM", "US", "CR", "DX", "MG", "XA", "RF", "IO", "PX", "OP", "SM", "ES"})


def _check_pixels(folder: Path, members) -> tuple[int, int]:
    """Check every slice has the same single-channel, single-frame geometry; refuse windowed 8-bit exports.

    Returns:
        ``(rows, columns)``.
    """
    first = members[0][1]
    modality = str(first.get("Modality", "") or "").upper()
    if modality in _NOT_CT:
        raise InputError(folder, f"is a {modality} series, not CT: covfast needs CT in Hounsfield units")
    if "PixelSpacing" not in first:
        raise InputError(folder, "series has no PixelSpacing: the in-plane voxel size is unknown")
    rows, columns = int(first.Rows), int(first.Columns)
    for _, dataset in members:
        if (int(dataset.Rows), int(dataset.Columns)) != (rows, columns):
            raise InputError(folder, "series mixes slice sizes (Rows/Columns differ)")
        if int(dataset.get("SamplesPerPixel", 1)) != 1 or int(dataset.get("NumberOfFrames", 1) or 1) != 1:
            raise InputError(folder, "series holds colour or multi-frame images; expected single greyscale slices")
        unscaled = "RescaleSlope" not in dataset and "RescaleIntercept" not in dataset
        if unscaled and int(dataset.BitsAllocated) == 8 and int(dataset.get("PixelRepresentation", 0)) == 0:
            raise InputError(folder, WINDOWED_EXPORT_PROBLEM)
    return rows, columns


def _decode(dataset: pydicom.Dataset) -> np.ndarray:
    """Stored pixel values of a single-frame slice (or of a frame of a multi-frame image), [rows, columns]."""
    frames = getattr(dataset, "_covfast_frames", None)
    if frames is not None:
        return frames.frame(dataset._covfast_frame)
    syntax = str(dataset.file_meta.get("TransferSyntaxUID", ""))
    if imagecodecs is not None and syntax in _JPEG_LOSSLESS and int(dataset.get("PixelRepresentation", 0)) == 0:
        pixels = imagecodecs.jpeg8_decode(next(generate_frames(dataset.PixelData, number_of_frames=1)))
        if pixels.shape == (int(dataset.Rows), int(dataset.Columns)):
            return pixels
    return dataset.pixel_array


def _seg_sources(members) -> tuple[list | None, list[int] | None]:
    """What a DICOM SEG of the masks references (:mod:`covfast.report.dicom_seg`), for ordered slices: (the headers of
    the single-frame slices, None) for a series; ([the multi-frame image's header], the image's frame index of each
    slice) when every slice is a frame of one enhanced image; (None, None) for a mix."""
    sources = [getattr(dataset, "_covfast_frames", None) for _, dataset in members]
    if all(source is None for source in sources):
        return [_header(dataset) for _, dataset in members], None
    if sources[0] is not None and all(source is sources[0] for source in sources):
        return [_header(sources[0].dataset)], [dataset._covfast_frame for _, dataset in members]
    return None, None


def _header(dataset: pydicom.Dataset) -> pydicom.Dataset:
    """A slice's attributes without its pixel data, and without the file's bytes that a dataset read from memory keeps
    (``FileDataset.buffer``: P001's 148 slices hold 39 MB): what a DICOM SEG of the masks references
    (:mod:`covfast.report.dicom_seg`)."""
    header = pydicom.Dataset({tag: element for tag, element in dataset.items() if tag != _PIXEL_DATA})
    header.file_meta = dataset.file_meta
    return header


def _rescale(dataset: pydicom.Dataset) -> tuple[float, float]:
    return float(dataset.get("RescaleSlope", 1) or 1), float(dataset.get("RescaleIntercept", 0) or 0)


def _decode_into(folder: Path, members, scalings, shape: tuple, dtype) -> tuple[np.ndarray, float, float]:
    """Decode and rescale every slice into a new [N, rows, columns] array of ``dtype``, in decoding threads.

    Returns:
        ``(stack, lowest HU, highest HU)``; the range is of the exact values, before any cast to ``dtype``.
    """
    stack = np.empty(shape, dtype=dtype)
    work = np.int32 if dtype == np.int16 else np.float64

    def convert(k: int) -> tuple[float, float]:
        try:
            pixels = _decode(members[k][1])
        # pydicom's handlers raise RuntimeError/NotImplementedError/ValueError; imagecodecs' errors are RuntimeErrors.
        except (RuntimeError, NotImplementedError, ValueError, AttributeError) as exc:
            raise InputError(folder, f"cannot decode slice {k} ({exc})") from None
        slope, inter = scalings[k]
        hu = pixels.astype(work)
        if slope != 1:
            hu *= work(slope)
        if inter != 0:
            hu += work(inter)
        np.copyto(stack[k], hu, casting="unsafe")
        return float(hu.min()), float(hu.max())

    with ThreadPoolExecutor(_DECODE_THREADS) as pool:
        ranges = np.array(list(pool.map(convert, range(len(members)))))
    return stack, float(ranges[:, 0].min()), float(ranges[:, 1].max())


def _decode_hu(folder: Path, members, rows: int, columns: int) -> np.ndarray:
    """Decode all slices into HU, [N, rows, columns] in slice order: int16 when integral and in range, else float32.

    Raises:
        InputError: a slice cannot be decoded, or the series looks like a windowed 8-bit export.
    """
    scalings = [_rescale(dataset) for _, dataset in members]
    whole = all(slope.is_integer() and inter.is_integer() for slope, inter in scalings)
    shape = (len(members), rows, columns)
    stack, low, high = _decode_into(folder, members, scalings, shape, np.int16 if whole else np.float32)
    if whole and (low < _INT16.min or high > _INT16.max):
        # Rare (an unusual rescale): decode again into float32 rather than wrap around int16.
        stack, low, high = _decode_into(folder, members, scalings, shape, np.float32)
    check_hounsfield(folder, low, high)
    return stack


def ras_affine(row_cosine, column_cosine, pixel_spacing, first_position, last_position, n_slices) -> np.ndarray:
    """RAS affine of the DICOM source grid (column index i, row index j, slice index k).

    DICOM patient coordinates are LPS: x to the patient's left, y posterior; RAS negates x and y.
    PixelSpacing is (row spacing, column spacing): the step between rows, then between columns.

    Args:
        row_cosine: [3] direction of increasing column index (first half of ImageOrientationPatient), LPS.
        column_cosine: [3] direction of increasing row index (second half), LPS.
        pixel_spacing: (row spacing, column spacing) in mm.
        first_position: [3] ImagePositionPatient of slice 0 (LPS mm, centre of its first voxel).
        last_position: [3] ImagePositionPatient of the last slice.
        n_slices: number of slices (>= 2).

    Returns:
        [4, 4] float64 affine mapping (i, j, k, 1) to RAS mm.
    """
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(row_cosine, dtype=np.float64) * float(pixel_spacing[1])
    lps[:3, 1] = np.asarray(column_cosine, dtype=np.float64) * float(pixel_spacing[0])
    lps[:3, 2] = (np.asarray(last_position, dtype=np.float64) - first_position) / (n_slices - 1)
    lps[:3, 3] = first_position
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def load_dicom_series(folder, series: str | None = None, max_voxels: int = 2**30) -> Volume:
    """Load one CT series from a DICOM folder in Hounsfield units, reoriented to canonical order.

    Args:
        folder: a folder whose files (directly inside it) are the series' DICOM files; other files are ignored.
        series: SeriesInstanceUID to read when the folder holds several series; default the largest.
        max_voxels: refuse a series with more voxels than this, before decoding.

    Returns:
        Volume of kind ``"dicom"`` with the RAS affine built from ImagePositionPatient / ImageOrientationPatient
        / PixelSpacing (qform and sform codes 1), ``source_shape`` (columns, rows, slices).

    Raises:
        InputError: no image series, unknown ``series``, missing or duplicate slices, mixed geometry, too many
            voxels, undecodable pixels, a windowed 8-bit export, a non-CT modality or no PixelSpacing.
    """
    folder_path = Path(folder)
    images, warnings = _read_images(folder_path)
    return _series_volume(folder_path, images, warnings, series, max_voxels)


def load_dicom_file(path, max_voxels: int = 2**30) -> Volume:
    """Load a CT volume stored as one enhanced (multi-frame) DICOM image file, as :func:`load_dicom_series` does.

    Raises:
        InputError: the file cannot be parsed, is a single-frame slice (its folder is the input), or any problem of
            :func:`load_dicom_series`.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
        raise InputError(path, f"is an unreadable DICOM file ({exc})") from None
    if "PerFrameFunctionalGroupsSequence" not in dataset:
        raise InputError(path, "is a single DICOM file; pass the folder that holds the whole series")
    warnings: list[str] = []
    images = _images_of(path.name, data, dataset, warnings)
    if not images:
        raise InputError(path, "is a multi-frame DICOM image whose frames have no position or orientation")
    return _series_volume(path, images, warnings, None, max_voxels)


def _series_volume(folder_path: Path, images, warnings: list[str], series: str | None, max_voxels: int) -> Volume:
    """The volume of the chosen series among parsed images (:func:`load_dicom_series`)."""
    uid, members, choice_warnings = _choose_series(folder_path, images, series)
    members, stray_warnings = _drop_strays(folder_path, uid, members)
    members, row_cosine, column_cosine, positions = _order_slices(folder_path, members)
    rows, columns = _check_pixels(folder_path, members)
    source_shape = (columns, rows, len(members))
    check_size(folder_path, source_shape, max_voxels)
    stack = _decode_hu(folder_path, members, rows, columns)
    headers, frame_numbers = _seg_sources(members)
    pixel_spacing = [float(v) for v in members[0][1].PixelSpacing]
    affine = ras_affine(row_cosine, column_cosine, pixel_spacing, positions[0], positions[-1], len(members))
    digest = hashlib.sha256()
    for data, _ in members:
        digest.update(data)
    # The stack is [slice, row, column]; its transpose is the (column, row, slice) source grid.
    hu = np.ascontiguousarray(canonical_view(stack.transpose(2, 1, 0), affine))
    spacing_mm, z_mm = grid_geometry(affine, source_shape)
    return Volume(
        hu=hu,
        spacing_mm=spacing_mm,
        z_mm=z_mm,
        path=str(folder_path),
        sha256=digest.hexdigest(),
        kind="dicom",
        source_shape=source_shape,
        affine=affine,
        qform_code=1,
        sform_code=1,
        series_uid=uid,
        warnings=warnings + choice_warnings + stray_warnings,
        source_headers=headers,
        source_frames=frame_numbers,
    )
