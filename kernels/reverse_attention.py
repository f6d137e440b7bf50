"""Triton kernels of ``covfast::reverse_attention`` (Fan et al., Inf-Net, IEEE TMI 2020, eq. 3).

``out = x * (1 - sigmoid(up(side)))`` with ``up`` bilinear, align_corners=False. Each program takes BLOCK pixels
of the [B, H, W] grid and a group of channels: it computes the gate of each pixel once from 4 side values and
applies it to every channel of the group. The backward uses the same layout and scatters
``-sum_c(grad * x) * s * (1 - s)`` into a float32 grad_side buffer with atomics (the adjoint of the upsample).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256


@triton.jit
def _bilinear_tap(out_index, scale, in_size):
    src = tl.maximum(scale * (out_index.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)
    i1 = i0 + (i0 < in_size - 1).to(tl.int32)
    frac = src - i0.to(tl.float32)
    return i0, i1, 1.0 - frac, frac


@triton.jit
def _program_block(
    num_pixels,
    channels,
    height,
    width,
    side_height,
    side_width,
    scale_h,
    scale_w,
    channels_per_group,
    BLOCK: tl.constexpr,
):
    """This program's pixels, their bilinear taps into side, its channel range and the offset of x[b, c0, y, x]."""
    pixel = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = pixel < num_pixels
    plane = height * width
    b = pixel // plane
    yx = pixel - b * plane
    y = yx // width
    x = yx - y * width
    y0, y1, wy0, wy1 = _bilinear_tap(y, scale_h, side_height)
    x0, x1, wx0, wx1 = _bilinear_tap(x, scale_w, side_width)
    side_base = b * side_height * side_width
    c_begin = tl.program_id(1) * channels_per_group
    c_end = tl.minimum(channels, c_begin + channels_per_group)
    offset = (b * channels + c_begin) * plane + yx
    return ok, side_base, y0, y1, wy0, wy1, x0, x1, wx0, wx1, c_begin, c_end, offset


@triton.jit
def _upsampled(side_ptr, ok, side_base, side_width, y0, y1, wy0, wy1, x0, x1, wx0, wx1):
    v00 = tl.load(side_ptr + side_base + y0 * side_width + x0, mask=ok, other=0.0).to(tl.float32)
    v01 = tl.load(side_ptr + side_base + y0 * side_width + x1, mask=ok, other=0.0).to(tl.float32)
    v10 = tl.load(side_ptr + side_base + y1 * side_width + x0, mask=ok, other=0.0).to(tl.float32)
    v11 = tl.load(side_ptr + side_base + y1 * side_width + x1, mask=ok, other=0.0).to(tl.float32)
    return wy0 * (wx0 * v00 + wx1 * v01) + wy1 * (wx0 * v10 + wx1 * v11)


@triton.jit
def _reverse_attention_fwd_kernel(
    x_ptr,
    side_ptr,
    out_ptr,
    num_pixels,
    channels,
    height,
    width,
    side_height,
    side_width,
    scale_h,
    scale_w,
    channels_per_group,
    BLOCK: tl.constexpr,
):
    ok, side_base, y0, y1, wy0, wy1, x0, x1, wx0, wx1, c_begin, c_end, offset = _program_block(
        num_pixels, channels, height, width, side_height, side_width, scale_h, scale_w, channels_per_group, BLOCK
    )
    up = _upsampled(side_ptr, ok, side_base, side_width, y0, y1, wy0, wy1, x0, x1, wx0, wx1)
    gate = 1.0 - tl.sigmoid(up)
    plane = height * width
    for _ in range(c_begin, c_end):
        value = tl.load(x_ptr + offset, mask=ok, other=0.0)
        tl.store(out_ptr + offset, (value.to(tl.float32) * gate).to(value.dtype), mask=ok)
        offset += plane


