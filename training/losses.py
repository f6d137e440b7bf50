"""Training losses: Inf-Net's deep supervision, the multi-class loss and the inpainting losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from covfast.nn import InfNetOutput


def box_mean(x: torch.Tensor, size: int = 31) -> torch.Tensor:
    """``F.avg_pool2d(x, size, stride=1, padding=size // 2)`` (zero padding counted) by running sums.

    Two 1D cumulative sums in float64 cost O(1) per pixel whatever the window; CPU ``avg_pool2d`` costs O(size^2)
    per pixel, which made the 31 x 31 boundary weights most of a CPU training step.

    Args:
        x: [B, C, H, W] float; ``size`` odd.
    """
    half = size // 2
    y = F.pad(x.double(), (half + 1, half, half + 1, half))  # one extra leading zero: window sums by differences
    y = y.cumsum(dim=-1)
    y = y[..., size:] - y[..., :-size]
    y = y.cumsum(dim=-2)
    y = y[..., size:, :] - y[..., :-size, :]
    return (y / (size * size)).to(x.dtype)


def boundary_weight(target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Pixel weights of :func:`structure_loss`: 1 + 5 |boxmean_31(G) - G|, 0 where not valid."""
    target = target.float()
    return (1 + 5 * torch.abs(box_mean(target, 31) - target)) * valid


def structure_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """L_seg = weighted IoU + lambda * weighted BCE with lambda = 1 (Inf-Net, after PraNet / F3Net).

    Pixels near the target's boundary weigh up to 6x (1 + 5 |avgpool_31(G) - G|), so hard edges count more.

    Args:
        logits: [B, 1, H, W] float logits.
        target: [B, 1, H, W] float target in [0, 1] (soft pseudo labels allowed).
        valid: [B, 1, H, W] float, 0 where the loss is ignored.
        weight: :func:`boundary_weight` of ``target`` and ``valid`` when already computed (deep supervision
            scores several maps against one target).

    Returns:
        scalar float32, mean over the batch.
    """
    logits, target = logits.float(), target.float()
    if weight is None:
        weight = boundary_weight(target, valid)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    wbce = (weight * bce).sum(dim=(2, 3)) / weight.sum(dim=(2, 3)).clamp_min(1e-6)
    prob = torch.sigmoid(logits)
    inter = (prob * target * weight).sum(dim=(2, 3))
    union = ((prob + target) * weight).sum(dim=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (wbce + wiou).mean()


def edge_target(target: torch.Tensor, width: int = 2) -> torch.Tensor:
    """Boundary band of a mask: dilation minus erosion with a (2 * width + 1) square; [B, 1, H, W] float 0/1."""
    hard = (target > 0.5).float()
    k = 2 * width + 1
    dilated = F.max_pool2d(hard, k, stride=1, padding=width)
    eroded = -F.max_pool2d(-hard, k, stride=1, padding=width)
    return dilated - eroded


def infnet_loss(out: InfNetOutput, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L_total = L_seg(G, S_g) + L_edge + sum_i L_seg(G, S_i), L_edge = BCE against the mask's boundary band."""
    weight = boundary_weight(target, valid)
    loss = structure_loss(out.global_map, target, valid, weight)
    for side in out.side:
        loss = loss + structure_loss(side, target, valid, weight)
    edge = F.binary_cross_entropy_with_logits(out.edge.float(), edge_target(target), weight=valid)
    return loss + edge


def lovasz_hinge(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Lovasz hinge (Berman et al., CVPR 2018): a convex surrogate of 1 - IoU of the mask ``logits > 0``, per image.

    Each image's hinge errors 1 - logit * sign (sign +1 on the target, -1 off it) are sorted, and each error weighs as
    much as it moves the Jaccard loss of the mask made by the pixels above it: the gradient of the Lovasz extension of
    the Jaccard loss. Unlike the soft IoU of :func:`structure_loss`, it optimises the thresholded mask's IoU.

    Args:
        logits: [B, 1, H, W] float logits.
        target: [B, 1, H, W] target in [0, 1], binarised at 0.5.
        valid: [B, 1, H, W] float, 0 where pixels are ignored (cutouts).

    Returns:
        scalar float32, mean over the batch (an image without target pixels scores its largest hinge error).
    """
    logits, truth = logits.float().flatten(1), (target.flatten(1) >= 0.5).float()
    keep = valid.flatten(1) > 0
    losses = []
    for image_logits, image_truth, image_keep in zip(logits, truth, keep):
        scores, labels = image_logits[image_keep], image_truth[image_keep]
        if scores.numel() == 0:
            continue
        errors = 1.0 - scores * (2.0 * labels - 1.0)
        errors, order = torch.sort(errors, descending=True)
        labels = labels[order]
        positives = labels.sum()
        jaccard = 1.0 - (positives - labels.cumsum(0)) / (positives + (1.0 - labels).cumsum(0))
        weights = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
        losses.append(torch.dot(F.relu(errors), weights))
    return torch.stack(losses).mean() if losses else logits.sum() * 0.0


def multiclass_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross entropy plus soft Dice of the two lesion classes.

    Args:
        logits: [B, 3, H, W] class logits.
        target: [B, 3, H, W] one-hot (or soft) class target.
        valid: [B, 1, H, W] float mask of counted pixels.

    Returns:
        scalar float32.
    """
    logits, target = logits.float(), target.float()
    ce = -(target * F.log_softmax(logits, dim=1)).sum(dim=1, keepdim=True)
    ce = (ce * valid).sum() / valid.sum().clamp_min(1)
    prob = torch.softmax(logits, dim=1)[:, 1:] * valid
    fg = target[:, 1:] * valid
    dice = 1 - (2 * (prob * fg).sum(dim=(2, 3)) + 1) / (prob.sum(dim=(2, 3)) + fg.sum(dim=(2, 3)) + 1)
    return ce + dice.mean()


def reconstruction_loss(recon: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """L_rec: mean absolute error between the reconstruction and the image, both in [0, 1] (so L_rec in [0, 1])."""
    return torch.abs(recon.float() - image.float()).mean()
