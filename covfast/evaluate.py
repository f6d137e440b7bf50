"""Slice-level evaluation of the shipped infection models (``covfast evaluate-slices``).

Metrics per image, for a probability map ``p`` and a binary ground truth ``g`` (Fan et al., Inf-Net, IEEE TMI
2020, evaluation conventions):
    dice           2|P & G| / (|P| + |G|) with P = p >= 0.5; 1 when both are empty
    dice_mean256   mean of that Dice over the 256 thresholds t = j / 255, j = 0..255, with P = p >= t
    iou            |P & G| / |P | G| at 0.5; 1 when both are empty
    sensitivity    |P & G| / |G| at 0.5; undefined (null) when G is empty
    specificity    |~P & ~G| / |~G| at 0.5; undefined when G covers the image
    mae            mean |p - g|
    s_measure      structure measure S_alpha (Fan et al., ICCV 2017), alpha = 0.5: object-aware term (mean / SD of
                   p inside and outside G) and region-aware term (SSIM-like score of the four blocks cut at G's
                   centroid, weighted by block area); 1 - mean(p) when G is empty, mean(p) when G fills the image
    e_measure      enhanced-alignment measure (Fan et al., IJCAI 2018), mean over the same 256 thresholds
                   (Inf-Net's "mean E_phi")
S- and E-measure follow the arithmetic of the MATLAB toolbox the Inf-Net and camouflage papers report with
(MATLAB's ``eps`` in the denominators, standard deviation over n - 1, blocks cut at the rounded 1-based centroid).
One difference, as for ``dice_mean256`` and ``mae``: that toolbox first stretches each saved 8-bit map to [0, 1]
by its own minimum and maximum; here every metric is taken on the model's probability map as it is, so a slice
with low probabilities everywhere is not stretched into a confident false positive.
Summaries are the mean over images with a 95 % interval mean +- 1.96 * SD / sqrt(n) (undefined values left out);
``dice_present`` is the mean Dice over the images whose ground truth contains the class.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

METRICS = ("dice", "dice_mean256", "iou", "sensitivity", "specificity", "mae", "s_measure", "e_measure")
THRESHOLD = 0.5
CLASS_NAMES = {1: "ggo", 2: "consolidation"}
EPS = float(np.finfo(np.float64).eps)  # MATLAB's eps, as in the toolbox's formulas


def _object_score(values: np.ndarray) -> float:
    # Object term: 2 x / (x^2 + 1 + sigma + eps) over the pixels of one side of the ground truth.
    if values.size == 0:
        return 0.0
    mean = float(values.mean())
    sd = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return 2.0 * mean / (mean * mean + 1.0 + sd + EPS)


def _block_ssim(pred: np.ndarray, truth: np.ndarray) -> float:
    # Region term of one block; an empty block has zero weight and contributes nothing.
    n = pred.size
    if n == 0:
        return 0.0
    x, y = float(pred.mean()), float(truth.mean())
    dx, dy = pred - x, truth - y
    var_x = float((dx * dx).sum()) / (n - 1 + EPS)
    var_y = float((dy * dy).sum()) / (n - 1 + EPS)
    cov = float((dx * dy).sum()) / (n - 1 + EPS)
    alpha = 4.0 * x * y * cov
    beta = (x * x + y * y) * (var_x + var_y)
    if alpha != 0:
        return alpha / (beta + EPS)
    return 1.0 if beta == 0 else 0.0


def s_measure(prob: np.ndarray, truth: np.ndarray) -> float:
    """Structure measure S_alpha (alpha = 0.5) of a [H, W] probability map against a binary ground truth."""
    prob = np.asarray(prob, dtype=np.float64)
    truth = np.asarray(truth).astype(bool)
    share = float(truth.mean())
    if share == 0:
        return 1.0 - float(prob.mean())
    if share == 1:
        return float(prob.mean())
    s_object = share * _object_score(prob[truth]) + (1 - share) * _object_score(1.0 - prob[~truth])
    rows, cols = truth.shape
    total = float(truth.sum())
    # Rounded 1-based centroid (MATLAB round: halves away from zero); blocks are [:Y, :X] etc. in 0-based slicing.
    cx = int(np.floor((truth.sum(axis=0) * np.arange(1, cols + 1)).sum() / total + 0.5))
    cy = int(np.floor((truth.sum(axis=1) * np.arange(1, rows + 1)).sum() / total + 0.5))
    area = float(rows * cols)
    w = [cx * cy / area, (cols - cx) * cy / area, cx * (rows - cy) / area]
    w.append(1.0 - sum(w))
    gt = truth.astype(np.float64)
    blocks = [(slice(0, cy), slice(0, cx)), (slice(0, cy), slice(cx, None)),
              (slice(cy, None), slice(0, cx)), (slice(cy, None), slice(cx, None))]  # fmt: skip
    s_region = sum(wi * _block_ssim(prob[b], gt[b]) for wi, b in zip(w, blocks))
    return max(0.0, 0.5 * s_object + 0.5 * s_region)


def _e_measure_counts(tp, fp, fn, tn) -> np.ndarray:
    """Enhanced-alignment measure of binary maps given their confusion counts (arrays over thresholds).

    Each pixel's alignment value depends only on its (prediction, truth) pair and on the two global means, so the
    sum over the image is the four counts times the four values.
    """
    tp, fp, fn, tn = (np.asarray(c, dtype=np.float64) for c in (tp, fp, fn, tn))
    n = tp + fp + fn + tn
    n_pos = tp + fn
    mu_f = (tp + fp) / n
    mu_g = n_pos / n
    total = np.zeros_like(n)
    for count, f, g in ((tp, 1.0, 1.0), (fp, 1.0, 0.0), (fn, 0.0, 1.0), (tn, 0.0, 0.0)):
        af, ag = f - mu_f, g - mu_g
        align = 2.0 * ag * af / (ag * ag + af * af + EPS)
        total = total + count * (align + 1.0) ** 2 / 4.0
    total = np.where(n_pos == 0, tn + fn, total)  # empty truth: 1 - prediction
    total = np.where(n_pos == n, tp + fp, total)  # full truth: the prediction
    return total / (n - 1 + EPS)


def _dice(tp, fp, fn):
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 1.0)


def binary_metrics(prob: np.ndarray, truth: np.ndarray) -> dict:
    """Metrics of one image.

    Args:
        prob: [H, W] float probabilities in [0, 1].
        truth: [H, W] bool (or 0/1) ground truth of the same shape.

    Returns:
        dict with the keys of :data:`METRICS` (float, or None where undefined) and ``present`` (bool).
    """
    prob = np.asarray(prob, dtype=np.float64)
    shape = prob.shape if prob.ndim == 2 else (1, prob.size)
    prob = prob.ravel()
    truth = np.asarray(truth).ravel().astype(bool)
    if prob.shape != truth.shape:
        raise ValueError(f"prediction and ground truth differ in size: {prob.size} vs {truth.size}")
    n_pos = int(truth.sum())
    n_neg = truth.size - n_pos
    # Counts of positives / negatives with p >= t for all 256 thresholds at once, from sorted probabilities.
    thresholds = np.arange(256) / 255.0
    pos_sorted = np.sort(prob[truth])
    neg_sorted = np.sort(prob[~truth])
    tp = n_pos - np.searchsorted(pos_sorted, thresholds, side="left")
    fp = n_neg - np.searchsorted(neg_sorted, thresholds, side="left")
    dice256 = _dice(tp, fp, n_pos - tp)
    e256 = _e_measure_counts(tp, fp, n_pos - tp, n_neg - fp)
    pred = prob >= THRESHOLD
    tp5 = int((pred & truth).sum())
    fp5 = int((pred & ~truth).sum())
    fn5 = n_pos - tp5
    union = tp5 + fp5 + fn5
    return {
        "dice": float(_dice(tp5, fp5, fn5)),
        "dice_mean256": float(dice256.mean()),
        "iou": tp5 / union if union else 1.0,
        "sensitivity": tp5 / n_pos if n_pos else None,
        "specificity": (n_neg - fp5) / n_neg if n_neg else None,
        "mae": float(np.abs(prob - truth).mean()),
        "s_measure": s_measure(prob.reshape(shape), truth.reshape(shape)),
        "e_measure": float(e256.mean()),
        "present": n_pos > 0,
    }


def _interval(values: list) -> dict:
    vals = np.array([v for v in values if v is not None], dtype=np.float64)
    if vals.size == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = float(vals.mean())
    half = 1.96 * float(vals.std(ddof=1)) / math.sqrt(vals.size) if vals.size > 1 else 0.0
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": int(vals.size)}


def summarize(per_image: list[dict]) -> dict:
    """Mean and 95 % interval of each metric over images, plus ``dice_present``.

    Args:
        per_image: dicts from :func:`binary_metrics`.

    Returns:
        ``{metric: {"mean", "ci95": [lo, hi], "n"}}`` for every metric of :data:`METRICS` and ``dice_present``.
    """
    # .get: records scored before a metric existed (older fold files) leave it out instead of failing.
    summary = {key: _interval([m.get(key) for m in per_image]) for key in METRICS}
    summary["dice_present"] = _interval([m["dice"] for m in per_image if m["present"]])
    return summary


def multiclass_metrics(class_prob: np.ndarray, truth: np.ndarray) -> dict:
    """Per-class metrics of one image.

    Args:
        class_prob: [3, H, W] float class probabilities (background, GGO, consolidation).
        truth: [H, W] integer labels 0 / 1 / 2.

    Returns:
        ``{"ggo": metrics, "consolidation": metrics}``, each as :func:`binary_metrics` returns. The hard
        prediction of a class is argmax == class, expressed as a probability map thresholded at 0.5 by
        zeroing the class probability where another class wins.
    """
    labels = class_prob.argmax(axis=0)
    out = {}
    for cls, name in CLASS_NAMES.items():
        # Threshold-0.5 metrics follow the argmax labels; the 256-threshold Dice and MAE use the probability.
        prob = class_prob[cls]
        metrics = binary_metrics(prob, truth == cls)
        hard = binary_metrics((labels == cls).astype(np.float64), truth == cls)
        for key in ("dice", "iou", "sensitivity", "specificity"):
            metrics[key] = hard[key]
        out[name] = metrics
    return out


def _read_gray(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


# Colours of the multi-class masks' palette (COVID-SemiSeg: index 1 dark red = GGO, index 2 dark green =
# consolidation), for masks saved as RGB instead of palette PNGs.
_CLASS_COLOURS = {(0, 0, 0): 0, (128, 0, 0): 1, (0, 128, 0): 2}
MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _grey(im) -> np.ndarray:
    """Single-channel values of a PIL image as they are stored (1, 8, 16 or 32 bits); colour images as luminance."""
    return np.asarray(im) if im.mode in ("1", "L", "I", "I;16", "I;16B", "F") else np.asarray(im.convert("L"))


def read_infection_mask(path: Path) -> np.ndarray:
    """A single-class ground-truth mask as [H, W] bool: palette images by index (> 0), grey 0/1 masks by value
    (> 0), other grey or colour masks (0/255, JPEG noise) by brightness (> 127)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode == "P":
            return np.asarray(im) > 0
        grey = _grey(im)
    top = grey.max()
    return grey > (127 if 1 < top <= 255 else 0)


