"""Pure-torch reference implementations of the covfast ops.

These are the CPU fallback, the export path and the oracle every other backend (C++, CUDA, Triton) is tested
against. They favour clarity over speed; each mirrors the semantics documented on the public op in
:mod:`covfast.ops`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BAD_CLASS_MESSAGE = "infection classes must be 0, 1 or 2; found a larger value"


def reverse_attention(x: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """Reverse attention of Inf-Net (Fan et al., IEEE TMI 2020, eq. 3): ``x * (1 - sigmoid(up(side)))``.

    Args:
        x: [B, C, H, W] float features.
        side: [B, 1, h, w] float side-output logits of the deeper decoder stage, same dtype as ``x``.

    Returns:
        [B, C, H, W], ``x`` weighted by the reverse of the upsampled (bilinear, align_corners=False) attention.
    """
    if x.numel() == 0:
        return torch.empty_like(x)
    up = F.interpolate(side, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return x * (1 - torch.sigmoid(up))


def reverse_attention_backward(
    grad: torch.Tensor, x: torch.Tensor, side: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`reverse_attention`.

    With ``s = sigmoid(up(side))``: ``grad_x = grad * (1 - s)`` and
    ``grad_side = up^T(-sum_c(grad * x) * s * (1 - s))``, where ``up^T`` is the adjoint of the bilinear upsample.

    Args:
        grad: [B, C, H, W] gradient of the output.
        x: [B, C, H, W] forward input.
        side: [B, 1, h, w] forward side input.

    Returns:
        (grad_x [B, C, H, W], grad_side [B, 1, h, w]), dtypes of ``x`` and ``side``.
    """
    if x.numel() == 0:
        return torch.zeros_like(x), torch.zeros_like(side)
    size = list(x.shape[-2:])
    s = torch.sigmoid(F.interpolate(side, size=size, mode="bilinear", align_corners=False))
    grad_x = grad * (1 - s)
    grad_up = -(grad * x).sum(dim=1, keepdim=True) * s * (1 - s)
    grad_side = torch.ops.aten.upsample_bilinear2d_backward(grad_up, size, list(side.shape), False)
    return grad_x, grad_side


def _upsample(image: torch.Tensor, size: list[int]) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of [B, C, h, w] to ``size``; also for C = 0, which F.interpolate rejects."""
    if image.shape[1] == 0:
        return image.new_empty((image.shape[0], 0, *size))
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)


def reverse_attention_concat(x: torch.Tensor, edge: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """Reverse attention of the concatenated features and resized edge features (Inf-Net, IEEE TMI 2020, eq. 3).

    ``cat([x, up(edge, (H, W))], 1) * (1 - sigmoid(up(side, (H, W))))``, up bilinear with align_corners=False.

    Args:
        x: [B, C1, H, W] float features.
        edge: [B, C2, he, we] float edge-attention features, same dtype as ``x``.
        side: [B, 1, h, w] float side-output logits, same dtype as ``x``.

    Returns:
        [B, C1 + C2, H, W], dtype of ``x``.
    """
    size = list(x.shape[-2:])
    if x.shape[0] * (x.shape[1] + edge.shape[1]) * size[0] * size[1] == 0:
        return x.new_empty((x.shape[0], x.shape[1] + edge.shape[1], *size))
    return reverse_attention(torch.cat([x, _upsample(edge, size)], dim=1), side)


def reverse_attention_concat_backward(
    grad: torch.Tensor, x: torch.Tensor, edge: torch.Tensor, side: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`reverse_attention_concat`: those of :func:`reverse_attention` for the concatenation,
    with the edge part taken back through the adjoint of its bilinear resize.

    Args:
        grad: [B, C1 + C2, H, W] gradient of the output.
        x, edge, side: the forward inputs.

    Returns:
        (grad_x [B, C1, H, W], grad_edge [B, C2, he, we], grad_side [B, 1, h, w]), dtypes of the inputs.
    """
    size = list(x.shape[-2:])
    if grad.numel() == 0:
        return x.new_zeros(x.shape), edge.new_zeros(edge.shape), side.new_zeros(side.shape)
    gated = torch.cat([x, _upsample(edge, size)], dim=1)
    grad_gated, grad_side = reverse_attention_backward(grad, gated, side)
    channels = x.shape[1]
    if edge.shape[1] == 0:
        grad_edge = edge.new_zeros(edge.shape)
    else:
        grad_edge = torch.ops.aten.upsample_bilinear2d_backward(grad_gated[:, channels:], size, list(edge.shape), False)
    return grad_gated[:, :channels].contiguous(), grad_edge, grad_side


