"""Diagnosis stage: lesion instances and COVID-19 / common pneumonia / normal classes per slice and per volume.

Design (issue 5). The paper builds a Mask R-CNN (ResNet18 + FPN, RPN, RoIAlign, box / class / mask heads) and
feeds the mask features of its top RoIs to the affinity head. Here the lesion proposals are the instances of the
shipped Inf-Net instead (:func:`covfast.instances.extract_instances` on its probability), and the RoI features are
pooled from the Inf-Net's own backbone, because:

* accuracy: the only lesion masks we have are the 50 labelled slices on which the Inf-Net was already trained
  (with deep supervision and self-supervised pretraining); a second detector trained from scratch on the same 50
  slices has less to learn from per head (RPN, box, class and mask heads), and its instances would disagree with
  the infection mask that the report quantifies;
* speed: the shared path adds only the first two backbone stages (about 0.44 G multiply-adds per 256 x 256 slice)
  and the head, where a Mask R-CNN would add a second full network per slice on a CPU.

RoI features: stage-2 backbone features (64 channels, stride 8) with the infection probability (average-pooled to
stride 8) as a 65th channel, so each RoI carries the lesion's mask as the paper's mask features do; pooled to
28 x 28 by ``covfast.ops.roi_align``. Slices are the infection stage's input views (lung window, lung crop,
transpose, 256 x 256: :func:`slice_view`), and the probability channel and the instances come from the Inf-Net's
output on that view, handed over by the infection stage, so training and inference see the same inputs. A slice
with no lesion instance uses whole-lung RoIs: the crop and its two halves along the left-right axis (one per lung).

A head trained with the paper's alternating schedule (``python -m training.affinity`` with a "joint" recipe) owns
its copy of the two feature stages (:attr:`AffinityHead.features`), initialised from the segmentation branch and then
trained with the classification loss; its RoIs are pooled from those stages instead of the Inf-Net's, and a head
with ``preprocess="paper"`` takes the view in raw Hounsfield units normalised by the training set's mean and
standard deviation (the paper's input) instead of the 8-bit lung window. Instances and the probability channel still
come from the shipped Inf-Net.

Cascade (:data:`CASCADE_RULE`, what :func:`diagnose` reports). Whether a slice or a volume is abnormal is decided by
the infection segmentation, as in a cascaded pipeline (lung, lesions, then their class). The head's own "normal" class
was learned from the infection-free slices of two patients; left out of its training, the normal patient was called
COVID-19 (``training/RESULTS.md``), while the segmentation was trained on pixel-level infection masks and marks 4.7 mL
on that patient, against 124 mL and 208 mL on the COVID-19 and pneumonia patients. Per slice, with A the infected
area inside the lung (the reduction's, after small components are dropped) and A0 the COVID-positive slice rule's
``min_lesion_area_mm2`` (100 mm^2): p(abnormal) = A / (A + A0), so a slice is more likely abnormal than normal exactly
when it is COVID-positive; p(covid) = p(abnormal) * s and p(pneumonia) = p(abnormal) * (1 - s). The volume is normal
when its infected volume is below :data:`MIN_INFECTED_ML` (10 mL: the 5th percentile of the 50 radiologist masks of
mild (CT-1) COVID-19 in ``mosmed-masks`` is 10.6 mL, their median 66 mL), else the larger of mean p(covid) and mean
p(pneumonia) over the COVID-positive slices. ``probs`` are the means over the slices that decided (the COVID-positive
slices, or all lung slices for a normal volume).

Which kind, s (since session 13): the pipeline passes the infection's peripheral predominance,
s = OR / (1 + OR) with OR the odds ratio of an infected voxel lying in the outer third of its lung against a lung
voxel (:func:`pattern_share`, :mod:`covfast.pipeline.distribution`), the same s for every slice of the scan:
COVID-19 pneumonia is typically peripheral, other pneumonias less so (the RSNA consensus statement's "typical"
pattern). Until session 13 s was the head's own p(covid) / (p(covid) + p(pneumonia)) per slice, and it is still used
when no ``kind_share`` is given. On the three COVID-CT-MD patients the head's split separated the COVID-19 and the
pneumonia patient's infected slices no better than chance (AUC 0.19-0.64 over the training seeds of sessions 12 and
13), and its volume calls changed with the training seed; the peripheral odds ratio, which has no parameter fitted to
them, put P001 at 1.53 and cap001 at 0.90, and 14 of 18 other COVID-19 patients (Zenodo, Semi-Inf-Net's masks) at
1 or above (``training/RESULTS.md``, "Session 13"). The head's probabilities stay in the report per slice
(``head_probs``).

Head-only rule (:data:`RULE`, :func:`aggregate`; how the head alone is scored in training): slice class
probabilities are the head's per-class sigmoids normalised to sum 1; a lung slice is abnormal when its normal
probability is below 0.5; if fewer than ``max(3, 10 % of the lung slices)`` slices are abnormal the volume is normal,
otherwise the label is the larger of the mean covid and mean pneumonia probability over the abnormal slices.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from covfast.errors import ModelNotInstalledError
from covfast.instances import PROB_THRESHOLD, extract_instances
from covfast.nn.affinity import CLASSES, pool_rois, select_rois
from covfast.pipeline.infection import WEIGHTS_DIR, lung_crop, window_hu
from covfast.pipeline.morphology import bounding_box

MODEL_NAME = "affinity"
FEATURE_STRIDE = 8
MIN_ABNORMAL_SLICES = 3
MIN_ABNORMAL_FRACTION = 0.10
MIN_LESION_ML = 0.01
RULE = (
    "slice abnormal when p(normal) < 0.5; volume normal when fewer than max(3, 10% of lung slices) are abnormal, "
    "else argmax of mean p(covid) vs mean p(pneumonia) over the abnormal slices"
)
MIN_INFECTED_ML = 10.0
CASCADE_RULE = (
    "per slice p(abnormal) = A / (A + A0), A the infected area inside the lung, A0 = min_lesion_area_mm2, split into "
    "covid / pneumonia by s = OR / (1 + OR), OR the infection's peripheral odds ratio (report 'distribution': "
    "outer third of each lung), the same s on every slice; volume normal when the infected volume is below "
    f"{MIN_INFECTED_ML:g} mL, else argmax of mean p(covid) vs mean p(pneumonia) over the COVID-positive slices "
    "(A >= A0), i.e. covid when OR >= 1; head_probs: the affinity head's own classes"
)
HEAD_CASCADE_RULE = (
    "per slice p(abnormal) = A / (A + A0), A the infected area inside the lung, A0 = min_lesion_area_mm2, split into "
    "covid / pneumonia by the affinity head's p(covid) / (p(covid) + p(pneumonia)); volume normal when the infected "
    f"volume is below {MIN_INFECTED_ML:g} mL, else argmax of mean p(covid) vs mean p(pneumonia) over the COVID-positive "
    "slices (A >= A0)"
)


def fallback_boxes(size: int) -> list[tuple[float, float, float, float]]:
    """Whole-lung RoIs of a ``size`` x ``size`` view: the crop, then its halves along rows (the left-right axis)."""
    half = size / 2
    return [(0.0, 0.0, float(size), float(size)), (0.0, 0.0, float(size), half), (0.0, half, float(size), float(size))]


def slice_view(
    hu_slice: np.ndarray, lung_slice: np.ndarray, min_size: tuple[int, int] = (0, 0)
) -> tuple[np.ndarray, tuple[slice, slice]] | None:
    """The infection stage's view of one axial slice: lung-windowed 8-bit lung crop, transposed.

    Args:
        hu_slice: [H, W] Hounsfield units, canonical orientation.
        lung_slice: [H, W] lung mask (non-zero = lung).
        min_size: least crop (rows, columns): the volume's :func:`covfast.pipeline.infection.crop_min_size`, as the
            infection stage crops.

    Returns:
        (view [W', H'] uint8, (rows, cols) crop in the slice), or None for a slice without lung.
    """
    crop = lung_crop(lung_slice > 0, min_size)
    if crop is None:
        return None
    rows, cols = crop
    return np.ascontiguousarray(window_hu(hu_slice[rows, cols]).T), crop


class RoiFeatures:
    """Backbone of the shipped single-class Inf-Net, cut after stage 2, and RoI pooling for the affinity head.

    Args:
        backbone: the Inf-Net's :class:`covfast.nn.backbone.ResNetBackbone`.
        beta: RoIs per slice.
        device: torch device.
    """

    def __init__(self, backbone: torch.nn.Module, beta: int = 8, device: str = "cpu"):
        self.backbone = backbone.to(device).eval()
        self.beta = beta
        self.device = device

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1, S, S] standardised views -> the backbone's stride-8 features [N, F, S/8, S/8] (the Inf-Net's f2)."""
        with torch.no_grad():
            return stride8_features(self.backbone, x.to(self.device))

    @torch.no_grad()
    def __call__(
        self, x: torch.Tensor | None, prob: torch.Tensor, features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Pooled RoI features of a batch of views.

        Args:
            x: [N, 1, S, S] float32 standardised views (:func:`covfast.nn.preprocess.to_input`); may be None when
                ``features`` is given.
            prob: [N, 1, S, S] float32 infection probability on the same grid.
            features: [N, F, S/8, S/8] backbone features of the views when already computed (the infection stage's
                :attr:`~covfast.pipeline.infection.InfectionResult.view_features`), else computed from ``x``.

        Returns:
            (RoI features [N, beta, 65, 28, 28] float32, lesion instance count per view).
        """
        prob = prob.to(self.device)
        feats = self.backbone_features(x) if features is None else features.to(self.device, torch.float32)
        rois, counts = self.select(prob)
        return pool_view_rois(feats, prob, rois), counts

    def select(self, prob: torch.Tensor) -> tuple[list[list[tuple]], list[int]]:
        """The ``beta`` RoIs of each view (lesion instances of ``prob`` [N, 1, S, S], else whole-lung boxes) and
        the lesion instance count per view."""
        size = prob.shape[-1]
        rois, counts = [], []
        for view_prob in prob[:, 0].cpu().numpy():
            found = extract_instances(view_prob)
            counts.append(len(found))
            rois.append(select_rois([inst.box for inst in found], fallback_boxes(size), self.beta))
        return rois, counts


def stride8_features(backbone: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Stem and first two stages of a :class:`covfast.nn.backbone.ResNetBackbone` (the Inf-Net's, or an affinity
    head's own copy): [N, 1, S, S] -> [N, F, S/8, S/8]."""
    return backbone.stages[1](backbone.stages[0](backbone.stem(x)))


def pool_view_rois(features: torch.Tensor, prob: torch.Tensor, rois: list[list[tuple]]) -> torch.Tensor:
    """RoI features [N, beta, F + 1, 28, 28]: the stride-8 features [N, F, S/8, S/8] with the probability
    [N, 1, S, S] average-pooled to the same grid as channel F + 1, pooled at ``rois`` (per view, view pixels)."""
    maps = torch.cat([features, F.avg_pool2d(prob, FEATURE_STRIDE)], dim=1)
    return pool_rois(maps, rois, 1.0 / FEATURE_STRIDE)


def hu_view(hu_slice: np.ndarray, crop: tuple[slice, slice], size: int) -> torch.Tensor:
    """The view's geometry (lung crop, transposed, ``size`` x ``size``) in raw Hounsfield units: [1, 1, size, size]
    float32, resized as :func:`covfast.nn.preprocess.to_input` resizes (input of a "paper"-preprocessed head)."""
    rows, cols = crop
    x = torch.from_numpy(np.ascontiguousarray(hu_slice[rows, cols].T, dtype=np.float32))[None, None]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def class_probs(logits: torch.Tensor) -> np.ndarray:
    """[N, 3] logits -> [N, 3] float64 per-class sigmoids normalised to sum 1 (order of ``CLASSES``)."""
    sig = torch.sigmoid(logits.double()).cpu().numpy()
    return sig / sig.sum(axis=1, keepdims=True)


def aggregate(slice_probs: np.ndarray) -> dict:
    """Volume diagnosis from the lung slices' class probabilities by :data:`RULE`.

    Args:
        slice_probs: [N, 3] float class probabilities of the lung slices (order of ``CLASSES``).

    Returns:
        ``{"label", "probs": {class: p}, "rule", "abnormal_slices"}``; label and probs None without lung slices.
    """
    if not len(slice_probs):
        return {"label": None, "probs": None, "rule": RULE, "abnormal_slices": 0}
    abnormal = slice_probs[:, CLASSES.index("normal")] < 0.5
    needed = max(MIN_ABNORMAL_SLICES, int(np.ceil(MIN_ABNORMAL_FRACTION * len(slice_probs))))
    return _volume_call(slice_probs, abnormal, abnormal.sum() >= needed, RULE)


def _volume_call(slice_probs: np.ndarray, abnormal: np.ndarray, is_abnormal: bool, rule: str) -> dict:
    """The volume's label and mean probabilities: normal over all slices, else covid vs pneumonia by the larger
    mean over the ``abnormal`` slices."""
    deciding = slice_probs[abnormal] if is_abnormal else slice_probs
    mean = deciding.mean(axis=0)
    label = "normal"
    if is_abnormal:
        label = "covid" if mean[CLASSES.index("covid")] >= mean[CLASSES.index("pneumonia")] else "pneumonia"
    return {
        "label": label,
        "probs": {name: float(mean[i]) for i, name in enumerate(CLASSES)},
        "rule": rule,
        "abnormal_slices": int(abnormal.sum()),
    }


def slice_label(probs) -> str:
    """A slice's class under the cascade's own order of decisions: normal unless p(normal) < 0.5 (exactly the
    COVID-positive slices), else the larger of covid and pneumonia. The plain argmax of the three can say normal on a
    positive slice whose abnormal mass is split between the two kinds."""
    covid, pneumonia, normal = (float(probs[CLASSES.index(c)]) for c in ("covid", "pneumonia", "normal"))
    if normal > 0.5:
        return "normal"
    return "covid" if covid >= pneumonia else "pneumonia"


def pattern_share(distribution: dict | None) -> float | None:
    """The covid share s = OR / (1 + OR) of the infection's peripheral odds ratio
    (:func:`covfast.pipeline.distribution.lesion_distribution`); None when it has none."""
    ratio = (distribution or {}).get("peripheral_odds_ratio")
    return None if ratio is None else float(ratio) / (1.0 + float(ratio))


def cascade_probs(
    head_probs: np.ndarray, infected_area_mm2: np.ndarray, area_mm2: float, kind_share: float | None = None
) -> np.ndarray:
    """Slice class probabilities of the cascade (:data:`CASCADE_RULE`).

    Args:
        head_probs: [N, 3] the affinity head's class probabilities (order of ``CLASSES``).
        infected_area_mm2: [N] infected area inside the lung of each slice.
        area_mm2: A0, the COVID-positive slice rule's area (p(abnormal) = 0.5 there).
        kind_share: when given, every slice's covid share of p(abnormal) (e.g. :func:`pattern_share`) instead of
            the head's p(covid) / (p(covid) + p(pneumonia)).

    Returns:
        [N, 3] float64, rows summing to 1.
    """
    if area_mm2 <= 0:
        raise ValueError(f"area_mm2 must be positive, got {area_mm2}")
    head = np.asarray(head_probs, dtype=np.float64).reshape(-1, 3)
    area = np.clip(np.asarray(infected_area_mm2, dtype=np.float64).reshape(-1), 0.0, None)
    if len(area) != len(head):
        raise ValueError(f"{len(head)} slices of head probabilities but {len(area)} infected areas")
    covid, pneumonia, normal = (CLASSES.index(c) for c in ("covid", "pneumonia", "normal"))
    abnormal = area / (area + area_mm2)
    if kind_share is not None:
        if not 0.0 <= kind_share <= 1.0:
            raise ValueError(f"kind_share must lie in [0, 1], got {kind_share}")
        share = np.full(len(head), float(kind_share))
    else:
        lesion = head[:, covid] + head[:, pneumonia]
        share = np.divide(head[:, covid], lesion, out=np.full(len(head), 0.5), where=lesion > 0)
    out = np.empty_like(head)
    out[:, covid] = abnormal * share
    out[:, pneumonia] = abnormal * (1.0 - share)
    out[:, normal] = 1.0 - abnormal
    return out


def aggregate_cascade(
    slice_probs: np.ndarray,
    infected_area_mm2: np.ndarray,
    infected_ml: float,
    area_mm2: float,
    min_infected_ml: float = MIN_INFECTED_ML,
    rule: str = CASCADE_RULE,
) -> dict:
    """Volume diagnosis of the cascade (:data:`CASCADE_RULE`) from :func:`cascade_probs` of the lung slices.

    Args:
        slice_probs: [N, 3] cascade class probabilities of the lung slices.
        infected_area_mm2: [N] their infected areas.
        infected_ml: infected volume of the whole scan.
        area_mm2: A0, the COVID-positive slice rule's area.
        min_infected_ml: below this infected volume the scan is normal.
        rule: the rule text recorded (:data:`HEAD_CASCADE_RULE` when the head's split made ``slice_probs``).

    Returns:
        ``{"label", "probs": {class: p}, "rule", "abnormal_slices"}`` (abnormal = COVID-positive slices); label and
        probs None without lung slices.
    """
    slice_probs = np.asarray(slice_probs, dtype=np.float64).reshape(-1, 3)
    positive = np.asarray(infected_area_mm2, dtype=np.float64).reshape(-1) >= area_mm2
    if not len(slice_probs):
        return {"label": None, "probs": None, "rule": rule, "abnormal_slices": 0}
    return _volume_call(slice_probs, positive, infected_ml >= min_infected_ml and bool(positive.any()), rule)


def lesion_volumes(infection_prob: np.ndarray, lung: np.ndarray, spacing_mm) -> list[float]:
    """Volumes in mL of the 3D lesions (26-connected components of ``prob >= 0.5`` inside the lung), largest first;
    components under :data:`MIN_LESION_ML` are dropped."""
    import cc3d

    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    mask = (infection_prob >= PROB_THRESHOLD) & (lung > 0)
    if not mask.any():
        return []
    # Label only the lesions' bounding box: the same components, a smaller array to label and count.
    box = bounding_box(mask)
    inside = np.ascontiguousarray(mask[box])
    labels = cc3d.connected_components(inside, connectivity=26)
    sizes = np.bincount(labels[inside].astype(np.intp))[1:] * voxel_ml  # counted on the lesion voxels only
    return sorted((float(v) for v in sizes if v >= MIN_LESION_ML), reverse=True)


def load_affinity(device: str = "cpu", weights_dir: str | Path = WEIGHTS_DIR):
    """The installed affinity head and its model card, with the SHA-256 checked.

    Raises:
        ModelNotInstalledError: no affinity weights, or a file whose hash differs from its card.
    """
    from covfast.nn import sha256_file
    from covfast.nn.affinity import load_head

    weights = Path(weights_dir) / f"{MODEL_NAME}.safetensors"
    card_path = weights.with_suffix(".json")
    if not weights.exists() or not card_path.exists():
        raise ModelNotInstalledError(f"no affinity model installed in {weights_dir} (expected {weights.name})")
    card = json.loads(card_path.read_text())
    if sha256_file(weights) != card["sha256"]:
        raise ModelNotInstalledError(f"{weights}: SHA-256 differs from its model card; reinstall covfast")
    return load_head(weights, device), card


def _affinity_key(weights_dir) -> str | None:
    """The installed affinity card's text (None without one): a new or edited head loads afresh."""
    card_path = Path(weights_dir) / f"{MODEL_NAME}.json"
    return card_path.read_text() if card_path.exists() else None


@functools.lru_cache(maxsize=2)
def _loaded_models(device: str, weights_dir: str, cards_key: tuple, affinity_key: str | None) -> tuple:
    """(the Inf-Net's LoadedModel, the affinity head, its card), read and hash-checked once per process and set of
    installed weights (the keys): ``covfast infer`` over many volumes, or ``covfast benchmark``, reuses them."""
    from covfast.pipeline.infection import SINGLE_CLASS, load_models

    del cards_key, affinity_key
    infnet = load_models(device, multiclass=False, weights_dir=weights_dir)[SINGLE_CLASS]
    head, card = load_affinity(device, weights_dir)
    return infnet, head, card


def diagnose(
    hu: np.ndarray,
    lung: np.ndarray,
    infection_prob: np.ndarray,
    spacing_mm,
    device: str = "cpu",
    batch_size: int = 16,
    weights_dir: str | Path = WEIGHTS_DIR,
    view_prob: dict[int, np.ndarray] | None = None,
    view_features: dict[int, torch.Tensor] | None = None,
    infected_area_mm2: np.ndarray | None = None,
    area_mm2: float | None = None,
    kind_share: float | None = None,
) -> dict:
    """Per-slice class probabilities, lesion instances and the volume diagnosis of a CT volume.

    Args:
        hu: [D, H, W] int16 Hounsfield units, canonical orientation.
        lung: [D, H, W] uint8 lung mask.
        infection_prob: [D, H, W] float32 single-class infection probability from the infection stage.
        spacing_mm: (dz, dy, dx) voxel spacing in mm (for lesion volumes).
        device: torch device.
        batch_size: slices per forward pass.
        weights_dir: folder of installed weights (the Inf-Net's backbone and the affinity head).
        view_prob: ``{z: [S, S] float32}``, the Inf-Net's probability on each lung slice's view as the infection
            stage computed it (:attr:`covfast.pipeline.infection.InfectionResult.view_prob`): exactly the input the
            head was trained with. Slices missing from it use ``infection_prob`` (zeroed outside the lung by the
            pipeline) resampled onto the view grid, an approximation of it.
        view_features: ``{z: [F, S/8, S/8]}``, the Inf-Net's backbone features of each view from the infection stage
            (:attr:`covfast.pipeline.infection.InfectionResult.view_features`); batches whose slices all have them
            skip the backbone.
        infected_area_mm2: [D] infected area inside the lung per slice as the report counts it (the pipeline
            passes the reduction's); default: ``infection_prob > 0.5`` inside the lung.
        area_mm2: A0 of the cascade, the COVID-positive slice area (default: the severity rules').
        kind_share: the covid share s of every slice's p(abnormal) (the pipeline passes :func:`pattern_share` of
            the report's ``distribution``); None: the head's own split per slice (:data:`HEAD_CASCADE_RULE`).

    Returns:
        ``{"slices": [{"index", "class_probs": {covid, pneumonia, normal}, "class", "head_probs", "lesions"}], "lesions":
        {"count", "volumes_ml"}, "diagnosis": {"label", "probs", "rule", "abnormal_slices"}, "models",
        "timings_s"}``; ``slices`` lists only slices with lung, ``class_probs`` are the cascade's
        (:func:`cascade_probs`), ``head_probs`` the affinity head's alone, ``lesions`` per slice counts the 2D
        instances on the view.

    Raises:
        ModelNotInstalledError: no Inf-Net or no affinity weights installed, or a head trained on another Inf-Net.
        ValueError: the arrays are not 3D of one shape.
    """
    from covfast.nn.preprocess import INPUT_SIZE, to_input
    from covfast.pipeline.infection import SINGLE_CLASS, _cards_key, lung_slices
    from covfast.pipeline.infection import slice_view as stage_view
    from covfast.pipeline.severity import DEFAULT_RULES, PROBABILITY_THRESHOLD

    if hu.ndim != 3 or hu.shape != lung.shape or hu.shape != infection_prob.shape:
        raise ValueError(
            f"hu, lung and infection_prob must be [D, H, W] of one shape; got {hu.shape}, {lung.shape}, "
            f"{infection_prob.shape}"
        )
    area_mm2 = DEFAULT_RULES.min_lesion_area_mm2 if area_mm2 is None else float(area_mm2)
    if infected_area_mm2 is None:
        pixels = ((infection_prob > PROBABILITY_THRESHOLD) & (lung > 0)).sum(axis=(1, 2))
        infected_area_mm2 = pixels * float(spacing_mm[1]) * float(spacing_mm[2])
    infected_area_mm2 = np.asarray(infected_area_mm2, dtype=np.float64)
    if infected_area_mm2.shape != (hu.shape[0],):
        raise ValueError(f"infected_area_mm2 must have one value per slice ({hu.shape[0]}), got {infected_area_mm2.shape}")
    t0 = time.perf_counter()
    infnet, head, card = _loaded_models(device, str(weights_dir), _cards_key(weights_dir), _affinity_key(weights_dir))
    trained_on = card.get("backbone", {}).get("sha256")
    if trained_on != infnet.card["sha256"]:
        raise ModelNotInstalledError(
            f"the affinity head was trained on the features of infnet {trained_on}, but infnet "
            f"{infnet.card['sha256']} is installed; retrain it (python -m training.affinity, see its model card)"
        )
    # A head with its own feature stages (the classification branch) pools from those, not the Inf-Net's backbone.
    own = head.features is not None
    extractor = RoiFeatures(head.features if own else infnet.model.backbone, head.beta, device)
    timings = {"load": time.perf_counter() - t0}
    t0 = time.perf_counter()
    work = lung_slices(lung)
    slices = []
    for start in range(0, len(work), batch_size):
        chunk = work[start : start + batch_size]
        prob = torch.cat(
            [
                torch.from_numpy(np.ascontiguousarray(view_prob[z], dtype=np.float32))[None, None]
                if view_prob is not None and z in view_prob
                else to_view_grid(infection_prob[z, rows, cols].T, INPUT_SIZE)
                for z, (rows, cols) in chunk
            ]
        )
        if not own and view_features and all(z in view_features for z, _ in chunk):
            rois, counts = extractor(None, prob, torch.stack([view_features[z] for z, _ in chunk]))
        else:
            views = [stage_view(hu, z, crop) for z, crop in chunk]
            x = torch.cat([to_input(torch.from_numpy(v)[None, None]) for v in views])
            if own and head.preprocess == "paper":
                x = head.feature_input(x, torch.cat([hu_view(hu[z], crop, INPUT_SIZE) for z, crop in chunk]))
            rois, counts = extractor(x, prob)
        with torch.no_grad():
            head_probs = class_probs(head(rois.to(device)))
        areas = infected_area_mm2[[z for z, _ in chunk]]
        cascade = cascade_probs(head_probs, areas, area_mm2, kind_share)
        for (z, _), p, q, n in zip(chunk, cascade, head_probs, counts):
            slices.append(
                {
                    "index": int(z),
                    "class_probs": dict(zip(CLASSES, map(float, p))),
                    "class": slice_label(p),
                    "head_probs": dict(zip(CLASSES, map(float, q))),
                    "lesions": n,
                }
            )
    timings["classify"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    volumes = lesion_volumes(infection_prob, lung, spacing_mm)
    timings["lesions"] = time.perf_counter() - t0
    table = np.array([[s["class_probs"][c] for c in CLASSES] for s in slices]).reshape(-1, 3)
    lung_areas = infected_area_mm2[[s["index"] for s in slices]]
    infected_ml = float(infected_area_mm2.sum() * float(spacing_mm[0]) / 1000.0)
    return {
        "slices": slices,
        "lesions": {"count": len(volumes), "volumes_ml": volumes},
        "diagnosis": aggregate_cascade(
            table, lung_areas, infected_ml, area_mm2, rule=CASCADE_RULE if kind_share is not None else HEAD_CASCADE_RULE
        ),
        "models": [
            {"name": SINGLE_CLASS, "sha256": infnet.card["sha256"]},
            {"name": MODEL_NAME, "sha256": card["sha256"]},
        ],
        "timings_s": timings,
    }


def to_view_grid(prob_view: np.ndarray, size: int) -> torch.Tensor:
    """[h, w] probability on a view -> [1, 1, size, size] float32 on the network grid (bilinear)."""
    prob = torch.from_numpy(np.ascontiguousarray(prob_view, dtype=np.float32))[None, None]
    return F.interpolate(prob, size=(size, size), mode="bilinear", align_corners=False)