@triton.jit
def _reverse_attention_bwd_kernel(
    grad_ptr,
    x_ptr,
    side_ptr,
    grad_x_ptr,
    grad_side_ptr,
    num_pixels,
    channels,
    height,
    width,
    side_height,
    side_width,
    scale_h,
    scale_w,
    channels_per_group,
    BLOCK: tl.constexpr,
):
    ok, side_base, y0, y1, wy0, wy1, x0, x1, wx0, wx1, c_begin, c_end, offset = _program_block(
        num_pixels, channels, height, width, side_height, side_width, scale_h, scale_w, channels_per_group, BLOCK
    )
    s = tl.sigmoid(_upsampled(side_ptr, ok, side_base, side_width, y0, y1, wy0, wy1, x0, x1, wx0, wx1))
    plane = height * width
    dot = tl.zeros([BLOCK], tl.float32)
    for _ in range(c_begin, c_end):
        g = tl.load(grad_ptr + offset, mask=ok, other=0.0)
        value = tl.load(x_ptr + offset, mask=ok, other=0.0).to(tl.float32)
        dot += g.to(tl.float32) * value
        tl.store(grad_x_ptr + offset, (g.to(tl.float32) * (1.0 - s)).to(g.dtype), mask=ok)
        offset += plane
    grad_up = -dot * s * (1.0 - s)
    base = grad_side_ptr + side_base
    tl.atomic_add(base + y0 * side_width + x0, grad_up * wy0 * wx0, mask=ok)
    tl.atomic_add(base + y0 * side_width + x1, grad_up * wy0 * wx1, mask=ok)
    tl.atomic_add(base + y1 * side_width + x0, grad_up * wy1 * wx0, mask=ok)
    tl.atomic_add(base + y1 * side_width + x1, grad_up * wy1 * wx1, mask=ok)


def _launch_geometry(x: torch.Tensor) -> tuple[int, int, tuple[int, int]]:
    """Pixels, channels per program and grid: enough programs to fill a large GPU even for small planes."""
    batch, channels, height, width = x.shape
    num_pixels = batch * height * width
    pixel_blocks = triton.cdiv(num_pixels, BLOCK)
    groups = max(1, min(channels, triton.cdiv(132 * 8, pixel_blocks)))
    per_group = triton.cdiv(channels, groups)
    return num_pixels, per_group, (pixel_blocks, triton.cdiv(channels, per_group))


def _scales(x: torch.Tensor, side: torch.Tensor) -> tuple[float, float]:
    return side.shape[2] / x.shape[2], side.shape[3] / x.shape[3]


def reverse_attention_fwd(x: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """Forward. x: [B, C, H, W], side: [B, 1, h, w], both float32/float16/bfloat16. Returns [B, C, H, W]."""
    x, side = x.contiguous(), side.contiguous()
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    num_pixels, per_group, grid = _launch_geometry(x)
    _reverse_attention_fwd_kernel[grid](
        x, side, out, num_pixels, x.shape[1], x.shape[2], x.shape[3], side.shape[2], side.shape[3],
        *_scales(x, side), per_group, BLOCK=BLOCK,
    )  # fmt: skip
    return out


def reverse_attention_bwd(grad: torch.Tensor, x: torch.Tensor, side: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward. Returns grad_x [B, C, H, W] (dtype of x) and grad_side [B, 1, h, w] (dtype of side)."""
    grad, x, side = grad.contiguous(), x.contiguous(), side.contiguous()
    grad_x = torch.empty_like(x)
    grad_side = torch.zeros(side.shape, dtype=torch.float32, device=side.device)
    if x.numel() == 0:
        return grad_x, grad_side.to(side.dtype)
    num_pixels, per_group, grid = _launch_geometry(x)
    _reverse_attention_bwd_kernel[grid](
        grad, x, side, grad_x, grad_side, num_pixels, x.shape[1], x.shape[2], x.shape[3], side.shape[2],
        side.shape[3], *_scales(x, side), per_group, BLOCK=BLOCK,
    )  # fmt: skip
    return grad_x, grad_side.to(side.dtype)
