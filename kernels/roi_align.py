"""Triton kernels of ``covfast::roi_align`` (He et al., Mask R-CNN, ICCV 2017) with torchvision's semantics.

    out[k, c, ph, pw] = 1 / max(gh * gw, 1) * sum_{iy < gh, ix < gw} bilinear(features[b_k, c], y, x)
    y = y1 + ph * bin_h + (iy + 0.5) * bin_h / gh,   x = x1 + pw * bin_w + (ix + 0.5) * bin_w / gw

with (x1, y1, x2, y2) = box * spatial_scale (- 0.5 when aligned), bin = roi size / output size (roi sizes clamped
to >= 1 when not aligned), gh = sampling_ratio or ceil(roi_h / PH) when sampling_ratio <= 0; samples outside
[-1, H] x [-1, W] contribute 0 and the rest are clamped to the border as in torchvision.

Forward: one program per (RoI, channel, tile of BLOCK_P output bins); the sample grid is looped over, each step
gathering 4 neighbours per bin. Backward: the same walk, scattering ``grad / count * weight`` with atomic adds into
a zeroed gradient (float32 for float16 / bfloat16 features, cast by the caller). Coordinates and sums are float32
(float64 for float64 inputs): the caller passes ``rois`` in that compute dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _div_rn(a, b):
    """a / b rounded as IEEE division (Triton's float32 ``/`` is approximate on GPUs); float64 ``/`` already is."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _roi_geometry(rois_ptr, k, spatial_scale, pooled_h, pooled_w, sampling_ratio, ALIGNED: tl.constexpr):
    roi = rois_ptr + k * 5
    batch_index = tl.load(roi).to(tl.int64)
    offset = 0.5 if ALIGNED else 0.0
    x1 = tl.load(roi + 1) * spatial_scale - offset
    y1 = tl.load(roi + 2) * spatial_scale - offset
    roi_w = tl.load(roi + 3) * spatial_scale - offset - x1
    roi_h = tl.load(roi + 4) * spatial_scale - offset - y1
    if not ALIGNED:  # malformed boxes are forced to 1 x 1 (torchvision's legacy behaviour)
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    # IEEE division: an approximate roi_h / PH just above an integer would make ceil() take one more sample row
    bin_h = _div_rn(roi_h, (pooled_h + 0.0).to(roi_h.dtype))
    bin_w = _div_rn(roi_w, (pooled_w + 0.0).to(roi_w.dtype))
    grid_h = tl.where(sampling_ratio > 0, sampling_ratio, tl.ceil(bin_h).to(tl.int32))
    grid_w = tl.where(sampling_ratio > 0, sampling_ratio, tl.ceil(bin_w).to(tl.int32))
    count = tl.maximum(grid_h * grid_w, 1).to(x1.dtype)
    return batch_index, x1, y1, bin_h, bin_w, grid_h, grid_w, count


@triton.jit
def _axis_tap(v, size):
    """Neighbours (low, high) and weights (w_low, w_high) along one axis, and whether v is inside [-1, size]."""
    inside = (v >= -1.0) & (v <= size)
    v = tl.maximum(v, 0.0)
    low = v.to(tl.int64)  # v >= 0: truncation is floor
    at_end = low >= size - 1
    low = tl.where(at_end, size - 1, low)
    high = tl.where(at_end, size - 1, low + 1)
    v = tl.where(at_end, low.to(v.dtype), v)
    frac = v - low.to(v.dtype)
    return low, high, 1.0 - frac, frac, inside


@triton.jit
def _program_bins(
    rois_ptr, spatial_scale, pooled_h, pooled_w, sampling_ratio, ALIGNED: tl.constexpr, BLOCK_P: tl.constexpr
):
    """This program's RoI k, channel c, its BLOCK_P output bins (mask, ph, pw) and the RoI's geometry."""
    k = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    bins = (tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    batch_index, x1, y1, bin_h, bin_w, grid_h, grid_w, count = _roi_geometry(
        rois_ptr, k, spatial_scale, pooled_h, pooled_w, sampling_ratio, ALIGNED
    )
    # spelled out: Triton 3.6's compiler rejects a starred expression in a returned tuple
    return (k, c, bins < pooled_h * pooled_w, bins // pooled_w, bins % pooled_w, batch_index, x1, y1, bin_h, bin_w,
            grid_h, grid_w, count)


@triton.jit
def _roi_align_fwd_kernel(
    features_ptr,
    rois_ptr,
    out_ptr,
    channels,
    height,
    width,
    features_stride_b,
    features_stride_c,
    features_stride_h,
    features_stride_w,
    pooled_h,
    pooled_w,
    spatial_scale,
    sampling_ratio,
    ALIGNED: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    k, c, bin_ok, ph, pw, batch_index, x1, y1, bin_h, bin_w, grid_h, grid_w, count = _program_bins(
        rois_ptr, spatial_scale, pooled_h, pooled_w, sampling_ratio, ALIGNED, BLOCK_P
    )
    plane = features_ptr + batch_index * features_stride_b + c * features_stride_c
    acc = tl.zeros([BLOCK_P], x1.dtype)
    for iy in range(grid_h):
        y = y1 + ph.to(x1.dtype) * bin_h + (iy + 0.5) * bin_h / grid_h
        y_low, y_high, hy, ly, y_in = _axis_tap(y, height)
        for ix in range(grid_w):
            x = x1 + pw.to(x1.dtype) * bin_w + (ix + 0.5) * bin_w / grid_w
            x_low, x_high, hx, lx, x_in = _axis_tap(x, width)
            ok = bin_ok & y_in & x_in
            row_low = plane + y_low * features_stride_h
            row_high = plane + y_high * features_stride_h
            v1 = tl.load(row_low + x_low * features_stride_w, mask=ok, other=0.0).to(acc.dtype)
            v2 = tl.load(row_low + x_high * features_stride_w, mask=ok, other=0.0).to(acc.dtype)
            v3 = tl.load(row_high + x_low * features_stride_w, mask=ok, other=0.0).to(acc.dtype)
            v4 = tl.load(row_high + x_high * features_stride_w, mask=ok, other=0.0).to(acc.dtype)
            acc += tl.where(ok, hy * hx * v1 + hy * lx * v2 + ly * hx * v3 + ly * lx * v4, 0.0)
    out = out_ptr + ((k * channels + c) * pooled_h + ph) * pooled_w + pw
    tl.store(out, (acc / count).to(out_ptr.dtype.element_ty), mask=bin_ok)


@triton.jit
def _roi_align_bwd_kernel(
    grad_ptr,
    rois_ptr,
    grad_features_ptr,
    channels,
    height,
    width,
    grad_stride_k,
    grad_stride_c,
    grad_stride_h,
    grad_stride_w,
    pooled_h,
    pooled_w,
    spatial_scale,
    sampling_ratio,
    ALIGNED: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    k, c, bin_ok, ph, pw, batch_index, x1, y1, bin_h, bin_w, grid_h, grid_w, count = _program_bins(
        rois_ptr, spatial_scale, pooled_h, pooled_w, sampling_ratio, ALIGNED, BLOCK_P
    )
    grad = grad_ptr + k * grad_stride_k + c * grad_stride_c + ph * grad_stride_h + pw * grad_stride_w
    g = tl.load(grad, mask=bin_ok, other=0.0).to(x1.dtype) / count
    plane = grad_features_ptr + (batch_index * channels + c) * height * width  # contiguous gradient
    for iy in range(grid_h):
        y = y1 + ph.to(x1.dtype) * bin_h + (iy + 0.5) * bin_h / grid_h
        y_low, y_high, hy, ly, y_in = _axis_tap(y, height)
        for ix in range(grid_w):
            x = x1 + pw.to(x1.dtype) * bin_w + (ix + 0.5) * bin_w / grid_w
            x_low, x_high, hx, lx, x_in = _axis_tap(x, width)
            ok = bin_ok & y_in & x_in
            tl.atomic_add(plane + y_low * width + x_low, (g * hy * hx).to(grad_features_ptr.dtype.element_ty), mask=ok)
            tl.atomic_add(plane + y_low * width + x_high, (g * hy * lx).to(grad_features_ptr.dtype.element_ty), mask=ok)
            tl.atomic_add(plane + y_high * width + x_low, (g * ly * hx).to(grad_features_ptr.dtype.element_ty), mask=ok)
            tl.atomic_add(
                plane + y_high * width + x_high, (g * ly * lx).to(grad_features_ptr.dtype.element_ty), mask=ok
            )


def _block_p(bins: int) -> int:
    return min(triton.next_power_of_2(bins), 1024)


def _compute_rois(rois: torch.Tensor) -> torch.Tensor:
    """RoIs in the compute dtype: float64 stays, every other float becomes float32."""
    return rois.to(torch.float64 if rois.dtype == torch.float64 else torch.float32).contiguous()


def roi_align_forward(
    features: torch.Tensor,
    rois: torch.Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """RoIAlign forward.

    Args:
        features: [B, C, H, W] float16/bfloat16/float32/float64, any strides.
        rois: [K, 5] (batch index, x1, y1, x2, y2), any float dtype.
        output_size: (PH, PW).
        spatial_scale, sampling_ratio, aligned: as ``torchvision.ops.roi_align``.

    Returns:
        [K, C, PH, PW] contiguous, dtype of ``features``.
    """
    num_rois, channels = rois.shape[0], features.shape[1]
    out = features.new_empty((num_rois, channels, *output_size))
    if out.numel() == 0:
        return out
    bins = output_size[0] * output_size[1]
    block_p = _block_p(bins)
    _roi_align_fwd_kernel[(num_rois, channels, triton.cdiv(bins, block_p))](
        features,
        _compute_rois(rois),
        out,
        channels,
        features.shape[2],
        features.shape[3],
        *features.stride(),
        *output_size,
        spatial_scale,
        sampling_ratio,
        ALIGNED=aligned,
        BLOCK_P=block_p,
    )
    return out


def roi_align_backward(
    grad: torch.Tensor,
    rois: torch.Tensor,
    features_shape: list[int],
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """Gradient of :func:`roi_align_forward` for the features.

    Args:
        grad: [K, C, PH, PW], any strides.
        rois, output_size, spatial_scale, sampling_ratio, aligned: the forward's.
        features_shape: [B, C, H, W].

    Returns:
        [B, C, H, W] contiguous, dtype of ``grad`` (accumulated in float32 for float16 / bfloat16).
    """
    accumulate = torch.float64 if grad.dtype == torch.float64 else torch.float32
    grad_features = torch.zeros(features_shape, dtype=accumulate, device=grad.device)
    num_rois, channels = grad.shape[:2]
    if grad.numel() == 0 or grad_features.numel() == 0:
        return grad_features.to(grad.dtype)
    bins = output_size[0] * output_size[1]
    block_p = _block_p(bins)
    _roi_align_bwd_kernel[(num_rois, channels, triton.cdiv(bins, block_p))](
        grad,
        _compute_rois(rois),
        grad_features,
        channels,
        features_shape[2],
        features_shape[3],
        *grad.stride(),
        *output_size,
        spatial_scale,
        sampling_ratio,
        ALIGNED=aligned,
        BLOCK_P=block_p,
    )
    return grad_features.to(grad.dtype)
