"""``covfast::reverse_attention``: the reverse-attention gate of Inf-Net, with autograd."""

from __future__ import annotations

import torch

from covfast import _backend
from covfast.ops import reference

_backend.register("reverse_attention", "reference", ("cpu", "cuda"))(reference.reverse_attention)
_backend.register("reverse_attention_backward", "reference", ("cpu", "cuda"))(reference.reverse_attention_backward)


_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cuda_sizes(x: torch.Tensor, side: torch.Tensor) -> tuple[int, ...]:
    """The trailing arguments of the CUDA bindings: dtype code, B, C, H, W, h, w, stream handle."""
    return (_backend.float_type(x.dtype), *x.shape, *side.shape[2:], _backend.stream_handle(x.device))


@_backend.register("reverse_attention", "cuda", ("cuda",))
def _reverse_attention_cuda(x: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    if x.dtype not in _CUDA_DTYPES:  # float64: the reference is exact and rarely used on the GPU
        return reference.reverse_attention(x, side)
    ext = _backend.cuda_extension()
    x, side = x.contiguous(), side.contiguous()
    out = torch.empty_like(x)
    with torch.cuda.device(x.device):
        ext.reverse_attention_fwd(
            x.data_ptr(),
            side.data_ptr(),
            out.data_ptr(),
            *_cuda_sizes(x, side),
        )
    return out


@_backend.register("reverse_attention_backward", "cuda", ("cuda",))
def _reverse_attention_backward_cuda(grad: torch.Tensor, x: torch.Tensor, side: torch.Tensor):
    if x.dtype not in _CUDA_DTYPES:
        return reference.reverse_attention_backward(grad, x, side)
    ext = _backend.cuda_extension()
    grad, x, side = grad.contiguous(), x.contiguous(), side.contiguous()
    grad_x = torch.empty_like(x)
    grad_side = torch.zeros(side.shape, dtype=torch.float32, device=side.device)  # atomics accumulate in float32
    with torch.cuda.device(x.device):
        ext.reverse_attention_bwd(
            grad.data_ptr(),
            x.data_ptr(),
            side.data_ptr(),
            grad_x.data_ptr(),
            grad_side.data_ptr(),
            *_cuda_sizes(x, side),
        )
    return grad_x, grad_side.to(side.dtype)


@_backend.register("reverse_attention", "triton", ("cuda", "cpu"))
def _reverse_attention_triton(x: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    from covfast.kernels.reverse_attention import reverse_attention_fwd

    if x.dtype not in _CUDA_DTYPES:
        return reference.reverse_attention(x, side)
    return reverse_attention_fwd(x, side)


@_backend.register("reverse_attention_backward", "triton", ("cuda", "cpu"))
def _reverse_attention_backward_triton(grad: torch.Tensor, x: torch.Tensor, side: torch.Tensor):
    from covfast.kernels.reverse_attention import reverse_attention_bwd

    if x.dtype not in _CUDA_DTYPES:
        return reference.reverse_attention_backward(grad, x, side)
    return reverse_attention_bwd(grad, x, side)


def _check(x: torch.Tensor, side: torch.Tensor) -> None:
    if x.dim() != 4 or side.dim() != 4:
        raise ValueError(f"reverse_attention expects x [B,C,H,W] and side [B,1,h,w]; got {x.shape} and {side.shape}")
    if side.shape[0] != x.shape[0] or side.shape[1] != 1:
        raise ValueError(f"side must be [B,1,h,w] with B={x.shape[0]}; got {tuple(side.shape)}")
    if x.numel() and side.numel() == 0:
        raise ValueError("side must not be empty when x is not")
    if x.dtype != side.dtype or x.device != side.device:
        raise ValueError(
            f"x and side must share dtype and device; got {x.dtype}/{x.device}, {side.dtype}/{side.device}"
        )


@torch.library.custom_op("covfast::reverse_attention", mutates_args=())
def reverse_attention(x: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """Reverse attention ``x * (1 - sigmoid(upsample(side, (H, W))))`` (Fan et al., Inf-Net, IEEE TMI 2020).

    The upsample is bilinear with align_corners=False and the gate broadcasts over channels.

    Args:
        x: [B, C, H, W] float32/float16/bfloat16/float64 features.
        side: [B, 1, h, w] side-output logits, same dtype and device as ``x``.

    Returns:
        [B, C, H, W], dtype of ``x``.
    """
    _check(x, side)
    return _backend.dispatch("reverse_attention", x.device.type)(x, side)


@reverse_attention.register_fake
def _(x, side):
    _check(x, side)
    return torch.empty_like(x)


@torch.library.custom_op("covfast::reverse_attention_backward", mutates_args=())
def reverse_attention_backward(
    grad: torch.Tensor, x: torch.Tensor, side: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (grad_x [B,C,H,W], grad_side [B,1,h,w]) of :func:`reverse_attention` for output gradient ``grad``."""
    grad = grad.contiguous()
    return _backend.dispatch("reverse_attention_backward", x.device.type)(grad, x, side)


@reverse_attention_backward.register_fake
def _(grad, x, side):
    return torch.empty_like(x), torch.empty_like(side)


def _setup_context(ctx, inputs, output):
    x, side = inputs
    ctx.save_for_backward(x, side)


def _backward(ctx, grad):
    x, side = ctx.saved_tensors
    grad_x, grad_side = torch.ops.covfast.reverse_attention_backward(grad, x, side)
    return grad_x, grad_side


reverse_attention.register_autograd(_backward, setup_context=_setup_context)
