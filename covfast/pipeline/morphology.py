"""The lung mask's morphology on either scipy (the CPU default) or torch (any torch device, the GPU in the GPU pipeline).

Every operation here is a max or min filter over centred rectangles of odd size, or over the 6-connected cross, on
small non-negative integer arrays, so both backends give bit-identical results: a max filter with zero ("constant",
0) padding equals ``max_pool`` with its implicit -inf padding on non-negative data, a min filter with ``nearest``
padding equals ``-max_pool(-x)`` after replicate padding, and scipy's ``reflect`` padding of a grey dilation with a
footprint that holds its centre never raises a voxel above what the centre already gives. The rectangles are
separable, so torch runs them as two 1D pools. Values travel as float16 on CUDA and float32 elsewhere, exact for
the 0/1/2 labels used here.

``backend`` is ``"scipy"`` or a torch device string (``"cuda"``, ``"cpu"``: the latter for tests).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi


def bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice]:
    """The smallest box holding every nonzero voxel of a non-empty [D, H, W] mask, as slices."""
    return tuple(
        slice(int(idx[0]), int(idx[-1]) + 1)
        for idx in (np.flatnonzero(mask.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    )


def resting_on(labels: np.ndarray, below: np.ndarray, max_share: float, where: tuple | None = None) -> np.ndarray:
    """Which components of [D, H, W] integer ``labels`` (0 background, 1..N, D inferior -> superior) rest on
    ``below``: more than ``max_share`` of their lower surface (voxels whose inferior neighbour is not in the same
    component) lies over a ``below`` voxel in the slice under it.

    ``where``: ``np.nonzero(labels)`` when the caller has it. The test runs over those voxels only: infection
    components fill a few percent of their box (part of :func:`covfast.pipeline.infection.drop_components`' speed-up,
    ``benchmarks/postprocess_speed.py``).

    Returns:
        [N + 1] bool by label (index 0, the background, False).
    """
    count = int(labels.max())
    if count == 0 or labels.shape[0] < 2:
        return np.zeros(count + 1, dtype=bool)
    z, y, x = np.nonzero(labels) if where is None else where
    keep = z > 0  # the first slice has nothing under it
    z, y, x = z[keep] - 1, y[keep], x[keep]
    own = labels[z + 1, y, x].astype(np.intp)
    bottom = labels[z, y, x] != own
    surface = np.bincount(own[bottom], minlength=count + 1)
    supported = np.bincount(own[bottom & below[z, y, x]], minlength=count + 1)
    resting = (surface > 0) & (supported > max_share * surface)
    resting[0] = False
    return resting


def _to_torch(array: np.ndarray, device: str) -> torch.Tensor:
    """[D, H, W] bool or uint8 array -> [D, H, W] float tensor on ``device``."""
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    as_bytes = np.ascontiguousarray(array).view(np.uint8) if array.dtype == bool else array
    return torch.from_numpy(as_bytes).to(device=device, dtype=dtype, non_blocking=True)


def _to_numpy(tensor: torch.Tensor, dtype) -> np.ndarray:
    return tensor[:, 0].to(torch.uint8).cpu().numpy().astype(dtype, copy=False)


def _max_rect(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Per-slice max filter of [D, 1, H, W] ``x`` by a centred (1, h, w) rectangle, outside counting as -inf."""
    _, h, w = size
    if h > 1:
        x = F.max_pool2d(x, (h, 1), stride=1, padding=(h // 2, 0))
    if w > 1:
        x = F.max_pool2d(x, (1, w), stride=1, padding=(0, w // 2))
    return x


def _union_max(x: torch.Tensor, sizes: list[tuple[int, int, int]]) -> torch.Tensor:
    """Per-slice dilation of [D, 1, H, W] ``x`` by the union of the rectangles: the maximum of their max filters."""
    return torch.stack([_max_rect(x, size) for size in sizes]).amax(dim=0)


def _min_rect_nearest(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Per-slice min filter of [D, 1, H, W] ``x`` by a centred (1, h, w) rectangle, edges replicated outward."""
    _, h, w = size
    padded = F.pad(x, (w // 2, w // 2, h // 2, h // 2), mode="replicate")
    out = -padded
    if h > 1:
        out = F.max_pool2d(out, (h, 1), stride=1)
    if w > 1:
        out = F.max_pool2d(out, (1, w), stride=1)
    return -out


def max_filter(mask: np.ndarray, size: tuple[int, int, int], backend: str = "scipy") -> np.ndarray:
    """[D, H, W] uint8 max filter of a [D, H, W] bool or uint8 array by a (1, h, w) rectangle, zero outside."""
    as_bytes = mask.view(np.uint8) if mask.dtype == bool else mask
    if backend == "scipy":
        return ndi.maximum_filter(as_bytes, size=size, mode="constant", cval=0)
    return _to_numpy(_max_rect(_to_torch(as_bytes, backend)[:, None], size), np.uint8)


def union_dilation(mask: np.ndarray, sizes: list[tuple[int, int, int]], backend: str = "scipy") -> np.ndarray:
    """[D, H, W] uint8 per-slice dilation of bool ``mask`` by the union of centred (1, h, w) rectangles."""
    if backend == "scipy":
        as_bytes = mask.view(np.uint8)
        dilated = ndi.maximum_filter(as_bytes, size=sizes[0], mode="constant", cval=0)
        for size in sizes[1:]:
            np.maximum(dilated, ndi.maximum_filter(as_bytes, size=size, mode="constant", cval=0), out=dilated)
        return dilated
    return _to_numpy(_union_max(_to_torch(mask, backend)[:, None], sizes), np.uint8)


def union_closing(mask: np.ndarray, sizes: list[tuple[int, int, int]], backend: str = "scipy") -> np.ndarray:
    """[D, H, W] bool per-slice closing of bool ``mask`` by the union of centred (1, h, w) rectangles: the dilation
    (zero outside) then the erosion (edges replicated)."""
    if backend == "scipy":
        dilated = union_dilation(mask, sizes)
        closed = ndi.minimum_filter(dilated, size=sizes[0], mode="nearest")
        for size in sizes[1:]:
            np.minimum(closed, ndi.minimum_filter(dilated, size=size, mode="nearest"), out=closed)
        return closed.view(bool)
    dilated = _union_max(_to_torch(mask, backend)[:, None], sizes)
    closed = torch.stack([_min_rect_nearest(dilated, size) for size in sizes]).amin(dim=0)
    return _to_numpy(closed, np.uint8).view(bool)


def cross_dilation(labels: np.ndarray, backend: str = "scipy") -> np.ndarray:
    """[D, H, W] grey dilation of a non-negative [D, H, W] uint8 array by the 3D 6-connected cross."""
    if backend == "scipy":
        # Each voxel takes the maximum of itself and its six face neighbours: six shifted maxima, several times faster
        # than ``ndi.grey_dilation`` with the cross footprint, and equal to it (its ``reflect`` edges add nothing).
        grown = labels.copy()
        for axis in range(3):
            later = tuple(slice(1, None) if a == axis else slice(None) for a in range(3))
            earlier = tuple(slice(None, -1) if a == axis else slice(None) for a in range(3))
            np.maximum(grown[later], labels[earlier], out=grown[later])
            np.maximum(grown[earlier], labels[later], out=grown[earlier])
        return grown
    x = _to_torch(labels, backend)[None, None]  # [1, 1, D, H, W]
    grown = torch.maximum(
        torch.maximum(
            F.max_pool3d(x, (3, 1, 1), stride=1, padding=(1, 0, 0)),
            F.max_pool3d(x, (1, 3, 1), stride=1, padding=(0, 1, 0)),
        ),
        F.max_pool3d(x, (1, 1, 3), stride=1, padding=(0, 0, 1)),
    )
    return grown[0, 0].to(torch.uint8).cpu().numpy()
