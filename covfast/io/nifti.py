"""NIfTI-1/NIfTI-2 volumes (.nii, .nii.gz): reading with header-first checks, and writing masks on the input grid.

Reading parses the header with nibabel, checks the claimed size before anything is allocated for the data,
then maps (``.nii``) or decompresses with ISA-L (``.nii.gz``, faster than zlib) and views the voxels in place;
the only full-size allocation is the canonical HU array itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip, isal_zlib
from nibabel.spatialimages import HeaderDataError

from covfast.errors import InputError
from covfast.io.atomic import atomic_write
from covfast.io.volume import Volume, canonical_view, check_shape, check_size, grid_geometry, to_canonical_hu

GZIP_MAGIC = b"\x1f\x8b"
_HEADER_CLASSES = {348: nib.Nifti1Header, 540: nib.Nifti2Header}
_IMAGE_CLASSES = {nib.Nifti1Header: nib.Nifti1Image, nib.Nifti2Header: nib.Nifti2Image}
_SINGLE_FILE_MAGIC = {nib.Nifti1Header: b"n+1", nib.Nifti2Header: b"n+2"}
_DECOMPRESS_ERRORS = (EOFError, OSError, zlib.error, isal_zlib.error)
# ISA-L level 2 compresses masks to about the size zlib level 6 does, several times faster.
_MASK_GZIP_LEVEL = 2


def nifti_header_class(head: bytes):
    """The nibabel header class for the first bytes of an (uncompressed) NIfTI file, or None if not NIfTI.

    Args:
        head: at least the first 4 bytes of the file (sizeof_hdr, either byte order).
    """
    for order in ("little", "big"):
        header_class = _HEADER_CLASSES.get(int.from_bytes(head[:4], order))
        if header_class is not None:
            return header_class
    return None


def _read_head(path: Path, compressed: bool) -> bytes:
    """The first 540 bytes of the (decompressed) file: enough for either NIfTI header."""
    try:
        if compressed:
            with igzip.open(path, "rb") as file:
                return file.read(540)
        with open(path, "rb") as file:
            return file.read(540)
    except _DECOMPRESS_ERRORS as exc:
        raise InputError(path, f"is a corrupt or truncated gzip file ({exc})") from None


@contextlib.contextmanager
def _quiet_nibabel():
    """Silence nibabel's header-fix log lines (they would break covfast's one-line messages)."""
    logger = logging.getLogger("nibabel.global")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _parse_header(path: Path, head: bytes):
    """Parse and validate a NIfTI header from the file's first bytes.

    Returns:
        (header, 3D shape, data dtype, voxel data offset in bytes).
    """
    header_class = nifti_header_class(head)
    if header_class is None:
        raise InputError(path, "is not a NIfTI file (no valid NIfTI-1/NIfTI-2 header)")
    if len(head) < header_class.template_dtype.itemsize:
        raise InputError(path, f"is truncated: {len(head)} bytes, shorter than a NIfTI header")
    try:
        header = header_class.from_fileobj(io.BytesIO(head), check=False)
        if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0 and not np.all(header["pixdim"][1:4] > 0):
            # With neither orientation matrix the voxel sizes come from pixdim alone; nibabel would take 1 mm.
            pixdim = [round(float(v), 4) for v in header["pixdim"][1:4]]
            raise InputError(path, f"has no voxel size: pixdim {pixdim} holds zero or negative values and there is no "
                                   "qform or sform")
        # nibabel's header check (what from_fileobj(check=True) runs) fixes small defects and logs each to stderr; the
        # message above covers what matters.
        with _quiet_nibabel():
            header.check_fix()
    except (HeaderDataError, ValueError, TypeError) as exc:
        raise InputError(path, f"has an invalid NIfTI header ({exc})") from None
    magic = bytes(header["magic"])
    if not magic.startswith(_SINGLE_FILE_MAGIC[header_class]):
        raise InputError(path, "is a NIfTI/Analyze header without single-file data (.hdr/.img pairs unsupported)")
    dtype = header.get_data_dtype()
    if dtype.kind not in "iuf" or dtype.fields is not None:
        raise InputError(path, f"has voxel type {dtype}; expected real-valued intensities")
    return header, header.get_data_shape(), dtype, int(header.get_data_offset())


def read_nifti_data(path, max_voxels: int, expected_shape: tuple | None = None):
    """Read a NIfTI file's voxels as a source-ordered view, checking the header before any allocation.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file (compression is detected from the content).
        max_voxels: refuse headers that claim more voxels than this.
        expected_shape: if given, refuse a grid of another 3D shape (a mask for a known volume).

    Returns:
        ``(source, header, sha256)``: [X, Y, Z] raw voxel array in NIfTI (Fortran) order, a read-only view of
        the decompressed bytes or a memmap; the nibabel header; the file's SHA-256 hex digest.

    Raises:
        InputError: not NIfTI, corrupt or truncated, not 3D, a zero dimension, larger than ``max_voxels``, or
            not of ``expected_shape``.
    """
    path = Path(path)
    with open(path, "rb") as file:
        compressed = file.read(2) == GZIP_MAGIC
    header, shape, dtype, offset = _parse_header(path, _read_head(path, compressed))
    shape3 = check_shape(path, shape)
    if expected_shape is not None and shape3 != tuple(expected_shape):
        raise InputError(path, f"mask shape {shape3} differs from the volume's {tuple(expected_shape)}")
    check_size(path, shape3, max_voxels)
    data_bytes = int(np.prod(shape3, dtype=object)) * dtype.itemsize
    if compressed:
        blob = path.read_bytes()
        sha256 = hashlib.sha256(blob).hexdigest()
        try:
            raw = igzip.decompress(blob)
        except _DECOMPRESS_ERRORS as exc:
            raise InputError(path, f"is a corrupt or truncated gzip file ({exc})") from None
        del blob
        available = len(raw) - offset
    else:
        sha256 = _file_sha256(path)
        available = path.stat().st_size - offset
    if available < data_bytes:
        raise InputError(
            path,
            f"is truncated: the header claims shape {tuple(shape)} {dtype} ({data_bytes:,} bytes of voxels) "
            f"but the file holds {max(available, 0):,}",
        )
    if compressed:
        source = np.frombuffer(raw, dtype=dtype, count=data_bytes // dtype.itemsize, offset=offset)
    else:
        source = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(data_bytes // dtype.itemsize,))
    return source.reshape(shape3, order="F"), header, sha256


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _slope_inter(header) -> tuple[float, float]:
    """The header's scl_slope/scl_inter; NIfTI treats a zero or NaN slope as 'no scaling'."""
    slope, inter = header.get_slope_inter()
    return (1.0 if slope is None else float(slope)), (0.0 if inter is None else float(inter))


