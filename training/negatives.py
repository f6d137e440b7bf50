"""Negative (infection-free) slices for the specificity fine-tune of the single-class Inf-Net.

Two sources:
- COVID-CT-MD slices whose radiologist label ``infection_slice_labels`` is 0, mapped exactly as at inference
  (:func:`covfast.io.load_volume`, :func:`covfast.pipeline.lung.lung_mask`, then the window / crop / transpose of
  :func:`covfast.pipeline.infection.slice_view` and the resize of :func:`covfast.nn.preprocess.to_input`), with an
  all-zero target. Only the cases a recipe names are used (P001): cap001 and normal001 stay held out for the
  slice-specificity check.
- The unlabelled COVID-SemiSeg slices whose Semi-Inf-Net pseudo label marks little infection, with that soft
  pseudo label as target (none of the 1,600 pseudo masks is empty, so these are "nearly clean" slices).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.ctmd import slice_labels
from training.data import SliceSet, load_unlabelled


def ctmd_crops(data: str | Path, case: str, size: int, cache_dir: str | Path | None = None) -> dict:
    """The network-input crops of one COVID-CT-MD case, with the slice labels.

    Args:
        data: the ``covid-ct-md`` folder (case folders and ``labels.json``).
        case: case folder name, e.g. "P001".
        size: square side of the crops.
        cache_dir: folder for ``ctmd_<case>_<size>_s11crop.npz`` (the crops, computed once, then read), or None.
            The name carries the crop rule (session 11's scale-consistent lung crops), so a cache of the older crops
            is not read. The labels are not cached: they are read from ``labels.json`` each time
            (:func:`training.ctmd.slice_labels`).

    Returns:
        ``{"images": [N, 1, size, size] uint8, "z": [N] int64, "labels": [N] uint8}`` for the N slices with lung;
        ``labels`` is 1 where a radiologist marked infection.
    """
    data = Path(data)
    labels = slice_labels(json.loads((data / "labels.json").read_text())[case]).astype(np.uint8)
    cache = None if cache_dir is None else Path(cache_dir) / f"ctmd_{case}_{size}_s11crop.npz"
    if cache is not None and cache.exists():
        with np.load(cache) as saved:
            return {"images": saved["images"], "z": saved["z"], "labels": labels[saved["z"]]}
    from covfast.io import load_volume
    from covfast.pipeline.infection import lung_slices, slice_view
    from covfast.pipeline.lung import lung_mask

    volume = load_volume(data / case)
    lung = lung_mask(volume.hu, volume.spacing_mm)
    work = lung_slices(lung)
    images = []
    for z, crop in work:
        view = torch.from_numpy(slice_view(volume.hu, z, crop))[None, None].float() / 255.0
        # Same resampling as covfast.nn.preprocess.to_input; stored back as 8-bit like the other training slices.
        resized = F.interpolate(view, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        images.append((resized[0] * 255).round().clamp(0, 255).to(torch.uint8).numpy())
    zs = np.array([z for z, _ in work], np.int64)
    result = {"images": np.stack(images), "z": zs, "labels": labels[zs]}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, images=result["images"], z=zs)
    return result


def clean_slices(z: np.ndarray, labels: np.ndarray, gap: int) -> np.ndarray:
    """[N] bool: slices labelled 0 that lie more than ``gap`` slices from every slice labelled 1.

    Args:
        z: [N] int slice indices.
        labels: [N] per-slice labels (1 = infection marked).
        gap: slices kept clear on each side of a labelled slice.
    """
    positive_z = z[labels == 1]
    distance = np.abs(z[:, None] - positive_z[None, :]).min(axis=1, initial=np.iinfo(np.int64).max)
    return (labels == 0) & (distance > gap)


def load_negatives(spec: dict, semiseg: str | Path, size: int) -> dict[str, SliceSet]:
    """Negative slice groups named by a recipe's ``"negatives"`` entry.

    Args:
        spec: ``{"ctmd": {"data": DIR, "cases": [...], "cache": DIR, "gap": G}, "pseudo_max_fraction": F}``;
            either key may be left out. ``gap`` drops label-0 slices within G slices of a labelled one: slice
            labels are per slice, and lesions fade in over neighbouring slices. ``pseudo_max_fraction`` keeps the unlabelled slices whose pseudo label (> 0.5) covers at
            most that fraction of the slice.
        semiseg: root laid out like ``infnet-semiseg``.
        size: square side of the slices.

    Returns:
        ``{"ctmd": SliceSet, "pseudo": SliceSet}`` (present keys only), targets [N, 1, S, S] uint8 on the soft
        0..255 scale (zeros for the COVID-CT-MD negatives).
    """
    groups = {}
    if "ctmd" in spec:
        ctmd = spec["ctmd"]
        names, images = [], []
        for case in ctmd["cases"]:
            crops = ctmd_crops(ctmd["data"], case, size, ctmd.get("cache"))
            keep = clean_slices(crops["z"], crops["labels"], ctmd.get("gap", 0))
            names += [f"{case}_z{z}" for z in crops["z"][keep]]
            images.append(torch.from_numpy(crops["images"][keep]))
        images = torch.cat(images)
        groups["ctmd"] = SliceSet(names, images, torch.zeros_like(images))
    if "pseudo_max_fraction" in spec:
        pseudo = load_unlabelled(semiseg, size)
        fraction = (pseudo.targets > 127).float().mean(dim=(1, 2, 3))
        groups["pseudo"] = pseudo.subset(torch.nonzero(fraction <= spec["pseudo_max_fraction"])[:, 0].tolist())
    return groups
