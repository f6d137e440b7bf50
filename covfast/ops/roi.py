"""``covfast::roi_align``: RoIAlign with torchvision's semantics, with autograd for the features.

Backends (:mod:`covfast._backend`): the pure-torch reference; C++/OpenMP (``covfast._C``, CPU, float32/float64;
float16/bfloat16 run the reference); CUDA (``covfast._cuda``, float32/float16/bfloat16/float64, backward with
atomics); Triton (``covfast.kernels.roi_align``, forward and atomic backward).

Fused RoIAlign-to-affinity inference: in the affinity head (:mod:`covfast.nn.affinity`) the pooled RoI features go
through refinement and vectorisation convolutions before they become X, so RoIAlign cannot be folded into
``z = X^T (W v)``; that product is already reassociated in :func:`covfast.ops.affinity` (``u = W v`` first, never
forming ``W^T X``). What is fused is the pooling of a batch of slices: :func:`roi_align_slots` pools each distinct
RoI once and writes it into every slot of the [N * beta, C, PH, PW] tensor the head reads (slices pad to beta RoIs
by repetition), in one kernel call, instead of pooling into an intermediate tensor and gathering the copies. Only
the C++ backend fuses; the others pool and gather.
"""

from __future__ import annotations

import torch

from covfast import _backend
from covfast.ops import reference

_backend.register("roi_align", "reference", ("cpu", "cuda"))(reference.roi_align)
_backend.register("roi_align_backward", "reference", ("cpu", "cuda"))(reference.roi_align_backward)

CPP_TYPES = {torch.float32: 0, torch.float64: 1}  # covfast::RoiAlignType; other dtypes run the reference on CPU


def _check(features: torch.Tensor, rois: torch.Tensor, output_size: list[int]) -> None:
    if features.dim() != 4 or rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"roi_align expects features [B,C,H,W] and rois [K,5]; got {features.shape}, {rois.shape}")
    if len(output_size) != 2 or min(output_size) < 1:
        raise ValueError(f"output_size must be two positive ints; got {output_size}")
    if rois.dtype != features.dtype or rois.device != features.device:
        raise ValueError("rois must share the dtype and device of features")


def _check_batch_indices(features: torch.Tensor, rois: torch.Tensor) -> None:
    """Batch indices must name an image; checked on the CPU only, where it costs no device synchronisation."""
    if rois.device.type == "cpu" and rois.shape[0]:
        index = rois[:, 0]
        if bool(((index < 0) | (index >= features.shape[0]) | index.isnan()).any()):
            raise ValueError(f"roi_align: a RoI has a batch index outside [0, {features.shape[0]})")


def _forward_args(features, rois, output_size, spatial_scale, sampling_ratio, aligned, type_codes, out) -> tuple:
    """The leading arguments of ``_C.roi_align_forward`` and ``_cuda.roi_align_forward`` (same layout)."""
    return (
        features.data_ptr(),
        list(features.shape),
        list(features.stride()),
        rois.data_ptr(),
        rois.shape[0],
        *output_size,
        spatial_scale,
        sampling_ratio,
        aligned,
        type_codes[features.dtype],
        out.data_ptr(),
    )


def _backward_args(grad, rois, features_shape, output_size, spatial_scale, sampling_ratio, aligned, type_codes):
    """The leading arguments of ``_C.roi_align_backward`` and ``_cuda.roi_align_backward`` (same layout)."""
    return (
        grad.data_ptr(),
        list(grad.stride()),
        rois.data_ptr(),
        rois.shape[0],
        list(features_shape),
        *output_size,
        spatial_scale,
        sampling_ratio,
        aligned,
        type_codes[grad.dtype],
    )


