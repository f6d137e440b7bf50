"""Triton kernel of ``covfast::infection_ratio``: per-slice lung / infection voxel counts in one pass.

Each program reduces a tile of ``ROWS`` rows of one slice (any strides, int64 offsets) into 6 counts, 2 soft sums
and the largest class value; the partials of a slice's row tiles are then added on the host side of the op. The
semantics are those of :func:`covfast.ops.infection_ratio`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 4  # with BLOCK_W <= 256: 1024-voxel tiles keep the 9 accumulators in registers
# partial counts per program: lung right, lung left, class 1 right, class 1 left, class 2 right, class 2 left, max class
_NUM_COUNTS = 7


@triton.jit
def _infection_ratio_fwd_kernel(
    lung_ptr,
    infection_ptr,
    threshold_ptr,
    counts_ptr,
    soft_ptr,
    height,
    width,
    lung_stride_d,
    lung_stride_h,
    lung_stride_w,
    infection_stride_d,
    infection_stride_h,
    infection_stride_w,
    IS_CLASSES: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    d = tl.program_id(0).to(tl.int64)
    row_block = tl.program_id(1)
    num_row_blocks = tl.num_programs(1)
    rows = (row_block * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    row_ok = rows < height
    lung_row = lung_ptr + d * lung_stride_d + rows * lung_stride_h
    infection_row = infection_ptr + d * infection_stride_d + rows * infection_stride_h
    threshold = tl.load(threshold_ptr)

    n_r = tl.zeros([ROWS, BLOCK_W], tl.int32)
    n_l = tl.zeros([ROWS, BLOCK_W], tl.int32)
    c1_r = tl.zeros([ROWS, BLOCK_W], tl.int32)
    c1_l = tl.zeros([ROWS, BLOCK_W], tl.int32)
    c2_r = tl.zeros([ROWS, BLOCK_W], tl.int32)
    c2_l = tl.zeros([ROWS, BLOCK_W], tl.int32)
    max_class = tl.zeros([ROWS, BLOCK_W], tl.int32)
    soft_r = tl.zeros([ROWS, BLOCK_W], threshold.dtype)
    soft_l = tl.zeros([ROWS, BLOCK_W], threshold.dtype)
    for col_start in range(0, width, BLOCK_W):
        cols = (col_start + tl.arange(0, BLOCK_W)).to(tl.int64)
        ok = row_ok[:, None] & (cols < width)[None, :]
        label = tl.load(lung_row[:, None] + cols[None, :] * lung_stride_w, mask=ok, other=0)
        value = tl.load(infection_row[:, None] + cols[None, :] * infection_stride_w, mask=ok, other=0)
        is_r = label == 1
        is_l = label == 2
        if IS_CLASSES:
            value = value.to(tl.int32)
            class1 = value == 1
            class2 = value == 2
            c2_r += (is_r & class2).to(tl.int32)
            c2_l += (is_l & class2).to(tl.int32)
            max_class = tl.maximum(max_class, value)
            soft = (value != 0).to(threshold.dtype)
        else:
            prob = value.to(threshold.dtype)
            class1 = prob > threshold
            soft = prob
        n_r += is_r.to(tl.int32)
        n_l += is_l.to(tl.int32)
        c1_r += (is_r & class1).to(tl.int32)
        c1_l += (is_l & class1).to(tl.int32)
        soft_r += tl.where(is_r, soft, 0.0)
        soft_l += tl.where(is_l, soft, 0.0)

    out = counts_ptr + (d * num_row_blocks + row_block) * 7  # 7 partial counts per program, see _NUM_COUNTS
    tl.store(out + 0, tl.sum(tl.sum(n_r, axis=1), axis=0).to(tl.int64))
    tl.store(out + 1, tl.sum(tl.sum(n_l, axis=1), axis=0).to(tl.int64))
    tl.store(out + 2, tl.sum(tl.sum(c1_r, axis=1), axis=0).to(tl.int64))
    tl.store(out + 3, tl.sum(tl.sum(c1_l, axis=1), axis=0).to(tl.int64))
    tl.store(out + 4, tl.sum(tl.sum(c2_r, axis=1), axis=0).to(tl.int64))
    tl.store(out + 5, tl.sum(tl.sum(c2_l, axis=1), axis=0).to(tl.int64))
    tl.store(out + 6, tl.max(tl.max(max_class, axis=1), axis=0).to(tl.int64))
    soft_out = soft_ptr + (d * num_row_blocks + row_block) * 2
    tl.store(soft_out + 0, tl.sum(tl.sum(soft_r, axis=1), axis=0).to(tl.float64))
    tl.store(soft_out + 1, tl.sum(tl.sum(soft_l, axis=1), axis=0).to(tl.float64))


def infection_ratio_partials(
    lung: torch.Tensor, infection: torch.Tensor, threshold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the kernel over (slice, tile of ROWS rows).

    Args:
        lung: [D, H, W] uint8 labels, any strides.
        infection: [D, H, W] uint8 classes, or float16/bfloat16/float32/float64 probabilities, any strides.
        threshold: [1] float32 tensor (float64 for float64 input) on the same device; probabilities ``p`` count
            as class 1 when ``p > threshold``.

    Returns:
        counts [D, T, 7] int64 (lung right, lung left, class 1 right/left, class 2 right/left, max class value) and
        soft sums [D, T, 2] float64, per tile T of ROWS rows; the caller sums them over T.
    """
    depth, height, width = lung.shape
    row_blocks = triton.cdiv(height, ROWS)
    counts = torch.empty((depth, row_blocks, _NUM_COUNTS), dtype=torch.int64, device=lung.device)
    soft = torch.empty((depth, row_blocks, 2), dtype=torch.float64, device=lung.device)
    if counts.numel() == 0 or width == 0:
        return counts.zero_(), soft.zero_()
    block_w = min(triton.next_power_of_2(width), 256)
    _infection_ratio_fwd_kernel[(depth, row_blocks)](
        lung,
        infection,
        threshold,
        counts,
        soft,
        height,
        width,
        *lung.stride(),
        *infection.stride(),
        IS_CLASSES=infection.dtype == torch.uint8,
        ROWS=ROWS,
        BLOCK_W=block_w,
    )
    return counts, soft
