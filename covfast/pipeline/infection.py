"""Infection stage: the shipped Inf-Net models on a CT volume in Hounsfield units.

The networks were trained on COVID-SemiSeg slices: 8-bit lung-windowed axial slices cropped to the lung
region and, as released, turned 90 degrees (the left-right axis runs down the image). Each axial slice of the
volume is mapped into that distribution:

1. Window: HU clipped to [-1000, 200] (width 1200, level -400) and scaled to 0..255, so air is black, aerated
   lung dark grey and soft tissue near white as in the training slices.
2. Orientation: the canonical slice [H anterior->posterior, W right->left] is transposed to [W, H]; training
   used random horizontal and vertical flips, so only the transpose matters.
3. Crop: the bounding box of the lung mask on that slice, widened by ``CROP_MARGIN`` (8 %) of its size on each
   side and clipped to the slice, like the published crops of the lung region.
4. Resize to ``INPUT_SIZE`` x ``INPUT_SIZE`` (bilinear, aspect not kept, as in training) and standardise with
   the training statistics (:mod:`covfast.nn.preprocess`).
Only slices whose lung mask is non-empty run; the probabilities are resized back to the crop and placed in a
zero volume, so the output has the input's full grid.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from covfast.errors import ModelNotInstalledError

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
SINGLE_CLASS = "infnet"
MULTI_CLASS = "infnet_multiclass"
HU_WINDOW = (-1000.0, 200.0)
CROP_MARGIN = 0.08


@dataclass
class InfectionResult:
    """Output of :func:`segment_infection`.

    Attributes:
        prob: [D, H, W] float32 single-class infection probability (0 outside the lungs' slices and crops).
        classes: [D, H, W] uint8 (0 background, 1 GGO, 2 consolidation), or None without the multi-class model.
        models: name and sha256 of each model used.
        timings: seconds per step ("load", "infer").
    """

    prob: np.ndarray
    classes: np.ndarray | None
    models: list[dict]
    timings: dict = field(default_factory=dict)


@dataclass
class LoadedModel:
    """A network with its model card."""

    model: torch.nn.Module
    card: dict


def installed_models(weights_dir: str | Path = WEIGHTS_DIR) -> list[dict]:
    """Model cards of the installed weights: ``name``, ``file``, ``sha256``, ``params``, ``task`` each.

    Args:
        weights_dir: folder of ``<name>.safetensors`` files each with a ``<name>.json`` card.
    """
    found = []
    for card_path in sorted(Path(weights_dir).glob("*.json")):
        weights = card_path.with_suffix(".safetensors")
        if not weights.exists():
            continue
        card = json.loads(card_path.read_text())
        found.append(
            {
                "name": card_path.stem,
                "file": str(weights),
                "sha256": card["sha256"],
                "params": card["params"],
                "task": card["task"],
            }
        )
    return found


def load_models(device: str = "cpu", multiclass: bool = True, weights_dir: str | Path = WEIGHTS_DIR) -> dict:
    """Load the single-class model (and the multi-class one if asked and installed), checking SHA-256.

    Returns:
        ``{name: LoadedModel}`` with the single-class model first.

    Raises:
        ModelNotInstalledError: no single-class weights, or a file whose hash differs from its card.
    """
    from covfast.nn import load_model, sha256_file

    cards = {card["name"]: card for card in installed_models(weights_dir)}
    if SINGLE_CLASS not in cards:
        raise ModelNotInstalledError(
            f"no infection model installed in {weights_dir} (expected {SINGLE_CLASS}.safetensors)"
        )
    names = [SINGLE_CLASS] + ([MULTI_CLASS] if multiclass and MULTI_CLASS in cards else [])
    models = {}
    for name in names:
        card = cards[name]
        if sha256_file(card["file"]) != card["sha256"]:
            raise ModelNotInstalledError(f"{card['file']}: SHA-256 differs from its model card; reinstall covfast")
        models[name] = LoadedModel(load_model(card["file"], device), card)
    return models


def _cards_key(weights_dir) -> tuple:
    """What identifies the installed weights: each model card's name and SHA-256."""
    return tuple(sorted((card["name"], card["sha256"]) for card in installed_models(weights_dir)))


@functools.lru_cache(maxsize=4)
def _shared_models(device: str, multiclass: bool, weights_dir: str, cards_key: tuple) -> dict:
    """:func:`load_models`, loaded once per process for inference: `covfast infer` over many volumes reuses the
    networks instead of reading and hashing the weights for each input. ``cards_key`` makes newly installed weights
    load afresh. The models are only used under ``torch.no_grad`` and never modified."""
    del cards_key
    return load_models(device, multiclass, weights_dir)


@torch.no_grad()
def _forward(models: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Standardised inputs [N, 1, S, S] -> (prob [N, 1, S, S], class_prob [N, 3, S, S] or None), float32."""
    from covfast.nn.preprocess import PIXEL_MEAN, PIXEL_STD

    prob = torch.sigmoid(models[SINGLE_CLASS].model(x).prediction.float())
    if MULTI_CLASS not in models:
        return prob, None
    # The multi-class network takes the single-class probability as its prior channel, standardised like a slice.
    prior = (prob - PIXEL_MEAN) / PIXEL_STD
    return prob, torch.softmax(models[MULTI_CLASS].model(torch.cat([x, prior], dim=1)).float(), dim=1)


def _resize(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False).cpu().numpy().astype(np.float32)


def predict_slices(models: dict, slices: np.ndarray, device: str = "cpu", batch_size: int = 8):
    """Run the models on 8-bit slices that already look like the training slices.

    Args:
        models: from :func:`load_models`.
        slices: [N, H, W] uint8 grey slices.
        device: torch device.
        batch_size: slices per forward pass.

    Returns:
        (prob [N, H, W] float32, class_prob [N, 3, H, W] float32 or None without a multi-class model).
    """
    from covfast.nn.preprocess import to_input

    size = slices.shape[1:]
    probs, class_probs = [], []
    for start in range(0, len(slices), batch_size):
        batch = torch.from_numpy(np.array(slices[start : start + batch_size], dtype=np.uint8))[:, None].to(device)
        prob, class_prob = _forward(models, to_input(batch))
        probs.append(_resize(prob, size)[:, 0])
        if class_prob is not None:
            class_probs.append(_resize(class_prob, size))
    return np.concatenate(probs), (np.concatenate(class_probs) if class_probs else None)


def window_hu(hu: np.ndarray) -> np.ndarray:
    """HU -> 8-bit lung window: clip to :data:`HU_WINDOW`, scale to 0..255; same shape, uint8."""
    lo, hi = HU_WINDOW
    return np.round((np.clip(hu.astype(np.float32), lo, hi) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def lung_crop(lung_slice: np.ndarray) -> tuple[slice, slice] | None:
    """Bounding box of a slice's lung mask widened by :data:`CROP_MARGIN`, or None if the slice has no lung."""
    rows = np.flatnonzero(lung_slice.any(axis=1))
    cols = np.flatnonzero(lung_slice.any(axis=0))
    if rows.size == 0:
        return None

    def widen(lo, hi, limit):
        margin = round(CROP_MARGIN * (hi - lo + 1))
        return slice(max(0, lo - margin), min(limit, hi + 1 + margin))

    return widen(rows[0], rows[-1], lung_slice.shape[0]), widen(cols[0], cols[-1], lung_slice.shape[1])


def gate_aerated(prob: np.ndarray, hu: np.ndarray, min_hu: float | None) -> np.ndarray:
    """Zero the infection probability of voxels below ``min_hu`` (aerated lung, not ground glass); None: unchanged.

    Ground-glass opacity is denser than aerated lung (roughly -700 HU and above against -850 to -900), so voxels
    well below that cannot be infected; the networks see 8-bit slices downsampled to their input size, whose
    probability maps spill over lesion borders and thin structures.

    Args:
        prob: [D, H, W] float32 probability.
        hu: [D, H, W] Hounsfield units, same shape.
        min_hu: threshold in HU, or None.

    Returns:
        [D, H, W] float32 (a new array when gated).
    """
    if min_hu is None:
        return prob
    return np.where(hu >= min_hu, prob, np.float32(0)).astype(np.float32)


def lung_slices(lung: np.ndarray) -> list[tuple[int, tuple[slice, slice]]]:
    """(z, crop) of every slice of a [D, H, W] lung mask that contains lung; crop from :func:`lung_crop`."""
    return [(z, crop) for z in range(lung.shape[0]) if (crop := lung_crop(lung[z] > 0)) is not None]


def slice_view(hu: np.ndarray, z: int, crop: tuple[slice, slice]) -> np.ndarray:
    """Slice ``z`` of a [D, H, W] HU volume as the networks see it before resizing: windowed, cropped, transposed.

    Returns:
        [crop W, crop H] uint8, contiguous.
    """
    rows, cols = crop
    return np.ascontiguousarray(window_hu(hu[z, rows, cols]).T)


def segment_infection(
    hu: np.ndarray,
    lung: np.ndarray,
    spacing_mm,
    device: str = "cpu",
    batch_size: int = 8,
    multiclass: bool = True,
    progress: Callable[[int, int], None] | None = None,
    weights_dir: str | Path = WEIGHTS_DIR,
) -> InfectionResult:
    """Infection probability (and GGO / consolidation labels) of a CT volume.

    Args:
        hu: [D, H, W] int16 Hounsfield units, canonical orientation (D inferior->superior, H anterior->posterior,
            W patient right->left).
        lung: [D, H, W] uint8 lung mask (0 background, 1 right, 2 left).
        spacing_mm: (dz, dy, dx) voxel spacing; the 2D networks do not use it (slices are resized to the input
            size), it is part of the stage contract.
        device: torch device.
        batch_size: slices per forward pass.
        multiclass: also run the GGO / consolidation model when installed.
        progress: optional callable(n_done, n_total) called after each batch.
        weights_dir: folder of installed weights.

    Returns:
        :class:`InfectionResult` on the full [D, H, W] grid.

    Raises:
        ModelNotInstalledError: no infection weights installed.
        ValueError: ``hu`` and ``lung`` differ in shape or are not 3D.
    """
    from covfast.nn.preprocess import to_input

    del spacing_mm
    if hu.ndim != 3 or hu.shape != lung.shape:
        raise ValueError(f"hu and lung must be [D, H, W] of one shape; got {hu.shape} and {lung.shape}")
    t0 = time.perf_counter()
    models = _shared_models(device, multiclass, str(weights_dir), _cards_key(weights_dir))
    timings = {"load": time.perf_counter() - t0}
    t0 = time.perf_counter()
    prob = np.zeros(hu.shape, np.float32)
    classes = np.zeros(hu.shape, np.uint8) if MULTI_CLASS in models else None
    work = lung_slices(lung)
    for start in range(0, len(work), batch_size):
        chunk = work[start : start + batch_size]
        # Crops differ in size: each is resized to the network input on its own, then they run as one batch.
        views = [torch.from_numpy(slice_view(hu, z, crop))[None, None] for z, crop in chunk]
        x = torch.cat([to_input(view.to(device)) for view in views])
        batch_prob, batch_classes = _forward(models, x)
        for i, (z, (rows, cols)) in enumerate(chunk):
            size = views[i].shape[-2:]
            prob[z, rows, cols] = _resize(batch_prob[i : i + 1], size)[0, 0].T
            if classes is not None:
                classes[z, rows, cols] = _resize(batch_classes[i : i + 1], size)[0].argmax(axis=0).T
        if progress is not None:
            progress(min(start + batch_size, len(work)), len(work))
    timings["infer"] = time.perf_counter() - t0
    used = [{"name": name, "sha256": loaded.card["sha256"]} for name, loaded in models.items()]
    return InfectionResult(prob, classes, used, timings)
