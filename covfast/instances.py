"""Lesion instances from an infection probability map, and COCO-style mask AP on slices.

An instance is one 8-connected component of ``prob >= threshold`` with at least ``min_area`` pixels; its score is
the mean probability inside it and its box is the component's bounding box in pixel-edge coordinates
(``x2 = last column + 1``), the convention of :func:`covfast.ops.roi_align` with ``aligned=True``.

Scoring follows the one-shot Affinity paper (Ter-Sarkisov), which reports COCO-style AP per slice averaged over
slices: for each slice, detections are sorted by score and greedily matched to unmatched ground-truth instances at
mask IoU >= t; precision is made monotone and read at the 101 recall points 0, 0.01, ..., 1 (COCO's
interpolation); AP@50 and AP@75 are t = 0.50 and 0.75, mAP averages t = 0.50, 0.55, ..., 0.95. Negative slices:
no ground truth and no prediction scores 1 (precision 1, nothing missed); no ground truth but predictions scores 0;
ground truth but no prediction scores 0. Ground-truth instances are the 8-connected components of the mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

IOU_THRESHOLDS = np.round(np.arange(0.50, 0.951, 0.05), 2)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
PROB_THRESHOLD = 0.5
MIN_AREA = 20
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass
class Instance:
    """One lesion instance on a slice.

    Attributes:
        box: (x1, y1, x2, y2) float pixel-edge coordinates (x = column, y = row; x2, y2 exclusive).
        score: mean probability inside the mask (1.0 for ground truth).
        mask: [H, W] bool.
    """

    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray


def components(mask: np.ndarray, min_area: int = 1) -> list[np.ndarray]:
    """8-connected components of a 2D mask with at least ``min_area`` pixels, as [H, W] bool masks."""
    labels, n = ndi.label(mask, structure=_EIGHT)
    if n == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    return [labels == k for k in range(1, n + 1) if areas[k] >= min_area]


def _box(mask: np.ndarray) -> tuple[float, float, float, float]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def extract_instances(prob: np.ndarray, threshold: float = PROB_THRESHOLD, min_area: int = MIN_AREA) -> list[Instance]:
    """Lesion instances of one slice, highest score first.

    Args:
        prob: [H, W] float infection probability.
        threshold: probability at or above which a pixel is lesion.
        min_area: smallest instance in pixels (specks below it are dropped).

    Returns:
        list of :class:`Instance`, sorted by descending score.
    """
    found = [Instance(_box(m), float(prob[m].mean()), m) for m in components(prob >= threshold, min_area)]
    return sorted(found, key=lambda inst: -inst.score)


def truth_instances(mask: np.ndarray) -> list[Instance]:
    """Ground-truth instances: every 8-connected component of a binary [H, W] mask, score 1."""
    return [Instance(_box(m), 1.0, m) for m in components(mask)]


def mask_iou(pred: list[np.ndarray], truth: list[np.ndarray]) -> np.ndarray:
    """[P, G] float64 IoU between predicted and ground-truth [H, W] bool masks."""
    if not pred or not truth:
        return np.zeros((len(pred), len(truth)))
    p = np.stack(pred).reshape(len(pred), -1).astype(np.float64)
    g = np.stack(truth).reshape(len(truth), -1).astype(np.float64)
    inter = p @ g.T
    union = p.sum(1)[:, None] + g.sum(1)[None, :] - inter
    return inter / union


def slice_ap(pred: list[Instance], truth: list[Instance], thresholds: np.ndarray = IOU_THRESHOLDS) -> np.ndarray:
    """COCO-style AP of one slice at each IoU threshold.

    Args:
        pred: predicted instances (any order; sorted by score here).
        truth: ground-truth instances.
        thresholds: [T] IoU thresholds.

    Returns:
        [T] float64 AP, with the negative-slice rule of the module docstring.
    """
    if not truth:
        return np.full(len(thresholds), 0.0 if pred else 1.0)
    if not pred:
        return np.zeros(len(thresholds))
    pred = sorted(pred, key=lambda inst: -inst.score)
    iou = mask_iou([p.mask for p in pred], [g.mask for g in truth])
    out = np.zeros(len(thresholds))
    for t, thr in enumerate(thresholds):
        matched = np.zeros(len(truth), dtype=bool)
        hits = np.zeros(len(pred))
        for i in range(len(pred)):
            candidates = np.where(~matched & (iou[i] >= thr), iou[i], -1.0)
            j = int(candidates.argmax())
            if candidates[j] >= 0:
                matched[j] = True
                hits[i] = 1.0
        tp = np.cumsum(hits)
        recall = tp / len(truth)
        precision = tp / np.arange(1, len(pred) + 1)
        # Monotone envelope from the right, then precision at the first recall >= each recall point (COCO).
        precision = np.maximum.accumulate(precision[::-1])[::-1]
        idx = np.searchsorted(recall, RECALL_POINTS, side="left")
        out[t] = np.where(idx < len(pred), precision[np.minimum(idx, len(pred) - 1)], 0.0).mean()
    return out


def evaluate_instances(
    images_dir, masks_dir, json_path=None, device: str = "cpu", weights_dir=None, tta: str | None = None,
    ensemble: bool = True,
) -> dict:
    """Lesion-instance AP of the shipped single-class infection probability (the Inf-Net's, averaged with the U-Net
    partner's when installed and ``ensemble``) on 2D slices.

    Args:
        images_dir: folder of 8-bit grey slices (JPG/PNG) laid out like COVID-SemiSeg ``Imgs``.
        masks_dir: folder of 0/255 PNG infection masks with the images' names.
        json_path: optional file to write the result to as JSON.
        device: torch device for the model.
        weights_dir: folder of weights and model cards to score (default: the installed ones).
        tta: test-time augmentation of the network (as for :func:`covfast.evaluate.evaluate_slices`).
        ensemble: as for :func:`covfast.evaluate.evaluate_slices`.

    Returns:
        ``{"task": "instances", "n_images", "models", "ap50", "ap75", "map", "ci95", "per_image"}``: the three
        scores are means over slices of :func:`slice_ap`; ``ci95`` holds mean +- 1.96 SE of each; each
        ``per_image`` entry has ``image``, ``n_truth``, ``n_pred``, ``ap50``, ``ap75``, ``map``.
    """
    from covfast.errors import UsageError
    from covfast.evaluate import _interval, _pairs, _read_gray, read_infection_mask
    from covfast.pipeline.infection import WEIGHTS_DIR, check_tta, load_models, predict_slices

    tta = check_tta(tta)
    pairs = _pairs(Path(images_dir), Path(masks_dir))
    models = load_models(device, multiclass=False, weights_dir=WEIGHTS_DIR if weights_dir is None else weights_dir,
                         ensemble=ensemble)
    per_image = []
    for image_path, mask_path in pairs:
        image = _read_gray(image_path)
        truth = read_infection_mask(mask_path)
        if truth.shape != image.shape:
            raise UsageError(f"{mask_path}: size {truth.shape} differs from its image {image.shape}")
        prob, _ = predict_slices(models, image[None], device=device, tta=tta)
        pred = extract_instances(prob[0])
        gt = truth_instances(truth)
        ap = slice_ap(pred, gt)
        per_image.append(
            {
                "image": image_path.name,
                "n_truth": len(gt),
                "n_pred": len(pred),
                "ap50": float(ap[0]),
                "ap75": float(ap[5]),
                "map": float(ap.mean()),
            }
        )
    result = {"task": "instances", "n_images": len(per_image), "models": [m.card for m in models.values()], "tta": tta}
    for key in ("ap50", "ap75", "map"):
        result[key] = float(np.mean([entry[key] for entry in per_image]))
    result["ci95"] = {key: _interval([entry[key] for entry in per_image])["ci95"] for key in ("ap50", "ap75", "map")}
    result["per_image"] = per_image
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result