def coach_k(keep: float, num_pixels: int) -> int:
    """Number of kept pixels ``k = ceil(keep * num_pixels)`` of the coach mask, clamped to [1, num_pixels].

    The product is rounded to 9 significant digits first so that e.g. ``keep=0.3`` of 100 pixels gives 30, not
    31 from the float product 30.000000000000004.
    """
    return min(num_pixels, max(1, math.ceil(float(f"{keep * num_pixels:.9g}"))))


def coach_threshold(score: torch.Tensor, keep: float) -> torch.Tensor:
    """Per-image threshold of the coach mask: the k-th largest score, ``k = coach_k(keep, H * W)``.

    Args:
        score: [B, 1, H, W] float scores, H * W > 0.
        keep: fraction of pixels kept, in (0, 1].

    Returns:
        [B] thresholds, dtype of ``score``; equal to ``torch.kthvalue`` (ties included).
    """
    flat = score.reshape(score.shape[0], -1)
    n = flat.shape[1]
    return flat.kthvalue(n - coach_k(keep, n) + 1, dim=1).values


def coach_mask(score: torch.Tensor, keep: float, alpha: float) -> torch.Tensor:
    """Soft top-k mask of the coach network (Zhou et al., "Coach", ECCV 2020): ``sigmoid(alpha * (score - t))``.

    Args:
        score: [B, 1, H, W] float scores.
        keep: fraction of pixels kept, in (0, 1].
        alpha: sharpness of the sigmoid.

    Returns:
        [B, 1, H, W] mask, dtype of ``score``.
    """
    if score.numel() == 0:
        return torch.empty_like(score)
    t = coach_threshold(score, keep).view(-1, 1, 1, 1)
    return torch.sigmoid(alpha * (score - t))