def read_class_mask(path: Path) -> np.ndarray:
    """A multi-class ground-truth mask as [H, W] uint8 labels 0 background / 1 GGO / 2 consolidation: palette
    indices, grey values 0 / 1 / 2, or the palette's colours in an RGB image.

    Raises:
        InputError: the mask holds other values or colours.
    """
    from PIL import Image

    from covfast.errors import InputError

    with Image.open(path) as im:
        if im.mode == "P":
            labels = np.asarray(im)
        elif im.mode in ("RGB", "RGBA"):
            rgb = np.asarray(im.convert("RGB")).astype(np.int32)
            code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
            labels = np.full(code.shape, 255, np.uint8)
            for (r, g, b), label in _CLASS_COLOURS.items():
                labels[code == (r << 16) | (g << 8) | b] = label
            if (labels == 255).any():
                colours = sorted({tuple(int(v) for v in c) for c in rgb[labels == 255][:1000]})[:4]
                raise InputError(path, f"colours {colours} are none of background (0, 0, 0), GGO (128, 0, 0), "
                                 "consolidation (0, 128, 0)")
        else:
            labels = _grey(im)
    found = np.unique(labels)
    if found.max() > 2:
        raise InputError(path, f"label values {found[:8].tolist()} are not 0 / 1 / 2 (background / GGO / "
                         "consolidation)")
    return labels


