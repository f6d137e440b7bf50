"""Affinity classification head of the one-shot COVID-19 / common pneumonia / normal model (Ter-Sarkisov, "One Shot
Model For The Prediction of COVID-19 and Lesions Segmentation In Chest CT Scans Through The Affinity Among Lesion
Mask Features").

Per slice, beta RoIs (lesion instances, highest score first; fewer are padded by repeating them cyclically) are
pooled by ``covfast.ops.roi_align`` into features X_roi [beta, C_in, 28, 28]. Then, as in the paper:

1. refinement, N = 3 blocks of Conv 3x3 -> BatchNorm -> ReLU -> ConvTranspose 3x3 (stride 1, so 28 x 28 is kept);
2. vectorisation by three convolutions to 1 x 1: 28 -> 7 (4x4, stride 4) -> 3 (3x3, stride 2) -> 1 (3x3), giving
   X [beta, C] (one C-vector per RoI);
3. the affinity layer z = (W^T X)^T v with the learned affinity matrix W [beta, C*] and vector v [C*]
   (``covfast.ops.affinity``), z [C];
4. two fully connected layers -> 3 logits (covid, pneumonia, normal), trained with per-class binary cross-entropy.

Where this differs from the paper and why: the RoI features come from the shared backbone of the segmentation
network (see :mod:`covfast.pipeline.diagnosis`), the first refinement convolution reduces C_in to a few channels
(``ch``) to keep the head cheap on a CPU.

Classification branch with its own feature stages (``features`` set): the head then owns a copy of the first
backbone stages (stem + two stages of :class:`covfast.nn.backbone.ResNetBackbone`, the layers the RoI features are
taken from). Training (``training/affinity.py``, recipes with a ``"joint"`` block) alternates a segmentation stage of
the Inf-Net with a classification stage and copies the segmentation weights into these stages before each
classification stage, as the paper does for its classification branch; the classification loss then adapts them.
With ``preprocess="paper"`` these stages read the paper's input instead of covfast's: the view's raw Hounsfield units
standardised by one global mean and standard deviation (``input_mean``, ``input_std``, measured on the training
views), no lung window.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from covfast import ops
from covfast.nn.backbone import ResNetBackbone

CLASSES = ("covid", "pneumonia", "normal")
ROI_SIZE = 28
AFFINITY_DIMS = (8, 16, 32, 64)
PREPROCESS = ("covfast", "paper")
# The backbone layers the RoI features come from (stride 8): stem, stage 0 (stride 4), stage 1 (stride 8).
FEATURE_PREFIXES = ("stem.", "stages.0.", "stages.1.")


def _refinement(in_ch: int, ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(ch),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(ch, ch, 3, padding=1),
    )


class AffinityHead(nn.Module):
    """RoI features of a slice -> 3 class logits through the affinity among its RoIs.

    Args:
        in_ch: C_in, channels of the pooled RoI features.
        ch: channels inside the refinement blocks.
        feature_dim: C, length of each RoI's vector after vectorisation.
        affinity_dim: C*, columns of the affinity matrix W (one of 8, 16, 32, 64).
        beta: RoIs per slice.
        hidden: width of the first fully connected layer.
        n_blocks: refinement blocks N.
        features: widths of the head's own feature stages (e.g. ``[32, 64]``, the Inf-Net backbone's first two),
            or None to pool from the segmentation network's backbone.
        preprocess: "covfast" (the Inf-Net's standardised lung-window view) or "paper" (raw HU standardised by
            ``input_mean`` / ``input_std``); "paper" needs ``features``.
        input_mean: global mean in HU of the training views ("paper").
        input_std: global standard deviation in HU of the training views ("paper").
    """

    def __init__(
        self,
        in_ch: int = 65,
        ch: int = 16,
        feature_dim: int = 64,
        affinity_dim: int = 16,
        beta: int = 8,
        hidden: int = 64,
        n_blocks: int = 3,
        features: list[int] | None = None,
        preprocess: str = "covfast",
        input_mean: float | None = None,
        input_std: float | None = None,
    ):
        super().__init__()
        if affinity_dim not in AFFINITY_DIMS:
            raise ValueError(f"affinity_dim (C*) must be one of {AFFINITY_DIMS}; got {affinity_dim}")
        if preprocess not in PREPROCESS:
            raise ValueError(f"preprocess must be one of {PREPROCESS}; got {preprocess!r}")
        if preprocess == "paper" and features is None:
            raise ValueError("preprocess 'paper' needs the head's own feature stages (features=[...])")
        if features is not None and len(features) != 2:
            raise ValueError(f"features: widths of the stem's and the two stages' outputs, two values; got {features}")
        self.beta = beta
        self.preprocess = preprocess
        self.input_mean = input_mean
        self.input_std = input_std
        # Same module names as the Inf-Net backbone's first layers, so its weights copy over by name.
        self.features = None if features is None else ResNetBackbone(1, tuple(features))
        self.refine = nn.Sequential(*(_refinement(in_ch if i == 0 else ch, ch) for i in range(n_blocks)))
        self.vectorise = nn.Sequential(
            nn.Conv2d(ch, feature_dim, 4, stride=4, bias=False),
            nn.BatchNorm2d(feature_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(feature_dim, feature_dim, 3, stride=2, bias=False),
            nn.BatchNorm2d(feature_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(feature_dim, feature_dim, 3),
        )
        self.affinity_matrix = nn.Parameter(torch.randn(beta, affinity_dim) / beta**0.5)
        self.affinity_vector = nn.Parameter(torch.randn(affinity_dim) / affinity_dim**0.5)
        self.classify = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 3))

    def forward(self, roi_features: torch.Tensor) -> torch.Tensor:
        """roi_features: [N, beta, C_in, 28, 28] float32 -> logits [N, 3] (order of :data:`CLASSES`)."""
        n, beta = roi_features.shape[:2]
        if beta != self.beta:
            raise ValueError(f"expected {self.beta} RoIs per slice, got {beta}")
        x = self.vectorise(self.refine(roi_features.flatten(0, 1)))
        x = x.reshape(n, beta, -1)
        z = ops.affinity(x, self.affinity_matrix, self.affinity_vector)
        return self.classify(z)

    def feature_input(self, x: torch.Tensor, hu_view: torch.Tensor | None) -> torch.Tensor:
        """Input of the head's own feature stages: ``x`` (covfast's standardised view) or, for "paper", the view's
        HU ([N, 1, S, S] on the same grid) standardised by the global mean and standard deviation."""
        if self.preprocess == "covfast":
            return x
        if hu_view is None or self.input_mean is None or self.input_std is None:
            raise ValueError("preprocess 'paper' needs the HU view and input_mean / input_std")
        return (hu_view - self.input_mean) / self.input_std

    def copy_features(self, backbone: nn.Module) -> None:
        """The weight copy: load the segmentation backbone's stem and first two stages into the head's own stages."""
        if self.features is None:
            raise ValueError("this head pools from the segmentation backbone; it has no feature stages to copy into")
        state = {k: v for k, v in backbone.state_dict().items() if k.startswith(FEATURE_PREFIXES)}
        self.features.load_state_dict(state)


def select_rois(boxes: list[tuple[float, float, float, float]], fallback: list[tuple], beta: int = 8) -> list[tuple]:
    """Exactly ``beta`` boxes: the first ``beta`` of ``boxes`` (or ``fallback`` when empty), padded cyclically.

    Args:
        boxes: lesion boxes (x1, y1, x2, y2), highest score first.
        fallback: boxes used when the slice has no lesion instance.
        beta: RoIs per slice.
    """
    chosen = list(boxes[:beta]) or list(fallback)
    return [chosen[i % len(chosen)] for i in range(beta)]


def pool_rois(features: torch.Tensor, rois: list[list[tuple]], spatial_scale: float) -> torch.Tensor:
    """RoIAlign ``beta`` boxes per image into [B, beta, C, 28, 28].

    Args:
        features: [B, C, h, w] float32 feature maps.
        rois: per image, ``beta`` boxes (x1, y1, x2, y2) in input pixels.
        spatial_scale: feature pixels per input pixel.
    """
    table = [(float(b), *map(float, box)) for b, boxes in enumerate(rois) for box in boxes]
    # Padding repeats boxes: each distinct (image, box) is pooled once and written to every slot that repeats it.
    unique = list(dict.fromkeys(table))
    where = {row: i for i, row in enumerate(unique)}
    distinct = torch.tensor(unique, dtype=features.dtype, device=features.device).reshape(-1, 5)
    slot_roi = torch.tensor([where[row] for row in table], dtype=torch.long, device=features.device)
    pooled = ops.roi_align_slots(features, distinct, slot_roi, ROI_SIZE, spatial_scale, sampling_ratio=2, aligned=True)
    return pooled.reshape(len(rois), -1, *pooled.shape[1:])


def load_head(path: str | Path, device: str | torch.device = "cpu") -> AffinityHead:
    """Rebuild an :class:`AffinityHead` saved by ``covfast.nn.save_model(model, path, "affinity", config)``; eval mode on ``device``."""
    from covfast.nn.io import read_architecture

    arch, config = read_architecture(path)
    if arch != "affinity":
        raise ValueError(f"{path}: holds a {arch!r} model, not an affinity head")
    model = AffinityHead(**config)
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()
