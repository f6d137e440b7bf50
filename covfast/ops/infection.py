"""``covfast::infection_ratio``: per-slice lung and infection voxel counts in one pass over the volume."""

from __future__ import annotations

import numpy as np
import torch

from covfast import _backend
from covfast.ops import reference

_backend.register("infection_ratio", "reference", ("cpu", "cuda"))(reference.infection_ratio)

PROBABILITY_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Element type codes of the C++ and CUDA kernels (covfast::InfectionType).
KERNEL_TYPES = {torch.uint8: 0, torch.float16: 1, torch.float32: 2, torch.float64: 3}


def _check(lung: torch.Tensor, infection: torch.Tensor) -> None:
    if lung.dim() != 3 or lung.shape != infection.shape:
        raise ValueError(
            f"infection_ratio expects lung and infection of the same [D,H,W] shape; got {tuple(lung.shape)} "
            f"and {tuple(infection.shape)}"
        )
    if lung.dtype != torch.uint8:
        raise ValueError(f"lung must be uint8 labels (0 background, 1 right, 2 left); got {lung.dtype}")
    if infection.dtype != torch.uint8 and infection.dtype not in PROBABILITY_DTYPES:
        raise ValueError(f"infection must be float probabilities or uint8 classes; got {infection.dtype}")
    if lung.device != infection.device:
        raise ValueError(f"lung and infection must be on one device; got {lung.device} and {infection.device}")


def float32_threshold(threshold: float) -> float:
    """The largest float32 ``f <= threshold``: for any float16/bfloat16/float32 ``p``, ``p > f`` iff ``p > threshold``.

    Kernels compare in float32 with this value, which gives exactly the float64 comparison of the reference.
    """
    f = np.float32(threshold)
    if float(f) > threshold:
        f = np.nextafter(f, np.float32(-np.inf))
    return float(f)


def _kernel_inputs(lung: torch.Tensor, infection: torch.Tensor, threshold: float):
    """Inputs as the compiled kernels take them: bfloat16 widened to float32 (exact), the threshold as float32
    for half/float input, and empty outputs."""
    if infection.dtype == torch.bfloat16:
        infection = infection.float()
    if infection.dtype in (torch.float16, torch.float32):
        threshold = float32_threshold(threshold)
    depth = lung.shape[0]
    outputs = (
        torch.empty((depth, 2), dtype=torch.int64, device=lung.device),
        torch.empty((depth, 2, 2), dtype=torch.int64, device=lung.device),
        torch.empty((depth, 2), dtype=torch.float64, device=lung.device),
    )
    return infection, threshold, outputs


@_backend.register("infection_ratio", "cpp", ("cpu",))
def _infection_ratio_cpp(lung: torch.Tensor, infection: torch.Tensor, threshold: float):
    from covfast import _C

    infection, threshold, outputs = _kernel_inputs(lung, infection, threshold)
    ok = _C.infection_ratio(
        lung.data_ptr(),
        lung.stride(),
        infection.data_ptr(),
        infection.stride(),
        KERNEL_TYPES[infection.dtype],
        *lung.shape,
        threshold,
        *(out.data_ptr() for out in outputs),
    )
    if not ok:
        raise ValueError(reference.BAD_CLASS_MESSAGE)
    return outputs


@_backend.register("infection_ratio", "cuda", ("cuda",))
def _infection_ratio_cuda(lung: torch.Tensor, infection: torch.Tensor, threshold: float):
    if infection.dtype == torch.float64:  # compared in double: the reference is exact
        return reference.infection_ratio(lung, infection, threshold)
    ext = _backend.cuda_extension()
    depth = lung.shape[0]
    lung_voxels = torch.zeros((depth, 2), dtype=torch.int64, device=lung.device)
    infected = torch.zeros((depth, 2, 2), dtype=torch.int64, device=lung.device)
    soft = torch.zeros((depth, 2), dtype=torch.float64, device=lung.device)
    bad_class = torch.zeros(1, dtype=torch.int32, device=lung.device)
    type_code = {torch.uint8: 0, torch.float16: 1, torch.float32: 2, torch.bfloat16: 4}[infection.dtype]
    with torch.cuda.device(lung.device):
        ext.infection_ratio(
            lung.data_ptr(),
            lung.stride(),
            infection.data_ptr(),
            infection.stride(),
            type_code,
            *lung.shape,
            float32_threshold(threshold),
            lung_voxels.data_ptr(),
            infected.data_ptr(),
            soft.data_ptr(),
            bad_class.data_ptr(),
            _backend.stream_handle(lung.device),
        )
    if infection.dtype == torch.uint8 and int(bad_class.item()):
        raise ValueError(reference.BAD_CLASS_MESSAGE)
    return lung_voxels, infected, soft