def _pairs(images_dir: Path, masks_dir: Path) -> list[tuple[Path, Path]]:
    from covfast.errors import InputError

    if not images_dir.is_dir():
        raise InputError(images_dir, "not a folder of slice images")
    if not masks_dir.is_dir():
        raise InputError(masks_dir, "not a folder of masks")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    # One mask per name; a PNG wins over a lossy or other format of the same name.
    candidates = [p for p in masks_dir.iterdir() if p.suffix.lower() in MASK_SUFFIXES]
    masks: dict[str, Path] = {}
    for mask in sorted(candidates, key=lambda p: MASK_SUFFIXES.index(p.suffix.lower())):
        masks.setdefault(mask.stem, mask)
    pairs = [(img, masks[img.stem]) for img in images if img.stem in masks]
    if not pairs:
        raise InputError(images_dir, f"no image has a mask of the same name in {masks_dir}")
    return pairs


def evaluate_slices(
    images_dir,
    masks_dir,
    task: str = "infection",
    json_path=None,
    device: str = "cpu",
    weights_dir=None,
    tta: str | None = None,
    ensemble: bool = True,
) -> dict:
    """Run the installed models on 2D slices and score them against masks.

    Args:
        images_dir: folder of 8-bit grey slices (JPG/PNG) laid out like COVID-SemiSeg ``Imgs``.
        masks_dir: folder of PNG masks with the images' names: 0/255 for ``infection``, palette 0/1/2 for
            ``multiclass``.
        task: "infection" (single-class model), "multiclass" (GGO / consolidation model with its prior) or
            "instances" (lesion instances, COCO-style AP; see :func:`covfast.instances.evaluate_instances`).
        json_path: optional file to write the result to as JSON.
        device: torch device for the models.
        weights_dir: folder of weights and model cards to score (default: the installed ones).
        tta: test-time augmentation of the networks (:data:`covfast.pipeline.infection.TTA_CHOICES`; None: the
            pipeline's default), recorded in the result as ``tta``.
        ensemble: average the installed U-Net partner's probability into the Inf-Net's (the pipeline's default);
            the models that ran are listed under ``models``.

    Returns:
        ``{"task", "n_images", "models", <summary>, "per_image": [...]}``. For "infection" the summary keys
        are those of :func:`summarize` at the top level; for "multiclass" they sit under "ggo" and
        "consolidation". Each ``per_image`` entry names the image and carries its metrics.
    """
    from covfast.errors import ModelNotInstalledError, UsageError
    from covfast.pipeline.infection import MULTI_CLASS, WEIGHTS_DIR, check_tta, load_models, predict_slices

    weights_dir = WEIGHTS_DIR if weights_dir is None else weights_dir
    if task == "instances":
        from covfast.instances import evaluate_instances

        return evaluate_instances(images_dir, masks_dir, json_path, device, weights_dir, tta, ensemble)
    if task not in ("infection", "multiclass"):
        raise UsageError(f"unknown task {task!r}; use infection, multiclass or instances")
    tta = check_tta(tta)
    pairs = _pairs(Path(images_dir), Path(masks_dir))
    models = load_models(device, multiclass=task == "multiclass", weights_dir=weights_dir, ensemble=ensemble)
    if task == "multiclass" and MULTI_CLASS not in models:
        raise ModelNotInstalledError(f"no multi-class model installed ({MULTI_CLASS}.safetensors)")
    per_image = []
    for image_path, mask_path in pairs:
        image = _read_gray(image_path)
        truth = read_infection_mask(mask_path) if task == "infection" else read_class_mask(mask_path)
        if truth.shape != image.shape:
            raise UsageError(f"{mask_path}: size {truth.shape} differs from its image {image.shape}")
        prob, class_prob = predict_slices(models, image[None], device=device, tta=tta)
        if task == "infection":
            entry = binary_metrics(prob[0], truth)
        else:
            entry = multiclass_metrics(class_prob[0], truth)
        per_image.append({"image": image_path.name, **entry})
    result = {"task": task, "n_images": len(per_image), "models": [m.card for m in models.values()], "tta": tta}
    if task == "infection":
        result.update(summarize(per_image))
    else:
        for name in CLASS_NAMES.values():
            result[name] = summarize([entry[name] for entry in per_image])
    result["per_image"] = per_image
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result
