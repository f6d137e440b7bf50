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

With test-time augmentation (``tta``, :data:`TTA_CHOICES`) the networks also run on flipped copies of each batch
and the probabilities are averaged.

Ensemble: when the single-class U-Net (:data:`PARTNER`) is installed, it runs on the same inputs and its probability is
averaged with the Inf-Net's; that mean is the stage's infection probability and the multi-class network's prior. The
diagnosis stage keeps reading the Inf-Net's own probability (``InfectionResult.view_prob``), the input its head was
trained and validated on. Out of fold on the 50 labelled slices the shipped pair's mean scored Dice@0.5 0.718
against the Inf-Net's 0.698 (paired +0.019 [+0.005, +0.033]; training/RESULTS.md, session 8).

The networks run through the inference engines of :mod:`covfast.engine` (TensorRT, torch, onnxruntime), chosen once
per process by :func:`covfast.engine.select_engine`; every engine runs the same probability graph.
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

from covfast.errors import ModelNotInstalledError, UsageError
from covfast.pipeline.morphology import bounding_box, resting_on
from covfast.pipeline.severity import PROBABILITY_THRESHOLD

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
SINGLE_CLASS = "infnet"
PARTNER = "infection_unet"
MULTI_CLASS = "infnet_multiclass"
HU_WINDOW = (-1000.0, 200.0)
CROP_MARGIN = 0.08
# Every slice's crop is at least this fraction of the volume's largest lung extent (rows and columns separately):
# without it the lung apices and bases, small boxes, were magnified to the network's input size several times more
# than the mid-lung slices the training crops resemble, and their noise read as ground glass.
MIN_CROP_FRACTION = 1.0
# The multi-class network labels GGO / consolidation only on slices where the single-class network finds a pixel at
# or above this probability; elsewhere every pixel is background. On the three COVID-CT-MD volumes the skipped
# slices held no multi-class infection voxel (15 of 139, 15 of 154 and 64 of 135 slices skipped), so the masks are
# unchanged and infection-free slices cost one network instead of two.
MULTICLASS_MIN_PROB = 0.5
# Test-time augmentation: the networks also run on flipped copies of each input slice (flips along the given tensor
# dimensions of the network's [N, C, S, S] input; training augmented with both flips) and the probabilities, flipped
# back, are averaged. ``h`` flips the slice's columns, ``hv`` also its rows (three passes per network).
_TTA_FLIPS = {"none": (), "h": ((-1,),), "hv": ((-1,), (-2,))}
TTA_CHOICES = tuple(_TTA_FLIPS)
# Default "h": on the 50 labelled slices (5-fold CV, out-of-fold models of recipe infnet_long) it raised Dice@0.5 on
# every fold, 0.699 -> 0.708 pooled ("hv" 0.714), for one extra pass per network; "hv" would put a P001-sized volume
# over the 15 s CPU budget (training/RESULTS.md, session 4).
DEFAULT_TTA = "h"
# The U-Net partner's own test-time augmentation, whatever ``tta`` is (None: follow ``tta``). One pass: it costs 3.48
# GMAC a slice against the Inf-Net's 1.13, and out of fold its flipped pass added 0.002 Dice to the ensemble
# (training/RESULTS.md, session 8).
PARTNER_TTA: str | None = "none"


@dataclass
class InfectionCounts:
    """Per-slice counts of :func:`covfast.ops.infection_ratio`, taken on the device where the masks were made.

    Attributes:
        lung_voxels: [D, 2] int64 voxels of the right and left lung.
        infected_voxels: [D, 2, 2] int64 infected voxels per lung x class (1, 2) of the infection mask.
        soft_sum: [D, 2] float64 sum of the probability inside each lung.
    """

    lung_voxels: np.ndarray
    infected_voxels: np.ndarray
    soft_sum: np.ndarray


