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
