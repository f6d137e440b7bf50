"""The in-memory CT volume in canonical orientation, and the checks every input passes.

Canonical orientation: ``hu[d, h, w]`` with D = slices inferior -> superior, H = rows anterior -> posterior,
W = columns patient right -> patient left (radiological display: the right lung sits at low W). In nibabel's
axis codes the canonical array axes (D, H, W) point ``("S", "P", "L")``.

The source grid (NIfTI array order, or DICOM (columns, rows, slices)) and its RAS affine are kept so that
masks computed on the canonical array can be written back on exactly the input's grid.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from covfast.errors import InputError

CANONICAL_AXCODES = ("S", "P", "L")
_CANONICAL_ORNT = axcodes2ornt(CANONICAL_AXCODES)
_INT16_MIN, _INT16_MAX = np.iinfo(np.int16).min, np.iinfo(np.int16).max
# An 8-bit windowed export (PNG/JPEG-like grey levels) has no negative values and nothing above 255; real HU
# chest CT always contains air at about -1000.
_WINDOWED_MAX = 255
WINDOWED_EXPORT_PROBLEM = "looks like a windowed 8-bit export (values 0..255), not Hounsfield units"


@dataclass
class Volume:
    """A CT volume in Hounsfield units, canonical orientation, with the geometry of its source grid.

    Attributes:
        hu: [D, H, W] int16 when the data are integral HU (else float32), C-contiguous, canonical orientation
            (D inferior -> superior, H anterior -> posterior, W patient right -> patient left).
        spacing_mm: (d, h, w) voxel size in mm in canonical order.
        z_mm: [D] float64 position of each canonical slice centre along the body (S) axis, mm (RAS z).
        path: the input path as given.
        sha256: SHA-256 of the file; for a DICOM series of the series' files' bytes in slice order; for an
            array of its canonical HU bytes.
        kind: ``"nifti"``, ``"dicom"`` or ``"array"``.
        source_shape: shape of the source grid (NIfTI array shape, DICOM (columns, rows, slices)).
        affine: [4, 4] float64 RAS affine of the source grid (source voxel index -> RAS mm).
        qform_code: NIfTI qform code of the source (1 for DICOM, 2 for arrays).
        sform_code: NIfTI sform code of the source (1 for DICOM, 2 for arrays).
        series_uid: the DICOM SeriesInstanceUID read, else None.
        warnings: problems that did not stop loading (e.g. several series in a DICOM folder).
    """

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    z_mm: np.ndarray
    path: str
    sha256: str
    kind: str
    source_shape: tuple
    affine: np.ndarray
    qform_code: int
    sform_code: int
    series_uid: str | None = None
    warnings: list[str] = field(default_factory=list)
    # The NIfTI header of the source (None for DICOM and arrays): write_nifti_like copies its qform and sform
    # matrices, which may differ from each other, so that output masks keep the input's exact grid.
    source_header: object = field(default=None, repr=False, compare=False)
    # What a DICOM SEG of the masks references (covfast.report.dicom_seg), without pixel data: a DICOM series' slice
    # datasets in the source grid's slice order, or the one dataset of an enhanced multi-frame image with
    # ``source_frames`` (its frame index of each source slice); None for other inputs.
    source_headers: list | None = field(default=None, repr=False, compare=False)
    source_frames: list | None = field(default=None, repr=False, compare=False)

    def to_source(self, canonical: np.ndarray) -> np.ndarray:
        """Reorder a canonical array into the source grid's voxel order.

        Args:
            canonical: [D, H, W] array of any dtype on this volume's canonical grid.

        Returns:
            The same data in source voxel order, shape ``source_shape``; a view (flips and transposes) of
            ``canonical``, not a copy.
        """
        if canonical.shape != self.hu.shape:
            raise ValueError(f"array shape {canonical.shape} is not the volume's canonical shape {self.hu.shape}")
        return apply_orientation(canonical, ornt_transform(_CANONICAL_ORNT, io_orientation(self.affine)))

    def from_source(self, source: np.ndarray) -> np.ndarray:
        """Reorder an array on the source grid into canonical orientation.

        Args:
            source: array of shape ``source_shape``, any dtype.

        Returns:
            [D, H, W] C-contiguous array, same dtype; no copy when the reordered view is already C-contiguous.
        """
        if tuple(source.shape) != tuple(self.source_shape):
            raise ValueError(f"array shape {source.shape} is not the volume's source shape {self.source_shape}")
        return np.ascontiguousarray(canonical_view(source, self.affine))


def source_to_canonical(affine: np.ndarray) -> np.ndarray:
    """Orientation transform (nibabel ``ornt``) that takes a source array with this affine to canonical order.

    Args:
        affine: [4, 4] RAS affine of the source grid.

    Returns:
        [3, 2] float array, nibabel orientation transform (per source axis: canonical axis, flip).
    """
    return ornt_transform(io_orientation(affine), _CANONICAL_ORNT)


def canonical_view(source: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """View a source-ordered 3D array in canonical orientation (flips and transposes only, no copy)."""
    return apply_orientation(source, source_to_canonical(affine))


def canonical_affine(affine: np.ndarray, source_shape: tuple) -> np.ndarray:
    """RAS affine of the canonical grid: canonical voxel index (d, h, w) -> RAS mm.

    Args:
        affine: [4, 4] RAS affine of the source grid.
        source_shape: the source grid's 3D shape.

    Returns:
        [4, 4] float64 affine.
    """
    return np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(source_to_canonical(affine), source_shape)


def grid_geometry(affine: np.ndarray, source_shape: tuple) -> tuple[tuple[float, float, float], np.ndarray]:
    """Canonical voxel spacing and the body-axis position of every canonical slice.

    Args:
        affine: [4, 4] RAS affine of the source grid.
        source_shape: the source grid's 3D shape.

    Returns:
        ``(spacing_mm, z_mm)``: (d, h, w) voxel sizes in mm, and [D] float64 RAS z of each slice centre.
    """
    canon = canonical_affine(affine, source_shape)
    spacing = np.sqrt((canon[:3, :3] ** 2).sum(axis=0))
    depth, height, width = (int(source_shape[int(i)]) for i in np.argsort(source_to_canonical(affine)[:, 0]))
    index = np.stack(
        [np.arange(depth, dtype=np.float64), np.full(depth, (height - 1) / 2), np.full(depth, (width - 1) / 2)]
    )
    z_mm = canon[2, :3] @ index + canon[2, 3]
    return (float(spacing[0]), float(spacing[1]), float(spacing[2])), z_mm


def check_shape(path, shape: tuple) -> tuple:
    """Check that a source grid is a 3D volume; drop trailing singleton dimensions (e.g. a 4D [X, Y, Z, 1]).

    Args:
        path: the input, named in the error.
        shape: the array or header shape.

    Returns:
        The 3D shape.

    Raises:
        InputError: not 3D after dropping trailing singletons, or a zero dimension.
    """
    shape = tuple(int(n) for n in shape)
    if any(n == 0 for n in shape):
        raise InputError(path, f"has a zero dimension (shape {shape}); a CT volume needs voxels in all 3 axes")
    squeezed = shape
    while len(squeezed) > 3 and squeezed[-1] == 1:
        squeezed = squeezed[:-1]
    if len(squeezed) != 3:
        raise InputError(path, f"is a {len(shape)}D array (shape {shape}); expected a 3D CT volume")
    return squeezed


def check_size(path, shape: tuple, max_voxels: int) -> None:
    """Refuse a grid larger than ``max_voxels`` before anything is allocated for it.

    Raises:
        InputError: the grid has more than ``max_voxels`` voxels.
    """
    voxels = int(np.prod(shape, dtype=object))
    if voxels > max_voxels:
        raise InputError(path, f"claims {voxels:,} voxels (shape {tuple(shape)}), more than the limit {max_voxels:,}")


def value_range(path, values: np.ndarray) -> tuple[float, float]:
    """Minimum and maximum of an array, refusing NaN/Inf (two reductions, no temporary arrays).

    Raises:
        InputError: the array holds NaN or infinite values.
    """
    low, high = values.min(), values.max()
    if not (np.isfinite(low) and np.isfinite(high)):
        raise InputError(path, "contains NaN or infinite voxel values")
    return float(low), float(high)


def check_hounsfield(path, low: float, high: float) -> None:
    """Refuse a value range that is not a CT's: a blank volume, or a windowed 8-bit export rather than Hounsfield
    units.

    Raises:
        InputError: every voxel has the same value, every value lies within 0..255, or none is negative.
    """
    if low == high:
        raise InputError(path, f"every voxel has the same value ({low:g}): a blank volume, not a CT")
    if low >= 0 and high <= _WINDOWED_MAX:
        raise InputError(path, WINDOWED_EXPORT_PROBLEM)
    if low >= 0:
        # Air is about -1000 HU, and every chest CT holds air (around the body, in the lungs, or as the padding
        # outside the reconstruction circle).
        raise InputError(path, f"has no negative values (range {low:g}..{high:g}): not Hounsfield units, in which "
                               "air is about -1000 (stored values without their rescale intercept?)")


def _is_integral(values: np.ndarray) -> bool:
    """Whether a float array holds only whole numbers, checked a slab at a time to bound temporary memory."""
    if values.dtype.kind in "iub":
        return True
    # Walk the axis with the largest stride so each slab is contiguous memory whatever the array's order.
    slab_axis = int(np.argmax(np.abs(values.strides)))
    return all(np.array_equal(slab, np.rint(slab)) for slab in np.moveaxis(values, slab_axis, 0))


def to_canonical_hu(path, source: np.ndarray, affine: np.ndarray, slope: float = 1.0, inter: float = 0.0):
    """Scale source values to HU and copy them into a C-contiguous canonical array, refusing non-HU data.

    Args:
        path: the input, named in errors.
        source: [X, Y, Z] source-ordered raw values (any real dtype; may be a read-only view or a memmap).
        affine: [4, 4] RAS affine of the source grid.
        slope: HU = raw * slope + inter.
        inter: see ``slope``.

    Returns:
        [D, H, W] canonical HU array: int16 when the scaled values are whole numbers within int16, else float32.

    Raises:
        InputError: NaN/Inf voxels, or values that look like a windowed 8-bit export.
    """
    raw_low, raw_high = value_range(path, source)
    low, high = sorted((raw_low * slope + inter, raw_high * slope + inter))
    if not (np.isfinite(low) and np.isfinite(high)):
        raise InputError(path, "contains voxel values that overflow after rescaling")
    check_hounsfield(path, low, high)
    whole_scaling = float(slope).is_integer() and float(inter).is_integer()
    fits_int16 = _INT16_MIN <= low and high <= _INT16_MAX
    view = canonical_view(source, affine)
    dtype = np.int16 if whole_scaling and fits_int16 and _is_integral(source) else np.float32
    hu = np.empty(view.shape, dtype=dtype)
    if slope == 1 and inter == 0:
        np.copyto(hu, view, casting="unsafe")
        return hu
    work = np.int32 if dtype == np.int16 else np.float64
    # Slice by slice so the wider intermediate type costs one slice of memory, not one volume.
    for d in range(view.shape[0]):
        scaled = view[d].astype(work)
        scaled *= work(slope)
        scaled += work(inter)
        np.copyto(hu[d], scaled, casting="unsafe")
    return hu


def load_array(hu: np.ndarray, spacing_mm=(1.0, 1.0, 1.0)) -> Volume:
    """Wrap an in-memory HU array that is already in canonical orientation.

    Args:
        hu: [D, H, W] Hounsfield units (any real dtype; a trailing singleton dimension is dropped), canonical
            orientation (D inferior -> superior, H anterior -> posterior, W patient right -> left).
        spacing_mm: (d, h, w) voxel size in mm.

    Returns:
        A Volume of kind ``"array"`` whose source grid is the canonical grid; its affine places voxel (0, 0, 0)
        at the RAS origin with axes S, P, L.

    Raises:
        InputError: not 3D, a zero dimension, NaN/Inf values, a windowed 8-bit export, or a bad spacing.
    """
    path = "<array>"
    hu = np.asarray(hu)
    if hu.dtype.kind not in "iuf":
        raise InputError(path, f"has dtype {hu.dtype}; expected real-valued Hounsfield units")
    shape = check_shape(path, hu.shape)
    hu = hu.reshape(shape)
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(path, f"spacing_mm {spacing_mm} must be three positive finite numbers (d, h, w)")
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = spacing[0], -spacing[1], -spacing[2], 1.0
    canonical = to_canonical_hu(path, hu, affine)
    spacing_out, z_mm = grid_geometry(affine, shape)
    return Volume(
        hu=canonical,
        spacing_mm=spacing_out,
        z_mm=z_mm,
        path=path,
        sha256=hashlib.sha256(canonical.data).hexdigest(),
        kind="array",
        source_shape=shape,
        affine=affine,
        qform_code=2,
        sform_code=2,
    )