def load_nifti(path, max_voxels: int) -> Volume:
    """Load a NIfTI CT volume in Hounsfield units, reoriented to canonical order.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        max_voxels: refuse headers that claim more voxels than this, before allocating.

    Returns:
        Volume of kind ``"nifti"``; ``affine`` is the header's best affine (sform, else qform, else pixdim).

    Raises:
        InputError: see :func:`read_nifti_data`, plus NaN/Inf voxels or a windowed 8-bit export.
    """
    source, header, sha256 = read_nifti_data(path, max_voxels)
    affine = header.get_best_affine()
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "has a degenerate affine (zero or non-finite voxel axes)")
    slope, inter = _slope_inter(header)
    hu = to_canonical_hu(path, source, affine, slope, inter)
    spacing_mm, z_mm = grid_geometry(affine, source.shape)
    warnings = []
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        warnings.append(
            "the NIfTI header has no orientation (qform and sform codes are 0): the voxel axes were read in "
            "Analyze's default order (x toward the patient's left, y toward anterior, z toward superior), so right "
            "and left may be swapped; check preview.png"
        )
    return Volume(
        hu=hu,
        spacing_mm=spacing_mm,
        z_mm=z_mm,
        path=str(path),
        sha256=sha256,
        kind="nifti",
        source_shape=tuple(source.shape),
        affine=affine,
        qform_code=int(header["qform_code"]),
        sform_code=int(header["sform_code"]),
        source_header=header,
        warnings=warnings,
    )


