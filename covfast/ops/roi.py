"""``covfast::roi_align``: RoIAlign with torchvision's semantics, with autograd for the features."""

from __future__ import annotations

import torch

from covfast.ops import reference


def _check(features: torch.Tensor, rois: torch.Tensor, output_size: list[int]) -> None:
    if features.dim() != 4 or rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"roi_align expects features [B,C,H,W] and rois [K,5]; got {features.shape}, {rois.shape}")
    if len(output_size) != 2 or min(output_size) < 1:
        raise ValueError(f"output_size must be two positive ints; got {output_size}")
    if rois.dtype != features.dtype or rois.device != features.device:
        raise ValueError("rois must share the dtype and device of features")


@torch.library.custom_op("covfast::roi_align", mutates_args=())
def _roi_align_op(
    features: torch.Tensor,
    rois: torch.Tensor,
    output_size: list[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    _check(features, rois, output_size)
    return reference.roi_align(features, rois, tuple(output_size), spatial_scale, sampling_ratio, aligned)


@_roi_align_op.register_fake
def _(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
    _check(features, rois, output_size)
    return features.new_empty((rois.shape[0], features.shape[1], *output_size))


@torch.library.custom_op("covfast::roi_align_backward", mutates_args=())
def _roi_align_backward_op(
    grad: torch.Tensor,
    rois: torch.Tensor,
    features_shape: list[int],
    output_size: list[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    return reference.roi_align_backward(
        grad, rois, features_shape, tuple(output_size), spatial_scale, sampling_ratio, aligned
    )


@_roi_align_backward_op.register_fake
def _(grad, rois, features_shape, output_size, spatial_scale, sampling_ratio, aligned):
    return grad.new_empty(features_shape)


def _setup_context(ctx, inputs, output):
    features, rois, output_size, spatial_scale, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.args = (list(features.shape), list(output_size), spatial_scale, sampling_ratio, aligned)


def _backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    grad_features = torch.ops.covfast.roi_align_backward(grad.contiguous(), rois, *ctx.args)
    return grad_features, None, None, None, None, None


_roi_align_op.register_autograd(_backward, setup_context=_setup_context)


def roi_align(
    features: torch.Tensor,
    rois: torch.Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """RoIAlign (He et al., Mask R-CNN, ICCV 2017) with the semantics of ``torchvision.ops.roi_align``.

    Args:
        features: [B, C, H, W] float.
        rois: [K, 5] (batch index, x1, y1, x2, y2) in input-image coordinates, dtype of ``features``.
        output_size: PH or (PH, PW).
        spatial_scale: feature-map pixels per input pixel.
        sampling_ratio: bilinear samples per bin side; <= 0 samples ``ceil(roi_size / output_size)`` per RoI.
        aligned: shift boxes by -0.5 pixel (half-pixel centers) as in torchvision's ``aligned=True``.

    Returns:
        [K, C, PH, PW] pooled features.
    """
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    return torch.ops.covfast.roi_align(
        features, rois, list(output_size), float(spatial_scale), int(sampling_ratio), bool(aligned)
    )
