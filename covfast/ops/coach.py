"""``covfast::coach_mask``: the soft top-k mask of the coach network, with autograd."""

from __future__ import annotations

import torch

from covfast import _backend
from covfast.ops import reference

_backend.register("coach_mask", "reference", ("cpu", "cuda"))(reference.coach_mask)


CPP_TYPES = {torch.float32: 0, torch.float64: 1}


@_backend.register("coach_mask", "cpp", ("cpu",))
def _coach_mask_cpp(score: torch.Tensor, keep: float, alpha: float) -> torch.Tensor:
    if score.dtype not in CPP_TYPES or score.numel() == 0:
        return reference.coach_mask(score, keep, alpha)
    # The C++ radix select replaces torch.kthvalue; the sigmoid is the reference's own vectorised elementwise pass.
    return torch.sigmoid(alpha * (score - cpp_threshold(score, keep).view(-1, 1, 1, 1)))


def cpp_threshold(score: torch.Tensor, keep: float) -> torch.Tensor:
    """[B] k-th largest score of each image of [B, 1, H, W] float32/float64 ``score`` on the CPU (C++ radix select;
    equals :func:`covfast.ops.reference.coach_threshold`, ties and NaN included)."""
    from covfast import _C

    score = score.contiguous()
    batch, pixels = score.shape[0], score.shape[2] * score.shape[3]
    thresholds = score.new_empty(batch)
    _C.coach_threshold(score.data_ptr(), thresholds.data_ptr(), CPP_TYPES[score.dtype], batch, pixels,
                       reference.coach_k(keep, pixels))
    return thresholds


@_backend.register("coach_mask", "cuda", ("cuda",))
def _coach_mask_cuda(score: torch.Tensor, keep: float, alpha: float) -> torch.Tensor:
    if score.dtype == torch.float64 or score.numel() == 0:
        return reference.coach_mask(score, keep, alpha)
    ext = _backend.cuda_extension()
    score = score.contiguous()
    batch, pixels = score.shape[0], score.shape[2] * score.shape[3]
    mask = torch.empty_like(score)
    thresholds = torch.empty(batch, dtype=torch.float32, device=score.device)
    histograms = torch.zeros((4, batch, 256), dtype=torch.int32, device=score.device)
    with torch.cuda.device(score.device):
        ext.coach_mask(
            score.data_ptr(),
            mask.data_ptr(),
            thresholds.data_ptr(),
            histograms.data_ptr(),
            _backend.float_type(score.dtype),
            batch,
            pixels,
            reference.coach_k(keep, pixels),
            float(alpha),
            _backend.stream_handle(score.device),
        )
    return mask


@_backend.register("coach_mask", "triton", ("cuda", "cpu"))
def _coach_mask_triton(score: torch.Tensor, keep: float, alpha: float) -> torch.Tensor:
    if score.dtype == torch.float64 or score.numel() == 0:  # float64 keys would need 64-bit radix passes
        return reference.coach_mask(score, keep, alpha)
    from covfast.kernels.coach_mask import coach_mask_fwd

    pixels = score.shape[2] * score.shape[3]
    return coach_mask_fwd(score, reference.coach_k(keep, pixels), alpha)


def _check(score: torch.Tensor, keep: float) -> None:
    if score.dim() != 4 or score.shape[1] != 1:
        raise ValueError(f"coach_mask expects score [B,1,H,W]; got {tuple(score.shape)}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1]; got {keep}")
    if not score.is_floating_point():
        raise ValueError(f"score must be a floating tensor; got {score.dtype}")


@torch.library.custom_op("covfast::coach_mask", mutates_args=())
def _coach_mask_op(score: torch.Tensor, keep: float, alpha: float) -> torch.Tensor:
    _check(score, keep)
    return _backend.dispatch("coach_mask", score.device.type)(score, keep, alpha)


@_coach_mask_op.register_fake
def _(score, keep, alpha):
    _check(score, keep)
    return torch.empty_like(score)


@torch.library.custom_op("covfast::coach_mask_backward", mutates_args=())
def _coach_mask_backward_op(grad: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    return reference.coach_mask_backward(grad, mask, alpha)


@_coach_mask_backward_op.register_fake
def _(grad, mask, alpha):
    return torch.empty_like(mask)


def _setup_context(ctx, inputs, output):
    ctx.alpha = inputs[2]
    ctx.save_for_backward(output)


def _backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    return torch.ops.covfast.coach_mask_backward(grad, mask, ctx.alpha), None, None


_coach_mask_op.register_autograd(_backward, setup_context=_setup_context)


def coach_mask(
    score: torch.Tensor, keep: float, alpha: float, image: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Soft top-k mask ``sigmoid(alpha * (score - t))`` of the coach network (Zhou et al., ECCV 2020).

    ``t`` is the k-th largest score of each image, ``k = ceil(keep * H * W)``; it equals ``torch.kthvalue`` on the
    same data, ties included. The backward treats ``t`` as a constant.

    Args:
        score: [B, 1, H, W] float scores.
        keep: fraction of pixels kept, in (0, 1].
        alpha: sharpness of the sigmoid.
        image: optional [B, C, H, W] image to mask.

    Returns:
        mask [B, 1, H, W] (dtype of ``score``), or ``(mask, image * mask)`` when ``image`` is given.
    """
    mask = torch.ops.covfast.coach_mask(score, keep, alpha)
    if image is None:
        return mask
    return mask, image * mask