@_backend.register("infection_ratio", "triton", ("cuda", "cpu"))
def _infection_ratio_triton(lung: torch.Tensor, infection: torch.Tensor, threshold: float):
    from covfast.kernels.infection_ratio import infection_ratio_partials

    if infection.dtype == torch.float64:
        threshold_tensor = torch.tensor([threshold], dtype=torch.float64, device=lung.device)
    else:
        threshold_tensor = torch.tensor([float32_threshold(threshold)], dtype=torch.float32, device=lung.device)
    counts, soft = infection_ratio_partials(lung, infection, threshold_tensor)
    if infection.dtype == torch.uint8 and counts.numel() and int(counts[..., 6].max()) > 2:
        raise ValueError(reference.BAD_CLASS_MESSAGE)
    counts, soft = counts.sum(dim=1), soft.sum(dim=1)
    infected = counts[:, 2:6].reshape(-1, 2, 2).transpose(1, 2).contiguous()  # (class, lung) -> (lung, class)
    return counts[:, :2].contiguous(), infected, soft


def _infection_ratio_body(
    lung: torch.Tensor, infection: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(lung, infection)
    return _backend.dispatch("infection_ratio", lung.device.type)(lung, infection, threshold)


_infection_ratio_op = torch.library.custom_op("covfast::infection_ratio", mutates_args=())(_infection_ratio_body)


@_infection_ratio_op.register_fake
def _(lung, infection, threshold):
    _check(lung, infection)
    depth = lung.shape[0]
    return (
        lung.new_empty((depth, 2), dtype=torch.int64),
        lung.new_empty((depth, 2, 2), dtype=torch.int64),
        lung.new_empty((depth, 2), dtype=torch.float64),
    )


def infection_ratio(
    lung: torch.Tensor, infection: torch.Tensor, threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-slice voxel counts of lung and infection, read in one pass over memory.

    Only voxels inside the lung (label 1 or 2) count. Probability input: a voxel is infected when ``p > threshold``
    (strict, compared exactly as in float64) and counts as class 1. Class input (uint8): ``threshold`` is ignored,
    1 counts as class 1 (GGO / infected), 2 as class 2 (consolidation). NaN probabilities are never infected and
    make the soft sum NaN. Volume totals are sums over D: see :func:`infection_totals`.

    Args:
        lung: [D, H, W] uint8 labels: 0 background, 1 right lung, 2 left lung; other values are ignored.
        infection: [D, H, W] float16/bfloat16/float32/float64 probabilities, or uint8 classes 0/1/2.
        threshold: probability above which a voxel is infected.

    Returns:
        lung_voxels: [D, 2] int64, voxels per (right, left) lung.
        infected_voxels: [D, 2, 2] int64, infected voxels per lung (right, left) x class (1, 2).
        soft_sum: [D, 2] float64, sum of probabilities inside each lung (class input: count of nonzero).

    Raises:
        ValueError: wrong shapes or dtypes, or uint8 ``infection`` with a value other than 0, 1, 2.
    """
    return _backend.call(_infection_ratio_body, torch.ops.covfast.infection_ratio, lung, infection, float(threshold))


def infection_totals(
    lung_voxels: torch.Tensor, infected_voxels: torch.Tensor, soft_sum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole-volume totals of :func:`infection_ratio`'s per-slice outputs (sums over D).

    Returns:
        lung_voxels [2] int64, infected_voxels [2, 2] int64, soft_sum [2] float64.
    """
    return lung_voxels.sum(dim=0), infected_voxels.sum(dim=0), soft_sum.sum(dim=0)