@dataclass
class InfectionResult:
    """Output of :func:`segment_infection`.

    Attributes:
        prob: [D, H, W] float32 single-class infection probability (the ensemble mean when the partner ran), 0 outside
            the lung mask.
        classes: [D, H, W] uint8 (0 background, 1 GGO, 2 consolidation), 0 outside the lung mask, or None without the
            multi-class model.
        models: name and sha256 of each model used.
        timings: seconds per step ("load", "infer").
        engines: per model name, the engine that ran it and those passed over
            (:meth:`covfast.engine.Selection.describe`).
        view_prob: per lung slice index, the Inf-Net's own probability (without the partner) on the network's input
            grid ([S, S] float32, the transposed lung crop of :func:`slice_view` resized to S): what the diagnosis
            stage's affinity head was trained on.
        mask: [D, H, W] uint8 infection mask the counts were taken from: ``classes``, or ``prob >
            PROBABILITY_THRESHOLD`` as 0/1 without the multi-class model.
        counts: per-slice lung and infection counts of ``mask`` and ``prob`` (:class:`InfectionCounts`).
        view_features: per lung slice index, the single-class Inf-Net's stride-8 backbone features on that view
            ([F, S/8, S/8] float32 tensor on the stage's device) when its engine returns them (torch, onnxruntime;
            not TensorRT): the diagnosis stage pools its RoIs from them instead of running the backbone again.
    """

    prob: np.ndarray
    classes: np.ndarray | None
    models: list[dict]
    timings: dict = field(default_factory=dict)
    engines: dict = field(default_factory=dict)
    view_prob: dict = field(default_factory=dict)
    mask: np.ndarray | None = None
    counts: InfectionCounts | None = None
    view_features: dict = field(default_factory=dict)


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


def load_models(device: str = "cpu", multiclass: bool = True, weights_dir: str | Path = WEIGHTS_DIR,
                ensemble: bool = True) -> dict:
    """Load the single-class model (with its U-Net partner if ``ensemble`` and installed, and the multi-class one if
    asked and installed), checking SHA-256.

    Returns:
        ``{name: LoadedModel}`` in the order single-class, partner, multi-class.

    Raises:
        ModelNotInstalledError: no single-class weights, or a file whose hash differs from its card.
    """
    from covfast.nn import load_model

    return {name: LoadedModel(load_model(card["file"], device), card)
            for name, card in _verified_cards(multiclass, weights_dir, ensemble).items()}


def _verified_cards(multiclass: bool, weights_dir: str | Path, ensemble: bool = True) -> dict:
    """Model cards of the single-class model (with the partner if ``ensemble`` and installed, and the multi-class one
    if asked and installed), in that order, after checking each weights file's SHA-256 against its card.

    Raises:
        ModelNotInstalledError: no single-class weights, or a file whose hash differs from its card.
    """
    from covfast.nn import sha256_file

    cards = {card["name"]: card for card in installed_models(weights_dir)}
    if SINGLE_CLASS not in cards:
        raise ModelNotInstalledError(
            f"no infection model installed in {weights_dir} (expected {SINGLE_CLASS}.safetensors)"
        )
    wanted = {PARTNER: ensemble, MULTI_CLASS: multiclass}
    names = [SINGLE_CLASS] + [name for name, use in wanted.items() if use and name in cards]
    for name in names:
        if sha256_file(cards[name]["file"]) != cards[name]["sha256"]:
            raise ModelNotInstalledError(f"{cards[name]['file']}: SHA-256 differs from its model card; reinstall covfast")
    return {name: cards[name] for name in names}


def _cards_key(weights_dir) -> tuple:
    """What identifies the installed weights: each model card's name and SHA-256."""
    return tuple(sorted((card["name"], card["sha256"]) for card in installed_models(weights_dir)))


@functools.lru_cache(maxsize=4)
def _shared_engines(engine: str, device: str, multiclass: bool, weights_dir: str, cache_dir: str,
                    cards_key: tuple, precision: str | None = None, ensemble: bool = True) -> dict:
    """Engines for the installed infection models, chosen and loaded once per process: `covfast infer` over many
    volumes reuses them instead of reading and hashing the weights (and exporting or deserialising engines) for each
    input. ``cards_key`` (see :func:`_cards_key`) makes newly installed weights load afresh.

    Returns:
        ``{name: (Selection, card)}`` in :func:`load_models`' order.

    Raises:
        ModelNotInstalledError: see :func:`load_models`.
        UsageError: an explicitly requested engine is unavailable.
    """
    from covfast.engine import select_engine

    del cards_key
    return {name: (select_engine(engine, card["file"], device=device, cache_dir=cache_dir, precision=precision,
                                 calibration=int8_calibration(name, weights_dir, cache_dir)), card)
            for name, card in _verified_cards(multiclass, weights_dir, ensemble).items()}


