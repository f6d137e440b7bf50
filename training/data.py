"""COVID-SemiSeg slices as tensors: the 50 doctor-labelled slices (single- and multi-class) and the 1,600
unlabelled slices with their Semi-Inf-Net pseudo labels, plus the cross-validation split.

All slices are resized to a square ``size`` grid (as Inf-Net trains at 352 x 352); the labelled ground truth is
also kept at its native size, where validation metrics are computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

LABELLED = Path("TrainingSet/LungInfection-Train/Doctor-label")
MULTICLASS = Path("TrainingSet/MultiClassInfection-Train")
UNLABELLED = Path("TrainingSet/LungInfection-Train/Pseudo-label")


@dataclass
class SliceSet:
    """Slices of one source.

    Attributes:
        names: file stems.
        images: [N, 1, S, S] uint8 grey slices.
        targets: [N, 1, S, S] uint8: 0/1 infection, 0/1/2 classes, or 0..255 soft pseudo labels.
        native_targets: per slice the target at native size ([H, W] uint8), for validation.
    """

    names: list[str]
    images: torch.Tensor
    targets: torch.Tensor
    native_targets: list[np.ndarray] = field(default_factory=list)

    def subset(self, index) -> SliceSet:
        """The slices at ``index`` (a sequence of ints)."""
        index = list(index)
        natives = [self.native_targets[i] for i in index] if self.native_targets else []
        return SliceSet([self.names[i] for i in index], self.images[index], self.targets[index], natives)


def _sort_key(path: Path):
    return (0, int(path.stem), "") if path.stem.isdigit() else (1, 0, path.stem)


def _load(image_dir: Path, target_dir: Path, size: int, target_kind: str, keep_native: bool) -> SliceSet:
    image_paths = sorted(image_dir.glob("*.jpg"), key=_sort_key)
    if not image_paths:
        raise FileNotFoundError(f"no .jpg slices in {image_dir}")
    names, images, targets, natives = [], [], [], []
    for image_path in image_paths:
        with Image.open(image_path) as im:
            image = im.convert("L")
        with Image.open(target_dir / f"{image_path.stem}.png") as tm:
            target = tm if tm.mode == "P" else tm.convert("L")
            target = np.asarray(target)
        if target_kind == "binary":
            target = (target > 127).astype(np.uint8)
        names.append(image_path.stem)
        images.append(np.asarray(image.resize((size, size), Image.BILINEAR)))
        # Soft pseudo labels resize smoothly; hard labels keep their values.
        resample = Image.BILINEAR if target_kind == "soft" else Image.NEAREST
        targets.append(np.asarray(Image.fromarray(target).resize((size, size), resample)))
        if keep_native:
            natives.append(target)

    def as_tensor(arrays):
        return torch.from_numpy(np.stack(arrays))[:, None].contiguous()

    return SliceSet(names, as_tensor(images), as_tensor(targets), natives)


def load_labelled(root: str | Path, size: int, task: str = "infection") -> SliceSet:
    """The 50 doctor-labelled slices; ``task`` "infection" (0/1) or "multiclass" (0 bg, 1 GGO, 2 consolidation)."""
    root = Path(root)
    if task == "infection":
        return _load(root / LABELLED / "Imgs", root / LABELLED / "GT", size, "binary", True)
    if task == "multiclass":
        return _load(root / MULTICLASS / "Imgs", root / MULTICLASS / "GT", size, "labels", True)
    raise ValueError(f"unknown task {task!r}")


def load_unlabelled(root: str | Path, size: int) -> SliceSet:
    """The 1,600 unlabelled slices with their soft Semi-Inf-Net pseudo labels (0..255), never ground truth."""
    root = Path(root)
    return _load(root / UNLABELLED / "Imgs", root / UNLABELLED / "GT", size, "soft", False)


def cv_folds(n: int, k: int = 5, seed: int = 0) -> list[np.ndarray]:
    """Validation indices of ``k`` folds over ``n`` slices from one seeded permutation.

    The labelled slices carry no patient IDs, so the split is by slice: slices of one patient can sit in
    different folds, which makes these numbers optimistic against a patient-disjoint test set.
    """
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, k)]
