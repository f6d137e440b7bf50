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


_backend.register("reverse_attention_concat", "reference", ("cpu", "cuda"))(reference.reverse_attention_concat)
_backend.register("reverse_attention_concat_backward", "reference", ("cpu", "cuda"))(
    reference.reverse_attention_concat_backward
)


_CPP_DTYPES = {torch.float32: 0, torch.float64: 1}  # dtype codes of covfast._C.reverse_attention_concat_*


def _cpp_sizes(x: torch.Tensor, edge: torch.Tensor | None, side: torch.Tensor) -> list[int]:
    """(B, C1, C2, H, W, he, we, h, w) for the C++ and CUDA bindings; no edge is the plain reverse attention (C2 = 0)."""
    edge_sizes = [0, 0, 0] if edge is None else [edge.shape[1], *edge.shape[2:]]
    return [*x.shape[:2], edge_sizes[0], *x.shape[2:], *edge_sizes[1:], *side.shape[2:]]


def _concat_backward_cpp(
    grad: torch.Tensor, x: torch.Tensor, edge: torch.Tensor | None, side: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The C++ backward of reverse attention, fused with the concatenation of the resized ``edge`` when given:
    (grad_x, grad_edge or None, grad_side), contiguous."""
    from covfast import _C

    grad, x, side = grad.contiguous(), x.contiguous(), side.contiguous()
    edge = None if edge is None else edge.contiguous()
    grad_x, grad_side = x.new_empty(x.shape), side.new_empty(side.shape)
    grad_edge = None if edge is None else edge.new_empty(edge.shape)
    _C.reverse_attention_concat_bwd(
        grad.data_ptr(), x.data_ptr(), 0 if edge is None else edge.data_ptr(), side.data_ptr(), grad_x.data_ptr(),
        0 if grad_edge is None else grad_edge.data_ptr(), grad_side.data_ptr(), _CPP_DTYPES[x.dtype],
        _cpp_sizes(x, edge, side),
    )  # fmt: skip
    return grad_x, grad_edge, grad_side


# The plain forward has no C++ backend: a broadcast multiply in torch is as fast (benchmarks/results/
# reverse_attention_cpu.md). The backward, one pass instead of torch's five, is about twice as fast.
@_backend.register("reverse_attention_backward", "cpp", ("cpu",))
def _reverse_attention_backward_cpp(grad: torch.Tensor, x: torch.Tensor, side: torch.Tensor):
    if x.dtype not in _CPP_DTYPES:  # float16 / bfloat16: the reference, which computes them in float32 internally
        return reference.reverse_attention_backward(grad, x, side)
    grad_x, _, grad_side = _concat_backward_cpp(grad, x, None, side)
    return grad_x, grad_side


@_backend.register("reverse_attention_concat", "cpp", ("cpu",))
def _reverse_attention_concat_cpp(x: torch.Tensor, edge: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    if x.dtype not in _CPP_DTYPES:
        return reference.reverse_attention_concat(x, edge, side)
    from covfast import _C

    x, edge, side = x.contiguous(), edge.contiguous(), side.contiguous()
    out = x.new_empty((x.shape[0], x.shape[1] + edge.shape[1], *x.shape[2:]))
    _C.reverse_attention_concat_fwd(
        x.data_ptr(), edge.data_ptr(), side.data_ptr(), out.data_ptr(), _CPP_DTYPES[x.dtype], _cpp_sizes(x, edge, side)
    )
    return out


@_backend.register("reverse_attention_concat_backward", "cpp", ("cpu",))
def _reverse_attention_concat_backward_cpp(grad: torch.Tensor, x: torch.Tensor, edge: torch.Tensor, side: torch.Tensor):
    if x.dtype not in _CPP_DTYPES:
        return reference.reverse_attention_concat_backward(grad, x, edge, side)
    return _concat_backward_cpp(grad, x, edge, side)


@_backend.register("reverse_attention_concat", "cuda", ("cuda",))
def _reverse_attention_concat_cuda(x: torch.Tensor, edge: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    if x.dtype not in _CUDA_DTYPES:
        return reference.reverse_attention_concat(x, edge, side)
    ext = _backend.cuda_extension()
    x, edge, side = x.contiguous(), edge.contiguous(), side.contiguous()
    out = x.new_empty((x.shape[0], x.shape[1] + edge.shape[1], *x.shape[2:]))
    with torch.cuda.device(x.device):
        ext.reverse_attention_concat_fwd(
            x.data_ptr(), edge.data_ptr(), side.data_ptr(), out.data_ptr(), _backend.float_type(x.dtype),
            _cpp_sizes(x, edge, side), _backend.stream_handle(x.device),
        )  # fmt: skip
    return out


@_backend.register("reverse_attention_concat_backward", "cuda", ("cuda",))
def _reverse_attention_concat_backward_cuda(
    grad: torch.Tensor, x: torch.Tensor, edge: torch.Tensor, side: torch.Tensor
):
    if x.dtype not in _CUDA_DTYPES:
        return reference.reverse_attention_concat_backward(grad, x, edge, side)
    ext = _backend.cuda_extension()
    grad, x, edge, side = grad.contiguous(), x.contiguous(), edge.contiguous(), side.contiguous()
    grad_x = torch.empty_like(x)
    # atomics accumulate in float32
    grad_edge = torch.zeros(edge.shape, dtype=torch.float32, device=edge.device)
    grad_side = torch.zeros(side.shape, dtype=torch.float32, device=side.device)
    with torch.cuda.device(x.device):
        ext.reverse_attention_concat_bwd(
            grad.data_ptr(), x.data_ptr(), edge.data_ptr(), side.data_ptr(), grad_x.data_ptr(), grad_edge.data_ptr(),
            grad_side.data_ptr(), _backend.float_type(x.dtype), _cpp_sizes(x, edge, side),
            _backend.stream_handle(x.device),
        )  # fmt: skip
    return grad_x, grad_edge.to(edge.dtype), grad_side.to(side.dtype)


def _check_concat(x: torch.Tensor, edge: torch.Tensor, side: torch.Tensor) -> None:
    _check(x, side)
    if edge.dim() != 4 or edge.shape[0] != x.shape[0]:
        raise ValueError(f"edge must be [B,C2,he,we] with B={x.shape[0]}; got {tuple(edge.shape)}")
    if x.shape[0] * edge.shape[1] * x.shape[2] * x.shape[3] and edge.shape[2] * edge.shape[3] == 0:
        raise ValueError("edge must not be empty in space when the output is not")
    if edge.dtype != x.dtype or edge.device != x.device:
        raise ValueError(
            f"x and edge must share dtype and device; got {x.dtype}/{x.device}, {edge.dtype}/{edge.device}"
        )


def _reverse_attention_concat_body(x: torch.Tensor, edge: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    _check_concat(x, edge, side)
    return _backend.dispatch("reverse_attention_concat", x.device.type)(x, edge, side)


_reverse_attention_concat_op = torch.library.custom_op("covfast::reverse_attention_concat", mutates_args=())(
    _reverse_attention_concat_body
)


def reverse_attention_concat(x: torch.Tensor, edge: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """Reverse attention fused with the concatenation of resized edge features (Fan et al., Inf-Net, IEEE TMI 2020).

    ``cat([x, up(edge, (H, W))], 1) * (1 - sigmoid(up(side, (H, W))))``, up bilinear with align_corners=False: the
    model's ``R_i = Concat(f_i, Down(e_att)) * A_i`` without materializing the resized edge or the concatenation.

    Args:
        x: [B, C1, H, W] float32/float16/bfloat16/float64 features.
        edge: [B, C2, he, we] edge-attention features, same dtype and device as ``x``.
        side: [B, 1, h, w] side-output logits, same dtype and device as ``x``.

    Returns:
        [B, C1 + C2, H, W], dtype of ``x``.
    """
    return _backend.call(_reverse_attention_concat_body, torch.ops.covfast.reverse_attention_concat, x, edge, side)


@_reverse_attention_concat_op.register_fake
def _(x, edge, side):
    _check_concat(x, edge, side)
    return x.new_empty((x.shape[0], x.shape[1] + edge.shape[1], x.shape[2], x.shape[3]))


@torch.library.custom_op("covfast::reverse_attention_concat_backward", mutates_args=())
def reverse_attention_concat_backward(
    grad: torch.Tensor, x: torch.Tensor, edge: torch.Tensor, side: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (grad_x [B,C1,H,W], grad_edge [B,C2,he,we], grad_side [B,1,h,w]) of
    :func:`reverse_attention_concat` for the output gradient ``grad`` [B, C1 + C2, H, W]."""
    grad = grad.contiguous()
    return _backend.dispatch("reverse_attention_concat_backward", x.device.type)(grad, x, edge, side)


@reverse_attention_concat_backward.register_fake
def _(grad, x, edge, side):
    return x.new_empty(x.shape), edge.new_empty(edge.shape), side.new_empty(side.shape)


def _setup_context_concat(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_concat(ctx, grad):
    return torch.ops.covfast.reverse_attention_concat_backward(grad, *ctx.saved_tensors)


_reverse_attention_concat_op.register_autograd(_backward_concat, setup_context=_setup_context_concat)