def int8_calibration(name: str, weights_dir: str | Path, cache_dir: str | Path) -> tuple[str, Callable] | None:
    """Calibration of model ``name``'s int8 graph (:mod:`covfast.engine.quantize`) as ``select_engine`` takes it:
    None (the sample volume's slices) for the single-channel networks; for the multi-class network those slices with
    the prior it gets in the pipeline, the float32 mean probability of every installed single-class network (with
    or without ``--no-ensemble``, so that one cached graph serves both).

    Returns:
        (calibration key, function returning [N, 2, S, S] float32 inputs), or None.
    """
    if name != MULTI_CLASS:
        return None
    from covfast.engine.quantize import sample_calibration_key, sample_calibration_slices

    priors = {card["name"]: card for card in installed_models(weights_dir) if card["name"] in (SINGLE_CLASS, PARTNER)}

    def inputs() -> np.ndarray:
        from covfast.engine.runtime import OnnxRuntimeEngine, ensure_onnx

        engines = {n: OnnxRuntimeEngine(ensure_onnx(card["file"], cache_dir)["path"]) for n, card in priors.items()}
        return multiclass_calibration(engines, torch.from_numpy(sample_calibration_slices()))

    key = "+prior-".join([sample_calibration_key(), *(card["sha256"][:16] for card in priors.values())])
    return key, inputs


def infection_engines(engine: str = "auto", device: str = "cpu", multiclass: bool = True,
                      weights_dir: str | Path = WEIGHTS_DIR, precision: str | None = None,
                      ensemble: bool = True) -> dict:
    """The engines :func:`segment_infection` uses, loaded (and exported to ONNX where needed) on the first call.

    Args:
        engine: ``auto``, ``torch``, ``onnx`` or ``tensorrt`` (see :func:`covfast.engine.select_engine`).
        device: ``cpu`` or ``cuda``.
        multiclass: include the GGO / consolidation model when installed.
        weights_dir: folder of installed weights.
        precision: ``fp32``, ``fp16``, ``bf16``, ``int8`` or None (see :func:`covfast.engine.select_engine`).
        ensemble: include the single-class U-Net partner (:data:`PARTNER`) when installed.

    Returns:
        ``{name: (Selection, card)}`` in :func:`load_models`' order.

    Raises:
        ModelNotInstalledError: no single-class weights, or a file whose hash differs from its card.
        UsageError: unknown ``engine`` or ``precision``, or an explicitly requested engine is unavailable (the
            message says why).
    """
    from covfast.engine import default_cache_dir

    return _shared_engines(engine, device, multiclass, str(weights_dir), str(default_cache_dir()),
                           _cards_key(weights_dir), precision, ensemble)


def _run_networks(runners: dict[str, Callable], x: torch.Tensor):
    """Standardised inputs [N, 1, S, S] float32 -> (prob [N, 1, S, S], class_prob [N, 3, S, S] or None, features
    [N, F, S/8, S/8] or None, own [N, 1, S, S]), float32 on ``x``'s device.

    ``runners`` (from :func:`_runners`), by model name: the single-class network's (batch -> (probabilities, its
    backbone features for the diagnosis stage or None)); the partner's and the multi-class network's, where installed
    (batch -> probabilities). ``prob`` is the single-class probability, averaged with the partner's when it runs;
    ``own`` the Inf-Net's alone (what the diagnosis stage reads).
    """
    own, features = runners[SINGLE_CLASS](x)
    prob = (own + runners[PARTNER](x)) * 0.5 if PARTNER in runners else own
    if MULTI_CLASS not in runners:
        return prob, None, features, own
    class_prob = torch.zeros((prob.shape[0], 3, *prob.shape[2:]), dtype=torch.float32, device=prob.device)
    class_prob[:, 0] = 1.0
    found = torch.nonzero(prob.flatten(1).amax(dim=1) >= MULTICLASS_MIN_PROB)[:, 0]
    if len(found):
        class_prob[found] = runners[MULTI_CLASS](multiclass_input(x[found], prob[found]))
    return prob, class_prob, features, own


