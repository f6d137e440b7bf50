"""Train and validate the affinity head (issue 5) on cached RoI features of the shipped Inf-Net.

Classes and sources (``../shared/data``):
    covid: the 50 COVID-SemiSeg doctor-labelled slices (already lung-cropped views) and the radiologist-marked
        infected slices of COVID-CT-MD P001;
    pneumonia: the infected slices of COVID-CT-MD cap001 and the CC-CCII common-pneumonia patient (three scans
        of 8-bit PNGs; no slice labels, so only slices where the Inf-Net finds a lesion instance are used: weak
        labels);
    normal: every slice of normal001, and the slices of P001 and cap001 that the radiologists marked free of
        infection (a slice-level normal; they are never scored as normal for the metrics).
CC-CCII PNGs are mapped back to approximate HU by inverting a [-1200, 0] HU window (air ~40, soft tissue
saturated, as the images look) so the same lung mask, lung window and crop apply.

Two ways to train the classification branch:
    head only (``training/recipes/affinity.json``, the shipped head): the segmentation stage is the shipped Inf-Net,
        frozen, and the branch shares its backbone by reference, so the weight copy is exact and only the head trains
        on cached RoI features (a CPU budget of minutes; inference reuses the infection stage's features);
    alternating with the weight copy (recipes with a ``"joint"`` block, ``affinity_joint.json``): the head owns a copy
        of the backbone's first stages; each round trains a copy of the Inf-Net on the labelled slices (segmentation
        stage), copies its stem and first two stages into the head, then trains head and stages with the
        classification loss on the cached views (classification stage), as the paper alternates its branches.
        ``"preprocess": "paper"`` in the model block feeds those stages the paper's input (raw HU standardised by
        one global mean / std, no lung window) instead of covfast's. RoIs and the probability channel stay the
        shipped Inf-Net's. Costs one extra pass of the first stages per slice at inference.

Validation is leave-one-patient-out over the three COVID-CT-MD patients (one per class): each fold trains on every
other source, so the held-out patient's class is still learned from another patient (P001 -> the MedSeg slices;
cap001 -> CC-CCII; normal001 -> the infection-free slices of P001 and cap001).

Usage (from the repository root):
    python -m training.affinity cache --data ../shared/data --out runs/affinity
    python -m training.affinity lopo --recipe training/recipes/affinity.json --out runs/affinity
    python -m training.affinity final --recipe training/recipes/affinity.json --out runs/affinity --ship
    # alternating training (the same cache holds the views it trains on):
    python -m training.affinity lopo --recipe training/recipes/affinity_joint.json --out runs/affinity
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from covfast.nn.affinity import CLASSES, AffinityHead
from covfast.pipeline.diagnosis import (
    MODEL_NAME,
    RoiFeatures,
    aggregate,
    class_probs,
    hu_view,
    pool_view_rois,
    slice_view,
    stride8_features,
)
from training.ctmd import labels_at

CT_MD_CASES = {"P001": "covid", "cap001": "pneumonia", "normal001": "normal"}
CCCCII_SCANS = ("3131", "3132", "3133")
CCCCII_WINDOW_HU = (-1200.0, 0.0)
CCCCII_SPACING_MM = (1.0, 0.7, 0.7)
LOPO_PATIENTS = tuple(CT_MD_CASES)
ZENODO_IMAGES = "infnet-semiseg/TrainingSet/LungInfection-Train/Pseudo-label/Imgs"
# Sources whose slices carry only the patient's class: a slice without a lesion instance has no known class.
PATIENT_LEVEL_SOURCES = ("ccccii", "zenodo")


def _infnet(device: str, weights_dir: str | Path | None = None):
    """The Inf-Net whose backbone and probability the diagnosis stage reads (without its U-Net partner:
    :attr:`covfast.pipeline.infection.InfectionResult.view_prob`)."""
    from covfast.pipeline.infection import SINGLE_CLASS, WEIGHTS_DIR, load_models

    return load_models(device, multiclass=False, weights_dir=weights_dir or WEIGHTS_DIR, ensemble=False)[SINGLE_CLASS]


def _cache_backbone(out: Path) -> dict:
    """Name and SHA-256 of the Inf-Net whose backbone made ``out/cache`` (the installed one for caches from before
    ``cache_backbone.json`` was written)."""
    from covfast.pipeline.infection import SINGLE_CLASS

    path = out / "cache_backbone.json"
    if path.exists():
        return json.loads(path.read_text())
    return {"name": SINGLE_CLASS, "sha256": _infnet("cpu").card["sha256"]}


@torch.no_grad()
def _roi_batch(infnet, extractor: RoiFeatures, views: list[np.ndarray], hu_views: torch.Tensor) -> dict:
    """8-bit views (and their HU on the network grid) -> RoI features [N, beta, 65, 28, 28] float16 (``feats``), lesion
    counts, and what the classification branch trains on: the standardised view ``x``, its HU ``hu``, the Inf-Net's
    probability ``prob`` (float16 [N, S, S]; as the infection stage hands it to the diagnosis: with the default
    flips) and the chosen RoI ``boxes`` (float32 [N, beta, 4])."""
    from covfast.nn.preprocess import to_input
    from covfast.pipeline.infection import SINGLE_CLASS, single_class_probability

    x = torch.cat([to_input(torch.from_numpy(v)[None, None]) for v in views])
    prob = single_class_probability({SINGLE_CLASS: infnet}, x).clone()
    boxes, counts = extractor.select(prob)
    rois = pool_view_rois(extractor.backbone_features(x), prob, boxes)
    return {
        "feats": rois.half().numpy(),
        "lesions": counts,
        "x": x[:, 0].half().numpy(),
        "hu": hu_views[:, 0].half().numpy(),
        "prob": prob[:, 0].half().numpy(),
        "boxes": np.asarray(boxes, dtype=np.float32),
    }


def _volume_views(hu: np.ndarray, lung: np.ndarray) -> list[tuple[int, np.ndarray, torch.Tensor]]:
    """(slice index, 8-bit view, HU view on the network grid) of every lung slice."""
    from covfast.nn.preprocess import INPUT_SIZE
    from covfast.pipeline.infection import crop_min_size

    least = crop_min_size(lung)
    return [
        (z, found[0], hu_view(hu[z], found[1], INPUT_SIZE))
        for z in range(hu.shape[0])
        if (found := slice_view(hu[z], lung[z], least)) is not None
    ]


def _unwindow(views: list[np.ndarray]) -> torch.Tensor:
    """Approximate HU of 8-bit lung-window views (the labelled slices have no HU): the window's inverse, resized."""
    from covfast.nn.preprocess import INPUT_SIZE
    from covfast.pipeline.infection import HU_WINDOW

    lo, hi = HU_WINDOW
    out = []
    for v in views:
        hu = torch.from_numpy(lo + v.astype(np.float32) * (hi - lo) / 255.0)[None, None]
        out.append(
            F.interpolate(hu, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
        )
    return torch.cat(out)


def cache(
    data: Path, out: Path, device: str = "cpu", batch: int = 16, weights_dir: str | Path | None = None,
    zenodo: bool = False,
) -> None:
    """Compute and store RoI features and labels of every source slice under ``out/cache``, with the Inf-Net of
    ``weights_dir`` (default: the installed one), whose name and SHA-256 go to ``out/cache_backbone.json``.
    ``zenodo`` adds the 1,600 unlabelled COVID-SemiSeg slices (20 COVID-19 patients of the Zenodo set) as COVID-19;
    like CC-CCII's, only those with a lesion instance are used (:func:`_sources`)."""
    from PIL import Image

    from covfast.io import load_volume
    from covfast.pipeline.infection import DEFAULT_TTA
    from covfast.pipeline.lung import lung_mask

    infnet = _infnet(device, weights_dir)
    extractor = RoiFeatures(infnet.model.backbone, device=device)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    backbone = {"name": infnet.card["name"], "sha256": infnet.card["sha256"], "weights": str(infnet.card["file"]),
                "tta": DEFAULT_TTA}
    (out / "cache_backbone.json").write_text(json.dumps(backbone, indent=2) + "\n")

    (out / "views").mkdir(exist_ok=True)

    def store(name: str, views: list[np.ndarray], hu_views: torch.Tensor, meta: dict) -> list[int]:
        parts = [
            _roi_batch(infnet, extractor, views[start : start + batch], hu_views[start : start + batch])
            for start in range(0, len(views), batch)
        ]
        joined = {key: np.concatenate([part[key] for part in parts]) for key in ("feats", "x", "hu", "prob", "boxes")}
        counts = [n for part in parts for n in part["lesions"]]
        np.save(out / "cache" / f"{name}.npy", joined.pop("feats"))
        # The classification branch's training inputs (views, probability, RoIs), for recipes with "joint".
        np.savez(out / "views" / f"{name}.npz", **joined)
        (out / "cache" / f"{name}.json").write_text(json.dumps({**meta, "lesions": counts}))
        print(f"{name}: {len(views)} slices", flush=True)
        return counts

    semiseg = data / "infnet-semiseg/TrainingSet/LungInfection-Train/Doctor-label/Imgs"
    images = sorted(semiseg.glob("*.jpg"))
    views = [np.array(Image.open(p).convert("L")) for p in images]
    store(
        "infnet",
        views,
        _unwindow(views),
        {
            "patient": "medseg",
            "cls": ["covid"] * len(views),
            "scored": [False] * len(views),
            "slice": [p.name for p in images],
        },
    )
    if zenodo:
        images = sorted((data / ZENODO_IMAGES).glob("*.jpg"))
        views = [np.array(Image.open(p).convert("L")) for p in images]
        store(
            "zenodo",
            views,
            _unwindow(views),
            {"patient": "zenodo", "cls": ["covid"] * len(views), "scored": [False] * len(views),
             "slice": [p.name for p in images]},
        )
    labels = json.loads((data / "covid-ct-md/labels.json").read_text())
    for case, cls in CT_MD_CASES.items():
        volume = load_volume(data / "covid-ct-md" / case)
        lung = lung_mask(volume.hu, volume.spacing_mm)
        infected = labels_at(labels[case], np.asarray(volume.z_mm))
        work = _volume_views(volume.hu, lung)
        slice_cls = [cls if infected[z] or cls == "normal" else "normal" for z, _, _ in work]
        scored = [bool(infected[z]) or cls == "normal" for z, _, _ in work]
        store(
            case,
            [v for _, v, _ in work],
            torch.cat([h for _, _, h in work]),
            {
                "patient": case,
                "cls": slice_cls,
                "scored": scored,
                "infected": [bool(infected[z]) for z, _, _ in work],
                "slice": [int(z) for z, _, _ in work],
            },
        )
    for scan in CCCCII_SCANS:
        hu = ccccii_hu(data, scan)
        work = _volume_views(hu, lung_mask(hu, CCCCII_SPACING_MM))
        store(
            f"ccccii_{scan}",
            [v for _, v, _ in work],
            torch.cat([h for _, _, h in work]),
            {
                "patient": "ccccii",
                "cls": ["pneumonia"] * len(work),
                "scored": [False] * len(work),
                "slice": [int(z) for z, _, _ in work],
            },
        )


def ccccii_hu(data: Path, scan: str) -> np.ndarray:
    """[D, H, W] int16 approximate HU of one CC-CCII scan: its 8-bit PNG slices (in file order) with the
    :data:`CCCCII_WINDOW_HU` window inverted."""
    from PIL import Image

    lo, hi = CCCCII_WINDOW_HU
    files = sorted(glob.glob(str(Path(data) / "ccccii-cp/CP/0" / scan / "*.png")))
    if not files:
        raise FileNotFoundError(f"no PNG slices of CC-CCII scan {scan} under {data}")
    grey = np.stack([np.asarray(Image.open(f).convert("L")) for f in files]).astype(np.float32)
    return np.round(lo + grey * (hi - lo) / 255.0).astype(np.int16)


def _sources(out: Path):
    """Per cached source: (metadata path, indices of the slices kept, their records). Slices of
    :data:`PATIENT_LEVEL_SOURCES` without a lesion instance are dropped (their class is unknown)."""
    for meta_path in sorted((out / "cache").glob("*.json")):
        meta = json.loads(meta_path.read_text())
        keep = [
            i for i in range(len(meta["cls"])) if meta["patient"] not in PATIENT_LEVEL_SOURCES or meta["lesions"][i] > 0
        ]
        rows = [
            {
                "source": meta_path.stem,
                "patient": meta["patient"],
                "cls": meta["cls"][i],
                "scored": meta["scored"][i],
                "infected": meta.get("infected", [None] * len(meta["cls"]))[i],
                "slice": meta["slice"][i],
            }
            for i in keep
        ]
        yield meta_path, keep, rows


def load_cache(out: Path) -> tuple[np.ndarray, list[dict]]:
    """All cached slices: (features [N, beta, 65, 28, 28] float16 memmap-backed array, per-slice records)."""
    feats, rows = [], []
    for meta_path, keep, source_rows in _sources(out):
        feats.append(np.asarray(np.load(meta_path.with_suffix(".npy"), mmap_mode="r")[keep]))
        rows += source_rows
    return np.concatenate(feats), rows


def load_views(out: Path) -> tuple[dict, list[dict]]:
    """The classification branch's inputs of the cached slices, row for row as :func:`load_cache`: ``{"x", "hu",
    "prob": float16 [N, S, S], "boxes": float32 [N, beta, 4]}`` and the per-slice records."""
    parts: dict[str, list] = {key: [] for key in ("x", "hu", "prob", "boxes")}
    rows = []
    for meta_path, keep, source_rows in _sources(out):
        path = out / "views" / f"{meta_path.stem}.npz"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no cached views; rerun python -m training.affinity cache")
        with np.load(path) as arrays:
            for key, values in parts.items():
                values.append(arrays[key][keep])
        rows += source_rows
    return {key: np.concatenate(value) for key, value in parts.items()}, rows


def _head(recipe: dict) -> AffinityHead:
    return AffinityHead(**recipe["model"])


def _balanced(rows: list[dict], index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class indices of the slices ``index`` and sampling weights that draw the three classes equally often."""
    targets = np.array([CLASSES.index(rows[i]["cls"]) for i in index])
    weights = 1.0 / np.bincount(targets, minlength=3)[targets]
    return targets, weights / weights.sum()


def train(feats: np.ndarray, rows: list[dict], index: np.ndarray, recipe: dict, log=print) -> AffinityHead:
    """Train a head on the slices ``index`` with per-class BCE, classes balanced by sampling weights."""
    opt_cfg = recipe["optim"]
    torch.manual_seed(recipe["seed"])
    rng = np.random.default_rng(recipe["seed"])
    model = _head(recipe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt_cfg["lr"], weight_decay=opt_cfg["weight_decay"])
    targets, weights = _balanced(rows, index)
    steps = opt_cfg["steps"]
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=opt_cfg["lr"], total_steps=steps)
    model.train()
    for step in range(steps):
        pick = rng.choice(len(index), size=opt_cfg["batch"], p=weights)
        x = torch.from_numpy(feats[index[pick]].astype(np.float32))
        y = F.one_hot(torch.from_numpy(targets[pick]), 3).float()
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step} loss {loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def predict(model: AffinityHead, feats: np.ndarray, index: np.ndarray, batch: int = 64) -> np.ndarray:
    """[len(index), 3] class probabilities (normalised sigmoids)."""
    out = [
        class_probs(model(torch.from_numpy(feats[index[s : s + batch]].astype(np.float32))))
        for s in range(0, len(index), batch)
    ]
    return np.concatenate(out) if out else np.zeros((0, 3))


def joint_rois(head: AffinityHead, views: dict, pick: np.ndarray) -> torch.Tensor:
    """Pooled RoI features [len(pick), beta, 65, 28, 28] of the classification branch (the head with its own feature
    stages) on the cached slices ``pick``: features of the view, the Inf-Net's probability as the 65th channel, the
    cached RoIs."""
    x = torch.from_numpy(views["x"][pick].astype(np.float32))[:, None]
    hu = torch.from_numpy(views["hu"][pick].astype(np.float32))[:, None] if head.preprocess == "paper" else None
    prob = torch.from_numpy(views["prob"][pick].astype(np.float32))[:, None]
    feats = stride8_features(head.features, head.feature_input(x, hu))
    rois = [[tuple(map(float, box)) for box in views["boxes"][i]] for i in pick]
    return pool_view_rois(feats, prob, rois)


def joint_logits(head: AffinityHead, views: dict, pick: np.ndarray) -> torch.Tensor:
    """Logits of the classification branch on the cached slices ``pick`` (:func:`joint_rois`, then the head)."""
    return head(joint_rois(head, views, pick))


@torch.no_grad()
def predict_joint(head: AffinityHead, views: dict, index: np.ndarray, batch: int = 32) -> np.ndarray:
    """:func:`predict` for a head with its own feature stages, from the cached views."""
    head.eval()
    out = [class_probs(joint_logits(head, views, index[s : s + batch])) for s in range(0, len(index), batch)]
    return np.concatenate(out) if out else np.zeros((0, 3))


def _hu_statistics(hu: np.ndarray, index: np.ndarray, chunk: int = 64) -> tuple[float, float]:
    """Global mean and standard deviation of the HU views ``index`` (the paper's only preprocessing)."""
    total = total_sq = count = 0.0
    for s in range(0, len(index), chunk):
        part = hu[index[s : s + chunk]].astype(np.float64)
        total += part.sum()
        total_sq += np.square(part).sum()
        count += part.size
    mean = total / count
    return float(mean), float(np.sqrt(max(total_sq / count - mean * mean, 1e-12)))


def train_joint(views: dict, rows: list[dict], index: np.ndarray, recipe: dict, out: Path, log=print) -> AffinityHead:
    """Alternating training of the segmentation and classification branches with the weight copy (recipe "joint").

    Each of ``rounds`` rounds: a segmentation stage (``seg_steps`` steps of the Inf-Net's own loss and augmentation on
    the 50 labelled slices, starting from the Inf-Net that made the cache); the copy of its stem and first two stages
    into the head's feature stages; a classification stage (``cls_steps`` steps of per-class BCE on class-balanced
    batches of the slices ``index``, training the head and its feature stages). RoIs and the probability channel are
    the cached ones of the shipped Inf-Net, as at inference. The segmentation branch is a training-time copy and is
    not saved: the shipped Inf-Net stays the segmentation model.
    """
    from training.augment import AugmentConfig
    from training.data import load_labelled
    from training.loops import OptimConfig, train_segmentation

    joint, opt_cfg = recipe["joint"], recipe["optim"]
    torch.manual_seed(recipe["seed"])
    rng = np.random.default_rng(recipe["seed"])
    config = dict(recipe["model"])
    if config.get("preprocess") == "paper":
        config["input_mean"], config["input_std"] = _hu_statistics(views["hu"], index)
        log(f"paper preprocessing: HU mean {config['input_mean']:.1f} std {config['input_std']:.1f}")
    head = AffinityHead(**config)
    backbone = _cache_backbone(out)
    seg = _infnet("cpu", Path(backbone["weights"]).parent if backbone.get("weights") else None).model
    seg = copy.deepcopy(seg)
    labelled = load_labelled(Path(joint.get("data", "../shared/data/infnet-semiseg")), 256, "infection")
    seg_opt = OptimConfig(
        steps=joint["seg_steps"], batch=joint["seg_batch"], lr=joint["seg_lr"], warmup=1, ckpt_every=10**9
    )
    features = list(head.features.parameters())
    others = [p for name, p in head.named_parameters() if not name.startswith("features.")]
    optimizer = torch.optim.AdamW(
        [{"params": others, "lr": opt_cfg["lr"]}, {"params": features, "lr": joint["features_lr"]}],
        weight_decay=opt_cfg["weight_decay"],
    )
    total = joint["rounds"] * joint["cls_steps"]
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[opt_cfg["lr"], joint["features_lr"]], total_steps=total
    )
    targets, weights = _balanced(rows, index)
    for round_ in range(joint["rounds"]):
        if joint["seg_steps"]:
            seg_log = train_segmentation(
                seg,
                labelled.images,
                labelled.targets,
                "infection",
                seg_opt,
                AugmentConfig(),
                torch.device("cpu"),
                recipe["seed"] + round_,
                log_every=joint["seg_steps"],
            )
            log(f"round {round_} segmentation stage {seg_log.seconds:.0f}s")
        head.copy_features(seg.backbone)
        head.train()
        for step in range(joint["cls_steps"]):
            pick = rng.choice(len(index), size=opt_cfg["batch"], p=weights)
            y = F.one_hot(torch.from_numpy(targets[pick]), 3).float()
            loss = F.binary_cross_entropy_with_logits(joint_logits(head, views, index[pick]), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            if step % 25 == 0 or step == joint["cls_steps"] - 1:
                log(f"round {round_} step {step} loss {loss.item():.4f}")
    return head.eval()


def slice_metrics(truth: list[str], probs: np.ndarray) -> dict:
    """3-class macro-F1, per-class F1 and COVID-positive sensitivity / specificity of scored slices."""
    pred = probs.argmax(axis=1)
    true = np.array([CLASSES.index(c) for c in truth])
    f1 = {}
    for k, name in enumerate(CLASSES):
        tp = int(((pred == k) & (true == k)).sum())
        denom = int((pred == k).sum() + (true == k).sum())
        f1[name] = 2 * tp / denom if denom else None
    covid = CLASSES.index("covid")
    pos, neg = true == covid, true != covid
    return {
        "n": len(true),
        "macro_f1": float(np.mean([v for v in f1.values() if v is not None])),
        "f1": f1,
        "covid_sensitivity": float((pred[pos] == covid).mean()) if pos.any() else None,
        "covid_specificity": float((pred[neg] != covid).mean()) if neg.any() else None,
        "confusion": [[int(((true == a) & (pred == b)).sum()) for b in range(3)] for a in range(3)],
    }


def _trainer(out: Path, recipe: dict):
    """(fit(index, log) -> head, predict(head, index) -> probs, rows) for the recipe: a head on the cached features,
    or with a ``"joint"`` block the classification branch with its own feature stages on the cached views."""
    if "joint" in recipe:
        views, rows = load_views(out)
        return (
            lambda index, log: train_joint(views, rows, index, recipe, out, log),
            lambda head, index: predict_joint(head, views, index),
            rows,
        )
    feats, rows = load_cache(out)
    return (
        lambda index, log: train(feats, rows, index, recipe, log),
        lambda head, index: predict(head, feats, index),
        rows,
    )


def lopo(out: Path, recipe: dict) -> dict:
    """Leave-one-patient-out over the COVID-CT-MD patients; pooled slice metrics and a diagnosis per volume."""
    fit, infer, rows = _trainer(out, recipe)
    patients = np.array([r["patient"] for r in rows])
    scored_truth, scored_probs, volumes, predictions = [], [], {}, {}
    for held in LOPO_PATIENTS:
        t0 = time.perf_counter()
        model = fit(np.flatnonzero(patients != held), lambda m, h=held: print(h, m, flush=True))
        test = np.flatnonzero(patients == held)
        probs = infer(model, test)
        scored = np.array([rows[i]["scored"] for i in test])
        scored_truth += [rows[i]["cls"] for i in test[scored]]
        scored_probs.append(probs[scored])
        predictions[held] = {
            "slice": [rows[i]["slice"] for i in test],
            "cls": [rows[i]["cls"] for i in test],
            "scored": scored.tolist(),
            "probs": probs.tolist(),
        }
        volumes[held] = {
            "truth": CT_MD_CASES[held],
            **aggregate(probs),
            "seconds": time.perf_counter() - t0,
            "slice_metrics": slice_metrics([rows[i]["cls"] for i in test[scored]], probs[scored]),
        }
        print(held, volumes[held]["label"], volumes[held]["probs"], flush=True)
    result = {
        "protocol": "leave-one-patient-out over P001, cap001, normal001; scored slices = infected slices of "
        "P001 and cap001 and all lung slices of normal001",
        "recipe": recipe,
        "slices": slice_metrics(scored_truth, np.concatenate(scored_probs)),
        "volumes": volumes,
        "predictions": predictions,
    }
    (out / "lopo.json").write_text(json.dumps(result, indent=2))
    return result


def _without_predictions(result: dict) -> dict:
    """A ``lopo.json`` result without its per-slice predictions (kept out of model cards)."""
    return {key: value for key, value in result.items() if key != "predictions"}


def final(out: Path, recipe: dict, recipe_path: str, ship: bool) -> None:
    """Train on every cached slice; with ``ship`` write covfast/weights/affinity.{safetensors,json}.

    The card records the SHA-256 of the infnet whose backbone made the cached features (``cache_backbone.json``
    beside the cache): the diagnosis stage refuses the head beside any other infnet.
    """
    from covfast.nn import count_parameters, save_model
    from covfast.pipeline.infection import WEIGHTS_DIR

    fit, _, rows = _trainer(out, recipe)
    t0 = time.perf_counter()
    model = fit(np.arange(len(rows)), print)
    seconds = time.perf_counter() - t0
    dest = Path("covfast/weights") if ship else out
    backbone = _cache_backbone(out)
    weights_arg = ""
    if backbone.get("weights") and Path(backbone["weights"]).resolve().parent != WEIGHTS_DIR.resolve():
        weights_arg = f" --weights {Path(backbone['weights']).parent}"
    config = dict(recipe["model"])
    if model.preprocess == "paper":
        config.update(input_mean=model.input_mean, input_std=model.input_std)
    sha = save_model(model, dest / f"{MODEL_NAME}.safetensors", MODEL_NAME, config)
    lopo_path, cascade_path = out / "lopo.json", out / "cascade.json"
    card = {
        "name": MODEL_NAME,
        "task": "diagnosis",
        "architecture": {"arch": MODEL_NAME, "config": config},
        "params": count_parameters(model),
        "input": (
            "RoI features of the head's own feature stages (copied from the segmentation branch, then trained with "
            f"the classification loss; {model.preprocess} preprocessing) plus the infnet's infection probability"
            if model.features is not None
            else "RoI features of the shipped infnet backbone (stage 2 + infection probability)"
        )
        + ", 65 x 28 x 28, beta RoIs per slice, RoIs from the infnet's lesion instances; see "
        "covfast/pipeline/diagnosis.py",
        "classes": list(CLASSES),
        # The Inf-Net whose features, probability and its flips (``tta``) made the cached RoIs.
        "backbone": {key: value for key, value in backbone.items() if key in ("name", "sha256", "tta")},
        "data": {src: sum(r["source"] == src for r in rows) for src in sorted({r["source"] for r in rows})},
        "recipe": recipe,
        "command": f"python -m training.affinity cache --data ../shared/data --out {out}{weights_arg} && "
        "python -m training.affinity "
        f"lopo --recipe {recipe_path} --out {out} && python -m training.affinity final --recipe "
        f"{recipe_path} --out {out} --ship",
        "training": {"device": "cpu", "seconds": seconds},
        "validation": _without_predictions(json.loads(lopo_path.read_text())) if lopo_path.exists() else None,
        # The pipeline's cascade rule, checked on the same held-out predictions (training/analysis/diagnosis_cascade.py).
        "validation_cascade": json.loads(cascade_path.read_text()) if cascade_path.exists() else None,
        "sha256": sha,
    }
    (dest / f"{MODEL_NAME}.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {dest / MODEL_NAME}.safetensors sha256 {sha}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``cache``, ``lopo`` or ``final``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m training.affinity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=("cache", "lopo", "final"))
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--out", default="runs/affinity")
    parser.add_argument("--recipe", default="training/recipes/affinity.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ship", action="store_true", help="final: write into covfast/weights")
    parser.add_argument("--weights", help="cache: folder of the Inf-Net to take features from (default: installed)")
    parser.add_argument("--zenodo", action="store_true",
                        help="cache: add the 1,600 unlabelled COVID-SemiSeg slices (20 COVID-19 patients) as COVID-19")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.command == "cache":
        cache(Path(args.data), out, args.device, weights_dir=args.weights, zenodo=args.zenodo)
        return 0
    recipe = json.loads(Path(args.recipe).read_text())
    if args.command == "lopo":
        lopo(out, recipe)
    else:
        final(out, recipe, args.recipe, args.ship)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