@_backend.register("roi_align", "cpp", ("cpu",))
def _roi_align_cpp(
    features: torch.Tensor,
    rois: torch.Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    if features.dtype not in CPP_TYPES:
        return reference.roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return _roi_align_cpp_rows(features, rois, output_size, spatial_scale, sampling_ratio, aligned, None)


def _roi_align_cpp_rows(features, rois, output_size, spatial_scale, sampling_ratio, aligned, slot_roi):
    """The C++ forward; with ``slot_roi`` [S] each RoI is pooled once and written to every row that names it."""
    from covfast import _C

    rois = rois.contiguous()
    rows = rois.shape[0] if slot_roi is None else slot_roi.shape[0]
    out = features.new_empty((rows, features.shape[1], *output_size))
    slot_args = ()
    if slot_roi is not None:
        offsets, slot_rows = _slot_table(slot_roi, rois.shape[0])
        slot_args = (offsets.data_ptr(), slot_rows.data_ptr(), rows)
    _C.roi_align_forward(
        *_forward_args(features, rois, output_size, spatial_scale, sampling_ratio, aligned, CPP_TYPES, out),
        *slot_args,
    )
    return out


def _slot_table(slot_roi: torch.Tensor, num_rois: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``slot_roi`` [S] (RoI of each output row) as compressed rows: offsets [K + 1] and the rows of each RoI."""
    rows = torch.argsort(slot_roi, stable=True)
    offsets = torch.zeros(num_rois + 1, dtype=torch.int64, device=slot_roi.device)
    torch.cumsum(torch.bincount(slot_roi, minlength=num_rois), dim=0, out=offsets[1:])
    return offsets, rows


@_backend.register("roi_align_backward", "cpp", ("cpu",))
def _roi_align_backward_cpp(
    grad: torch.Tensor,
    rois: torch.Tensor,
    features_shape: list[int],
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    if grad.dtype not in CPP_TYPES:
        return reference.roi_align_backward(
            grad, rois, features_shape, output_size, spatial_scale, sampling_ratio, aligned
        )
    from covfast import _C

    rois = rois.contiguous()
    grad_features = grad.new_zeros(features_shape)
    _C.roi_align_backward(
        *_backward_args(grad, rois, features_shape, output_size, spatial_scale, sampling_ratio, aligned, CPP_TYPES),
        grad_features.data_ptr(),
    )
    return grad_features


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
    _check_batch_indices(features, rois)
    impl = _backend.dispatch("roi_align", features.device.type)
    return impl(features, rois, tuple(output_size), spatial_scale, sampling_ratio, aligned)


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
    impl = _backend.dispatch("roi_align_backward", grad.device.type)
    return impl(grad, rois, features_shape, tuple(output_size), spatial_scale, sampling_ratio, aligned)


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


CUDA_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}  # covfast::RoiAlignCudaType


def _cuda_rois(rois: torch.Tensor) -> torch.Tensor:
    """RoIs as the CUDA kernels read them: contiguous float32, or float64 for float64 features."""
    return rois.to(torch.float64 if rois.dtype == torch.float64 else torch.float32).contiguous()


@_backend.register("roi_align", "cuda", ("cuda",))
def _roi_align_cuda(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
    ext = _backend.cuda_extension()
    out = features.new_empty((rois.shape[0], features.shape[1], *output_size))
    rois = _cuda_rois(rois)
    with torch.cuda.device(features.device):
        ext.roi_align_forward(
            *_forward_args(features, rois, output_size, spatial_scale, sampling_ratio, aligned, CUDA_TYPES, out),
            _backend.stream_handle(features.device),
        )
    return out


@_backend.register("roi_align_backward", "cuda", ("cuda",))
def _roi_align_backward_cuda(grad, rois, features_shape, output_size, spatial_scale, sampling_ratio, aligned):
    ext = _backend.cuda_extension()
    accumulate = torch.float64 if grad.dtype == torch.float64 else torch.float32  # atomics add in this type
    grad_features = torch.zeros(features_shape, dtype=accumulate, device=grad.device)
    rois = _cuda_rois(rois)
    with torch.cuda.device(grad.device):
        ext.roi_align_backward(
            *_backward_args(
                grad, rois, features_shape, output_size, spatial_scale, sampling_ratio, aligned, CUDA_TYPES
            ),
            grad_features.data_ptr(),
            _backend.stream_handle(grad.device),
        )
    return grad_features.to(grad.dtype)


@_backend.register("roi_align", "triton", ("cuda", "cpu"))
def _roi_align_triton(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
    from covfast.kernels.roi_align import roi_align_forward

    return roi_align_forward(features, rois, output_size, spatial_scale, sampling_ratio, aligned)


@_backend.register("roi_align_backward", "triton", ("cuda", "cpu"))
def _roi_align_backward_triton(grad, rois, features_shape, output_size, spatial_scale, sampling_ratio, aligned):
    from covfast.kernels.roi_align import roi_align_backward

    return roi_align_backward(grad, rois, features_shape, output_size, spatial_scale, sampling_ratio, aligned)


def _check_slots(rois: torch.Tensor, slot_roi: torch.Tensor) -> None:
    if slot_roi.dim() != 1 or slot_roi.dtype != torch.int64 or slot_roi.device != rois.device:
        raise ValueError(
            f"slot_roi must be int64 [S] on the device of rois; got {slot_roi.dtype} {tuple(slot_roi.shape)}"
        )


def _check_slot_values(rois: torch.Tensor, slot_roi: torch.Tensor) -> None:
    on_cpu = slot_roi.device.type == "cpu" and slot_roi.numel()  # no device synchronisation on a GPU
    if on_cpu and (int(slot_roi.min()) < 0 or int(slot_roi.max()) >= rois.shape[0]):
        raise ValueError(f"slot_roi names a RoI outside [0, {rois.shape[0]})")


@_backend.register("roi_align_slots", "reference", ("cpu", "cuda"))
def _roi_align_slots_reference(features, rois, slot_roi, output_size, spatial_scale, sampling_ratio, aligned):
    """The unfused path: pool each RoI, then gather one copy per output row."""
    impl = _backend.dispatch("roi_align", features.device.type)
    return impl(features, rois, output_size, spatial_scale, sampling_ratio, aligned)[slot_roi]


@_backend.register("roi_align_slots", "cpp", ("cpu",))
def _roi_align_slots_cpp(features, rois, slot_roi, output_size, spatial_scale, sampling_ratio, aligned):
    if features.dtype not in CPP_TYPES:
        return _roi_align_slots_reference(features, rois, slot_roi, output_size, spatial_scale, sampling_ratio, aligned)
    return _roi_align_cpp_rows(features, rois, output_size, spatial_scale, sampling_ratio, aligned, slot_roi)


def _roi_align_slots_body(
    features: torch.Tensor,
    rois: torch.Tensor,
    slot_roi: torch.Tensor,
    output_size: list[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    _check(features, rois, output_size)
    _check_slots(rois, slot_roi)
    _check_batch_indices(features, rois)
    _check_slot_values(rois, slot_roi)
    impl = _backend.dispatch("roi_align_slots", features.device.type)
    return impl(features, rois, slot_roi, tuple(output_size), spatial_scale, sampling_ratio, aligned)


_roi_align_slots_op = torch.library.custom_op("covfast::roi_align_slots", mutates_args=())(_roi_align_slots_body)


@_roi_align_slots_op.register_fake
def _(features, rois, slot_roi, output_size, spatial_scale, sampling_ratio, aligned):
    _check(features, rois, output_size)
    _check_slots(rois, slot_roi)
    return features.new_empty((slot_roi.shape[0], features.shape[1], *output_size))


def _setup_slots_context(ctx, inputs, output):
    features, rois, slot_roi, output_size, spatial_scale, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois, slot_roi)
    ctx.args = (list(features.shape), list(output_size), spatial_scale, sampling_ratio, aligned)


def _slots_backward(ctx, grad):
    rois, slot_roi = ctx.saved_tensors
    # The copies of a RoI are separate outputs: the gradient is that of roi_align over the expanded RoI list.
    grad_features = torch.ops.covfast.roi_align_backward(grad.contiguous(), rois[slot_roi].contiguous(), *ctx.args)
    return grad_features, None, None, None, None, None, None


_roi_align_slots_op.register_autograd(_slots_backward, setup_context=_setup_slots_context)


def roi_align_slots(
    features: torch.Tensor,
    rois: torch.Tensor,
    slot_roi: torch.Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """``roi_align(features, rois[slot_roi], ...)`` with each distinct RoI pooled once and written to all its rows.

    For batches of slices whose RoI lists repeat boxes (the affinity head pads each slice to beta RoIs by
    repetition): the output is the [S, C, PH, PW] tensor the head reads (reshape to [N, beta, C, PH, PW] is free),
    filled by one kernel call, with no intermediate [K, C, PH, PW] tensor and no gather copy. The C++ backend does
    this; the others pool and gather (the unfused path).

    Args:
        features: [B, C, H, W] float.
        rois: [K, 5] distinct RoIs (batch index, x1, y1, x2, y2), dtype of ``features``.
        slot_roi: [S] int64, the RoI of each output row, in [0, K).
        output_size, spatial_scale, sampling_ratio, aligned: as for :func:`roi_align`.

    Returns:
        [S, C, PH, PW] pooled features.
    """
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    args = (features, rois, slot_roi, list(output_size), float(spatial_scale), int(sampling_ratio), bool(aligned))
    return _backend.call(_roi_align_slots_body, torch.ops.covfast.roi_align_slots, *args)