def multiclass_calibration(engines: dict, x: torch.Tensor, tta: str = DEFAULT_TTA) -> np.ndarray:
    """Calibration inputs of the multi-class network's int8 graph: standardised slices ``x`` [N, 1, S, S] with the
    prior the single-class ``engines`` (by model name) give them in the pipeline -> [N, 2, S, S] float32."""
    prob = _run_networks(_runners(engines, tta), x)[0]
    return multiclass_input(x, prob).numpy()


def multiclass_input(x: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """The multi-class network's input: standardised slices [N, 1, S, S] with the single-class probability [N, 1, S,
    S] as the prior channel, standardised like a slice -> [N, 2, S, S]."""
    from covfast.nn.preprocess import PIXEL_MEAN, PIXEL_STD

    return torch.cat([x, (prob - PIXEL_MEAN) / PIXEL_STD], dim=1)


def _runners(engines: dict, tta: str = "none", one_batch: bool | None = None) -> dict[str, Callable]:
    """What :func:`_run_networks` takes, from engines by model name (:mod:`covfast.engine.runtime`), each averaged
    over the flips of ``tta`` (:data:`TTA_CHOICES`; the partner over those of :data:`PARTNER_TTA`). The single-class
    network's runner also returns its backbone features, those of the unflipped pass. ``one_batch``: run the plain
    and flipped slices as one batch (True) or one call each (False); None: one batch for inputs on a GPU."""
    check_tta(tta)

    def flip_mean(run: Callable, x: torch.Tensor, flips: tuple):
        # Returns (mean probability over the plain and flipped passes, the plain pass's features or None); the flipped
        # outputs are flipped back before averaging. On a GPU the plain and flipped slices go through the network in
        # one batch: there the fixed cost of each call dominates at these batch sizes. On the CPU one call per flip is
        # as fast with onnxruntime (P001: 6.42 s against 6.46 s) and faster with torch (17.6 s against 20.5 s;
        # benchmarks/tta_batching.py, results/tta_batching_cpu_*_2026-11-25.json).
        n = x.shape[0]
        if flips and (one_batch if one_batch is not None else x.device.type != "cpu"):
            prob, features = run(torch.cat([x, *(x.flip(dims) for dims in flips)]))
            passes = [prob[(k + 1) * n : (k + 2) * n].flip(dims) for k, dims in enumerate(flips)]
            prob, features = prob[:n], None if features is None else features[:n]
        else:
            prob, features = run(x)
            passes = [run(x.flip(dims))[0].flip(dims) for dims in flips]
        if not flips:
            return prob, features
        return (prob + sum(passes)) / (len(flips) + 1), features

    def with_features(engine, flips: tuple) -> Callable:
        return lambda x: flip_mean(engine.run_with_features, x, flips)

    def plain(engine, flips: tuple) -> Callable:
        return lambda x: flip_mean(lambda batch: (engine.run_tensor(batch), None), x, flips)[0]

    def flips_of(name: str) -> tuple:
        return _TTA_FLIPS[PARTNER_TTA if name == PARTNER and PARTNER_TTA is not None else tta]

    return {name: (with_features if name == SINGLE_CLASS else plain)(engine, flips_of(name))
            for name, engine in engines.items()}


def check_tta(tta: str | None) -> str:
    """``tta`` (None: :data:`DEFAULT_TTA`) if it is one of :data:`TTA_CHOICES`, else a UsageError naming them."""
    if tta is None:
        return DEFAULT_TTA
    if tta not in _TTA_FLIPS:
        raise UsageError(f"unknown test-time augmentation {tta!r}; use one of {', '.join(TTA_CHOICES)}")
    return tta


def _first_max_channel(maps: torch.Tensor) -> torch.Tensor:
    """[K, H, W] -> [H, W] uint8 index of the largest channel, the first on ties (``argmax(dim=0)``'s result).

    Elementwise passes over the channels: torch's argmax over the leading dimension of a CPU tensor is a strided
    reduction that took 1.5 s of P001's 139 slices here, these passes 0.1 s.
    """
    best, index = maps[0], torch.zeros(maps.shape[1:], dtype=torch.uint8, device=maps.device)
    for channel in range(1, maps.shape[0]):
        better = maps[channel] > best
        index = torch.where(better, channel, index).to(torch.uint8)
        best = torch.maximum(best, maps[channel])
    return index


def _resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def single_class_probability(models: dict, x: torch.Tensor, tta: str = DEFAULT_TTA) -> torch.Tensor:
    """The stage's single-class probability of standardised inputs: the Inf-Net's, averaged with the partner's when
    ``models`` holds it, over the flips of ``tta``.

    Args:
        models: from :func:`load_models` (a multi-class model in it is not run).
        x: [N, 1, S, S] float32 standardised slices (:func:`covfast.nn.preprocess.to_input`).
        tta: test-time augmentation, one of :data:`TTA_CHOICES`.

    Returns:
        [N, 1, S, S] float32 on ``x``'s device.
    """
    from covfast.engine.runtime import TorchEngine

    engines = {name: TorchEngine(loaded.model, str(x.device)) for name, loaded in models.items() if name != MULTI_CLASS}
    with torch.inference_mode():
        return _run_networks(_runners(engines, tta), x)[0]


def predict_slices(models: dict, slices: np.ndarray, device: str = "cpu", batch_size: int = 8, tta: str = DEFAULT_TTA):
    """Run the models on 8-bit slices that already look like the training slices.

    Args:
        models: from :func:`load_models`.
        slices: [N, H, W] uint8 grey slices.
        device: torch device.
        batch_size: slices per forward pass.
        tta: test-time augmentation, one of :data:`TTA_CHOICES`.

    Returns:
        (prob [N, H, W] float32, the single-class probability (averaged with the partner's when ``models`` holds
        it), class_prob [N, 3, H, W] float32 or None without a multi-class model).
    """
    from covfast.engine.runtime import TorchEngine
    from covfast.nn.preprocess import to_input

    runners = _runners({name: TorchEngine(loaded.model, device) for name, loaded in models.items()}, tta)
    size = slices.shape[1:]
    probs, class_probs = [], []
    with torch.inference_mode():
        for start in range(0, len(slices), batch_size):
            batch = torch.from_numpy(np.array(slices[start : start + batch_size], dtype=np.uint8))[:, None]
            prob, class_prob, _, _ = _run_networks(runners, to_input(batch.to(device)))
            probs.append(_resize(prob, size)[:, 0].cpu().numpy())
            if class_prob is not None:
                class_probs.append(_resize(class_prob, size).cpu().numpy())
    return np.concatenate(probs), (np.concatenate(class_probs) if class_probs else None)


def drop_small_components(mask: np.ndarray, prob: np.ndarray, spacing_mm, min_ml: float) -> int:
    """Remove the network's infection components smaller than ``min_ml``, in place.

    Components are 26-connected in 3D over ``mask > 0 | prob > PROBABILITY_THRESHOLD``; each one under ``min_ml`` is
    set to 0 in ``mask`` and in ``prob``, so the masks, the probability map and every number taken from them agree.

    Args:
        mask: [D, H, W] uint8 infection mask (0/1 or 0/1/2), changed in place.
        prob: [D, H, W] float32 probability, changed in place.
        spacing_mm: (dz, dy, dx) voxel spacing.
        min_ml: smallest component kept, in mL; 0 keeps everything.

    Returns:
        Number of components removed.
    """
    return drop_components(mask, prob, spacing_mm, min_ml=min_ml)


def drop_dome_caps(mask: np.ndarray, prob: np.ndarray, lung: np.ndarray, max_support: float | None) -> int:
    """Remove infection components that are the partial-volume caps of the diaphragm's domes, in place.

    Where the liver or spleen dome bulges up into a lung, the lung mask leaves its cross-sections out as islands
    (holes of the mask in their slices; :func:`covfast.pipeline.lung.lung_mask`). In the slice or two above the
    dome's top, the thick slice averages the dome with the lung around it: a round, hazy patch inside the lung that
    looks like ground glass, which the networks mark. Such a cap rests on the dome: the slice below holds the
    island. A lesion inside the lung rests on lung. So a 3D component (26-connected, over ``mask > 0 | prob >
    PROBABILITY_THRESHOLD``) is removed when more than ``max_support`` of its lower surface (its voxels whose
    inferior neighbour is not in the component) lies on a hole of the lung mask in the slice below. On the three
    COVID-CT-MD volumes this removes the two dome caps of P001 (1.8 and 1.1 mL, every lower-surface voxel on a
    hole), 1.0 of normal001's 1.4 mL of false infection (0.86 of it on a hole) and nothing of cap001 (at most 0.20).

    Args:
        mask: [D, H, W] uint8 infection mask, canonical orientation (D inferior -> superior), changed in place.
        prob: [D, H, W] float32 probability, changed in place.
        lung: [D, H, W] lung mask (non-zero = lung).
        max_support: largest share of a component's lower surface that may rest on holes; None keeps everything.

    Returns:
        Number of components removed.
    """
    return drop_components(mask, prob, lung=lung, dome_support=max_support)


def drop_components(mask: np.ndarray, prob: np.ndarray, spacing_mm=None, *, min_ml: float = 0.0,
                    lung: np.ndarray | None = None, dome_support: float | None = None) -> int:
    """:func:`drop_small_components` and :func:`drop_dome_caps` in one labelling of the components, in place.

    Args:
        mask, prob: as for those two; changed in place.
        spacing_mm: (dz, dy, dx) voxel spacing (needed when ``min_ml`` > 0).
        min_ml: smallest component kept, in mL; 0 keeps every size.
        lung: [D, H, W] lung mask (needed when ``dome_support`` is not None).
        dome_support: largest share of a component's lower surface that may rest on holes of ``lung``; None skips
            the dome-cap rule.

    Returns:
        Number of components removed by either rule.
    """
    import cc3d

    from covfast.pipeline.lung import fill_holes_per_slice

    domes = dome_support is not None and lung is not None and mask.shape[0] >= 2
    if min_ml <= 0 and not domes:
        return 0
    found = (mask > 0) | (prob > PROBABILITY_THRESHOLD)
    if not found.any():
        return 0
    box = bounding_box(found)  # the same components, a smaller array to label
    holes = None
    if domes:
        # The found voxels' slices and the one under them; in-plane the lung's extent as well, so that the holes are
        # those of whole slices (a non-lung region reaching the edge of the lung's box is not enclosed by lung).
        zs = slice(max(box[0].start - 1, 0), box[0].stop)
        in_lung = np.asarray(lung)[zs] > 0
        if in_lung.any():
            lung_box = bounding_box(in_lung)
            box = (zs, *(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(box[1:], lung_box[1:])))
            inside = in_lung[(slice(None), *box[1:])]
            holes = fill_holes_per_slice(inside) & ~inside
    found_box = np.ascontiguousarray(found[box])
    labels, count = cc3d.connected_components(found_box, connectivity=26, return_N=True)
    # Component sizes and the voxels to clear from the found voxels only (a few percent of the box): a bincount or a
    # lookup over the whole box costs more than the labelling itself.
    where = np.unravel_index(np.flatnonzero(found_box), found_box.shape)
    ids = labels[where].astype(np.intp)
    drop = np.zeros(count + 1, dtype=bool)
    if min_ml > 0:
        drop |= np.bincount(ids, minlength=count + 1) * (float(np.prod(spacing_mm)) / 1000.0) < min_ml
    if holes is not None and holes.any():
        drop |= resting_on(labels, holes, dome_support, where)
    drop[0] = False
    if not drop.any():
        return 0
    gone = drop[ids]
    voxels = tuple(axis[gone] + part.start for axis, part in zip(where, box))
    mask[voxels] = 0
    prob[voxels] = 0.0
    return int(drop.sum())


def window_hu(hu: np.ndarray) -> np.ndarray:
    """HU -> 8-bit lung window: clip to :data:`HU_WINDOW`, scale to 0..255; same shape, uint8."""
    lo, hi = HU_WINDOW
    return np.round((np.clip(hu.astype(np.float32), lo, hi) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def window_hu_tensor(hu: torch.Tensor) -> torch.Tensor:
    """:func:`window_hu` for a tensor of any shape, on its device (same float32 arithmetic and rounding, so equal)."""
    lo, hi = HU_WINDOW
    return torch.round((hu.float().clamp(lo, hi) - lo) * (255.0 / (hi - lo))).to(torch.uint8)


def prepare_batch(hu: torch.Tensor, chunk: list[tuple[int, tuple[slice, slice]]]) -> torch.Tensor:
    """Network inputs for a batch of lung slices, computed on ``hu``'s device.

    The batch's slices are windowed in one operation; each crop is then transposed and resized on its own (crops
    differ in size). Equal to :func:`covfast.nn.preprocess.to_input` of each :func:`slice_view`.

    Args:
        hu: [D, H, W] Hounsfield units (int16 or float32), canonical orientation, on the CPU or a GPU.
        chunk: (z, crop) pairs from :func:`lung_slices`.

    Returns:
        [N, 1, S, S] float32 standardised inputs (S = ``INPUT_SIZE``) on ``hu``'s device.
    """
    from covfast.nn.preprocess import to_input

    windowed = window_hu_tensor(hu.index_select(0, torch.tensor([z for z, _ in chunk], device=hu.device)))
    return torch.cat([to_input(windowed[i, rows, cols].T.contiguous()[None, None])
                      for i, (_, (rows, cols)) in enumerate(chunk)])


def lung_crop(lung_slice: np.ndarray, min_size: tuple[int, int] = (0, 0)) -> tuple[slice, slice] | None:
    """Bounding box of a slice's lung mask, grown about its centre to at least ``min_size`` (rows, columns; shifted
    to stay inside the slice), widened by :data:`CROP_MARGIN`; None if the slice has no lung."""
    rows = np.flatnonzero(lung_slice.any(axis=1))
    cols = np.flatnonzero(lung_slice.any(axis=0))
    if rows.size == 0:
        return None

    def widen(lo, hi, limit, least):
        grow = max(0, min(least, limit) - (hi - lo + 1))
        lo, hi = lo - grow // 2, hi + grow - grow // 2
        shift = max(0, -lo) - max(0, hi - (limit - 1))
        lo, hi = lo + shift, hi + shift
        margin = round(CROP_MARGIN * (hi - lo + 1))
        return slice(max(0, lo - margin), min(limit, hi + 1 + margin))

    return (
        widen(rows[0], rows[-1], lung_slice.shape[0], min_size[0]),
        widen(cols[0], cols[-1], lung_slice.shape[1], min_size[1]),
    )


def crop_min_size(lung: np.ndarray, fraction: float = MIN_CROP_FRACTION) -> tuple[int, int]:
    """``fraction`` of the largest lung extent (rows, columns) over the slices of a [D, H, W] lung mask: the least
    crop of every slice, so that slices with little lung (apex, bases) are not magnified beyond the scale of the
    widest lung slices, the scale of the training crops."""
    rows = (lung > 0).any(axis=2)
    cols = (lung > 0).any(axis=1)

    def extent(mask):
        present = mask.any(axis=1)
        if not present.any():
            return 0
        first = mask.argmax(axis=1)
        last = mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
        return int((last - first + 1)[present].max())

    return round(fraction * extent(rows)), round(fraction * extent(cols))


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
    """(z, crop) of every slice of a [D, H, W] lung mask that contains lung; crop from :func:`lung_crop` with the
    volume's :func:`crop_min_size`."""
    least = crop_min_size(lung)
    return [(z, crop) for z in range(lung.shape[0]) if (crop := lung_crop(lung[z] > 0, least)) is not None]


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
    engine: str = "auto",
    precision: str | None = None,
    tta: str = DEFAULT_TTA,
    ensemble: bool = True,
) -> InfectionResult:
    """Infection probability (and GGO / consolidation labels) of a CT volume.

    Args:
        hu: [D, H, W] int16 Hounsfield units, canonical orientation (D inferior->superior, H anterior->posterior,
            W patient right->left).
        lung: [D, H, W] uint8 lung mask (0 background, 1 right, 2 left).
        spacing_mm: (dz, dy, dx) voxel spacing; the 2D networks do not use it (slices are resized to the input
            size), it is part of the stage contract.
        device: ``cpu`` or ``cuda``.
        batch_size: slices per forward pass.
        multiclass: also run the GGO / consolidation model when installed.
        progress: optional callable(n_done, n_total) called after each batch.
        weights_dir: folder of installed weights.
        engine: ``auto``, ``torch``, ``onnx`` or ``tensorrt`` (see :func:`covfast.engine.select_engine`).
        precision: network precision, ``fp32``, ``fp16``, ``bf16``, ``int8`` or None (see
            :func:`covfast.engine.select_engine`).
        tta: test-time augmentation, one of :data:`TTA_CHOICES` (see the module docstring).
        ensemble: average the U-Net partner's probability into the Inf-Net's when installed (module docstring).

    Returns:
        :class:`InfectionResult` on the full [D, H, W] grid.

    Raises:
        ModelNotInstalledError: no infection weights installed.
        UsageError: the requested engine is unavailable, or ``tta`` is unknown.
        ValueError: ``hu`` and ``lung`` differ in shape or are not 3D.
    """
    del spacing_mm
    check_tta(tta)
    if hu.ndim != 3 or hu.shape != lung.shape:
        raise ValueError(f"hu and lung must be [D, H, W] of one shape; got {hu.shape} and {lung.shape}")
    from covfast.ops import infection_ratio

    t0 = time.perf_counter()
    engines = infection_engines(engine, device, multiclass, weights_dir, precision, ensemble)
    runners = _runners({name: selection.engine for name, (selection, _) in engines.items()}, tta)
    timings = {"load": time.perf_counter() - t0}
    t0 = time.perf_counter()
    work = lung_slices(lung)
    view_prob, view_features = {}, {}
    with torch.inference_mode():
        # The volume and the lung mask go to the device once; every step below stays there and only the masks, the
        # probability and the per-slice counts come back.
        hu_device = torch.from_numpy(hu).to(device)
        lung_device = torch.from_numpy(np.ascontiguousarray(lung, dtype=np.uint8)).to(device)
        prob = torch.zeros(hu.shape, dtype=torch.float32, device=hu_device.device)
        classes = torch.zeros(hu.shape, dtype=torch.uint8, device=hu_device.device) if MULTI_CLASS in engines else None
        for start in range(0, len(work), batch_size):
            chunk = work[start : start + batch_size]
            batch_prob, batch_classes, features, own = _run_networks(runners, prepare_batch(hu_device, chunk))
            for i, (z, (rows, cols)) in enumerate(chunk):
                size = (cols.stop - cols.start, rows.stop - rows.start)  # the transposed crop
                prob[z, rows, cols] = _resize(batch_prob[i : i + 1], size)[0, 0].T
                if classes is not None:
                    classes[z, rows, cols] = _first_max_channel(_resize(batch_classes[i : i + 1], size)[0]).T
            view_prob.update(zip((z for z, _ in chunk), own[:, 0].cpu().numpy()))
            if features is not None:
                view_features.update(zip((z for z, _ in chunk), features))
            if progress is not None:
                progress(min(start + batch_size, len(work)), len(work))
        # The networks see lung crops; what they mark outside the lung mask (bowel, chest wall) is not lung infection.
        outside = lung_device == 0
        prob.masked_fill_(outside, 0.0)
        mask = classes.masked_fill_(outside, 0) if classes is not None else (prob > PROBABILITY_THRESHOLD).to(torch.uint8)
        lung_voxels, infected_voxels, _ = infection_ratio(lung_device, mask, PROBABILITY_THRESHOLD)
        soft_sum = infection_ratio(lung_device, prob, PROBABILITY_THRESHOLD)[2]
        counts = InfectionCounts(lung_voxels.cpu().numpy(), infected_voxels.cpu().numpy(), soft_sum.cpu().numpy())
        prob_host, mask_host = prob.cpu().numpy(), mask.cpu().numpy()
    timings["infer"] = time.perf_counter() - t0
    used = [{"name": name, "sha256": card["sha256"]} for name, (_, card) in engines.items()]
    described = {name: selection.describe() for name, (selection, _) in engines.items()}
    return InfectionResult(prob_host, mask_host if classes is not None else None, used, timings, described, view_prob,
                           mask_host, counts, view_features)