def load_mask_like(path, volume: Volume) -> np.ndarray:
    """Load a label mask (e.g. ``--infection-mask``) that must lie on exactly the volume's grid.

    Args:
        path: NIfTI file with values 0/1 or 0/1/2 on the same grid (shape and affine) as ``volume``.
        volume: the CT volume the mask belongs to.

    Returns:
        [D, H, W] uint8 mask in the volume's canonical orientation, C-contiguous.

    Raises:
        InputError: missing or unreadable file, another grid, or values other than whole numbers 0..2.
    """
    if not Path(path).is_file():
        raise InputError(path, "does not exist or is not a file")
    source, header, _ = read_nifti_data(path, int(np.prod(volume.source_shape)), expected_shape=volume.source_shape)
    affine = header.get_best_affine()
    # Headers store affines in float32: allow its rounding, nothing more (1e-3 mm).
    if not np.allclose(affine, volume.affine, rtol=0, atol=1e-3):
        raise InputError(path, "mask affine differs from the volume's: it is not on the same voxel grid")
    slope, inter = _slope_inter(header)
    values = source if (slope, inter) == (1.0, 0.0) else source * slope + inter
    low, high = float(values.min()), float(values.max())
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 2:
        raise InputError(path, f"mask values span {low:g}..{high:g}; expected labels 0/1 or 0/1/2")
    view = canonical_view(values, volume.affine)
    mask = np.empty(view.shape, dtype=np.uint8)
    np.copyto(mask, view, casting="unsafe")
    if values.dtype.kind == "f" and not np.array_equal(mask, view):
        raise InputError(path, "mask holds fractional values; expected labels 0/1 or 0/1/2")
    return mask


def nifti_bytes_like(volume: Volume, canonical_mask: np.ndarray, compress: bool, scale: float | None = None) -> bytes:
    """Serialise a canonical mask as a uint8 NIfTI on the volume's source grid (shape, affine, qform/sform).

    Args:
        volume: the input volume whose grid the mask takes.
        canonical_mask: [D, H, W] integer labels (0..255) in canonical orientation.
        compress: gzip the result (for ``.nii.gz``).
        scale: when given, the stored uint8 values are quantised real values: the header's scl_slope is ``scale``
            (readers such as nibabel's ``get_fdata`` then return ``value * scale``).

    Returns:
        The file's bytes.
    """
    mask = np.asarray(canonical_mask)
    if mask.shape != volume.hu.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the volume's canonical shape {volume.hu.shape}")
    data = np.asfortranarray(volume.to_source(mask).astype(np.uint8, copy=False))
    if volume.source_header is not None:
        header = volume.source_header.copy()
        header.extensions.clear()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1.0, 0.0)
        header["cal_min"], header["cal_max"] = 0, 0
        image = _IMAGE_CLASSES[type(header)](data, None, header=header)
    else:
        image = nib.Nifti1Image(data, volume.affine)
        image.set_qform(volume.affine, code=volume.qform_code)
        image.set_sform(volume.affine, code=volume.sform_code)
        image.header.set_xyzt_units("mm")
    if scale is not None:  # after the image exists: building one from an array resets the header's scaling
        image.header.set_slope_inter(scale, 0.0)
    image.header["descrip"] = b"covfast mask" if scale is None else b"covfast probability"
    payload = image.to_bytes()
    return igzip.compress(payload, compresslevel=_MASK_GZIP_LEVEL) if compress else payload


def write_nifti_like(volume: Volume, canonical_mask: np.ndarray, path, scale: float | None = None) -> None:
    """Write a mask as a uint8 NIfTI with the input's exact grid, atomically.

    The output has the input's source shape, affine, qform and sform matrices and codes (for DICOM input the
    built RAS affine with codes 1). ``.gz`` in the name selects gzip compression.

    Args:
        volume: the input volume.
        canonical_mask: [D, H, W] integer labels (0..255) in canonical orientation.
        path: output file (``.nii`` or ``.nii.gz``); its folder must exist.
        scale: scl_slope of quantised real values (see :func:`nifti_bytes_like`); None for labels.

    Raises:
        OutputError: the file cannot be written (nothing partial is left).
    """
    payload = nifti_bytes_like(volume, canonical_mask, compress=str(path).endswith(".gz"), scale=scale)
    atomic_write(path, lambda file: file.write(payload))
