"""``covfast::affinity``: the affinity head of the one-shot COVID / pneumonia / normal model, with autograd."""

from __future__ import annotations

import torch

from covfast import _backend
from covfast.ops import reference


def _check(features: torch.Tensor, weight: torch.Tensor, vector: torch.Tensor) -> None:
    if features.dim() not in (2, 3) or weight.dim() != 2 or vector.dim() != 1:
        raise ValueError(
            f"affinity expects X [beta, C] or [N, beta, C], W [beta, C*], v [C*]; got {tuple(features.shape)}, "
            f"{tuple(weight.shape)}, {tuple(vector.shape)}"
        )
    if features.shape[-2] != weight.shape[0] or weight.shape[1] != vector.shape[0]:
        raise ValueError(
            f"affinity shapes disagree: X {tuple(features.shape)}, W {tuple(weight.shape)}, v {tuple(vector.shape)}"
        )


def _affinity_body(features: torch.Tensor, weight: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    _check(features, weight, vector)
    return reference.affinity(features, weight, vector)


_affinity_op = torch.library.custom_op("covfast::affinity", mutates_args=())(_affinity_body)


def affinity(features: torch.Tensor, weight: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """Affinity head ``z = (W^T X)^T v`` (Ter-Sarkisov, one-shot COVID-19 model), computed as ``X^T (W v)``.

    The reassociation reads X once and never forms the [C, C*] matrix ``W^T X``; with the small sizes of the model
    (beta = 8 RoIs, C* <= 64) the matmuls of the torch reference are the implementation on every device.

    Args:
        features: X, [beta, C] or [N, beta, C] float.
        weight: W, [beta, C*], same dtype.
        vector: v, [C*], same dtype.

    Returns:
        z, [C] or [N, C].
    """
    return _backend.call(_affinity_body, torch.ops.covfast.affinity, features, weight, vector)


@_affinity_op.register_fake
def _(features, weight, vector):
    _check(features, weight, vector)
    return features.new_empty((*features.shape[:-2], features.shape[-1]))


@torch.library.custom_op("covfast::affinity_backward", mutates_args=())
def affinity_backward(
    grad: torch.Tensor, features: torch.Tensor, weight: torch.Tensor, vector: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dX, dW, dv) of :func:`affinity` for the output gradient ``grad`` ([C] or [N, C])."""
    return reference.affinity_backward(grad, features, weight, vector)


@affinity_backward.register_fake
def _(grad, features, weight, vector):
    return torch.empty_like(features), torch.empty_like(weight), torch.empty_like(vector)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    return torch.ops.covfast.affinity_backward(grad, *ctx.saved_tensors)


_affinity_op.register_autograd(_backward, setup_context=_setup_context)