def coach_mask_backward(grad: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """Gradient of :func:`coach_mask` for ``score`` with the threshold held constant: ``grad * alpha * m * (1 - m)``.

    Args:
        grad: [B, 1, H, W] gradient of the mask.
        mask: [B, 1, H, W] forward output.
        alpha: sharpness used in the forward.

    Returns:
        [B, 1, H, W] gradient of ``score``.
    """
    return grad * alpha * mask * (1 - mask)


def infection_ratio(
    lung: torch.Tensor, infection: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-slice lung and infection voxel counts; see :func:`covfast.ops.infection_ratio` for the contract.

    Args:
        lung: [D, H, W] uint8 labels (0 background, 1 right lung, 2 left lung).
        infection: [D, H, W] float32/float16/bfloat16/float64 probabilities, or uint8 classes (0, 1, 2).
        threshold: a probability counts as infected (class 1) when it is strictly greater.

    Returns:
        lung_voxels [D, 2] int64, infected_voxels [D, 2, 2] int64, soft_sum [D, 2] float64.

    Raises:
        ValueError: uint8 ``infection`` holds a value other than 0, 1, 2.
    """
    if infection.dtype == torch.uint8:
        if infection.numel() and int(infection.max()) > 2:
            raise ValueError(BAD_CLASS_MESSAGE)
        classes = infection
        soft = (infection != 0).double()
    else:
        soft = infection.double()
        classes = (soft > threshold).to(torch.uint8)
    in_lung = torch.stack([lung == 1, lung == 2], dim=1)  # [D, 2, H, W]
    lung_voxels = in_lung.sum(dim=(2, 3))
    is_class = torch.stack([classes == 1, classes == 2], dim=1).unsqueeze(1)  # [D, 1, 2, H, W]
    infected_voxels = (in_lung.unsqueeze(2) & is_class).sum(dim=(3, 4))
    soft_sum = torch.where(in_lung, soft.unsqueeze(1), 0.0).sum(dim=(2, 3))
    return lung_voxels, infected_voxels, soft_sum


def affinity(features: torch.Tensor, weight: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """Affinity head of Ter-Sarkisov's one-shot model: ``z = (W^T X)^T v``, computed as ``X^T (W v)``.

    Args:
        features: X, [beta, C] or [N, beta, C] float (N images of beta RoI feature vectors).
        weight: W, [beta, C*] float affinity matrix.
        vector: v, [C*] float affinity vector.

    Returns:
        z, [C] or [N, C].
    """
    return (features.transpose(-1, -2) @ (weight @ vector).unsqueeze(-1)).squeeze(-1)


def affinity_backward(
    grad: torch.Tensor, features: torch.Tensor, weight: torch.Tensor, vector: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`affinity`: ``dX = (W v) g^T``, ``dW = (X g) v^T``, ``dv = W^T (X g)``, summed over N.

    Args:
        grad: [C] or [N, C] gradient of z.
        features, weight, vector: the forward inputs.

    Returns:
        (grad_features, grad_weight, grad_vector), shapes of the inputs.
    """
    weighted = weight @ vector  # [beta]
    grad_features = weighted.unsqueeze(-1) * grad.unsqueeze(-2)
    projected = (features @ grad.unsqueeze(-1)).squeeze(-1).reshape(-1, features.shape[-2]).sum(dim=0)  # [beta]
    return grad_features, torch.outer(projected, vector), weight.transpose(0, 1) @ projected


def _bilinear_samples(image: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """torchvision's RoIAlign bilinear sample of ``image`` [C, H, W] at points (y, x) [P]; 0 outside [-1, H] x [-1, W].

    Returns:
        [C, P].
    """
    height, width = image.shape[-2:]
    outside = (y < -1.0) | (y > height) | (x < -1.0) | (x > width)
    y = y.clamp(min=0)
    x = x.clamp(min=0)
    y_low = y.floor().long().clamp(max=height - 1)
    x_low = x.floor().long().clamp(max=width - 1)
    y = torch.where(y_low >= height - 1, y_low.to(y.dtype), y)
    x = torch.where(x_low >= width - 1, x_low.to(x.dtype), x)
    y_high = (y_low + 1).clamp(max=height - 1)
    x_high = (x_low + 1).clamp(max=width - 1)
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    flat = image.reshape(image.shape[0], height * width)
    value = (
        hy * hx * flat[:, y_low * width + x_low]
        + hy * lx * flat[:, y_low * width + x_high]
        + ly * hx * flat[:, y_high * width + x_low]
        + ly * lx * flat[:, y_high * width + x_high]
    )
    return torch.where(outside, value.new_zeros(()), value)


def roi_align(
    features: torch.Tensor,
    rois: torch.Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """RoIAlign (He et al., Mask R-CNN, ICCV 2017) with torchvision's semantics.

    Each bin averages a grid of bilinear samples; the grid is ``sampling_ratio`` per side, or
    ``ceil(roi_size / output_size)`` per RoI when ``sampling_ratio <= 0`` (adaptive). ``aligned=True`` shifts the
    box by -0.5 pixel (half-pixel centers); ``aligned=False`` clamps RoI sizes to at least 1.

    Args:
        features: [B, C, H, W] float.
        rois: [K, 5] float (batch index, x1, y1, x2, y2) in input-image coordinates.
        output_size: (PH, PW).
        spatial_scale: feature-map pixels per input pixel.
        sampling_ratio: samples per bin side; <= 0 for adaptive.
        aligned: half-pixel alignment.

    Returns:
        [K, C, PH, PW], dtype of ``features``.
    """
    pooled_h, pooled_w = output_size
    out = features.new_zeros((rois.shape[0], features.shape[1], pooled_h, pooled_w))
    offset = 0.5 if aligned else 0.0
    for k, roi in enumerate(rois.tolist()):
        x1, y1, x2, y2 = (coord * spatial_scale - offset for coord in roi[1:])
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / pooled_h, roi_w / pooled_w
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / pooled_h)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pooled_w)
        count = max(grid_h * grid_w, 1)
        grid_h, grid_w = max(grid_h, 0), max(grid_w, 0)  # an inverted aligned box has no samples: output 0
        ph = torch.arange(pooled_h, dtype=features.dtype, device=features.device).view(-1, 1, 1, 1)
        pw = torch.arange(pooled_w, dtype=features.dtype, device=features.device).view(1, -1, 1, 1)
        iy = torch.arange(grid_h, dtype=features.dtype, device=features.device).view(1, 1, -1, 1)
        ix = torch.arange(grid_w, dtype=features.dtype, device=features.device).view(1, 1, 1, -1)
        y = (y1 + ph * bin_h + (iy + 0.5) * bin_h / grid_h).expand(pooled_h, pooled_w, grid_h, grid_w)
        x = (x1 + pw * bin_w + (ix + 0.5) * bin_w / grid_w).expand(pooled_h, pooled_w, grid_h, grid_w)
        samples = _bilinear_samples(features[int(roi[0])], y.reshape(-1), x.reshape(-1))
        out[k] = samples.reshape(features.shape[1], pooled_h, pooled_w, grid_h * grid_w).sum(dim=-1) / count
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
    """Gradient of :func:`roi_align` for ``features`` ([B, C, H, W]): the adjoint of the (linear) forward."""
    zeros = grad.new_zeros(features_shape)
    _, vjp = torch.func.vjp(
        lambda feats: roi_align(feats, rois, output_size, spatial_scale, sampling_ratio, aligned), zeros
    )
    return vjp(grad)[0]
