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

The segmentation stage is the shipped Inf-Net, frozen: the paper alternates segmentation and classification
training and copies the segmentation weights into the classification branch; here the branch shares the
backbone by reference, so the copy is exact and only the head trains (a CPU budget of minutes).

Validation is leave-one-patient-out over the three COVID-CT-MD patients (one per class): each fold trains on every
other source, so the held-out patient's class is still learned from another patient (P001 -> the MedSeg slices;
cap001 -> CC-CCII; normal001 -> the infection-free slices of P001 and cap001).

Usage (from the repository root):
    python -m training.affinity cache --data ../shared/data --out runs/affinity
    python -m training.affinity lopo --recipe training/recipes/affinity.json --out runs/affinity
    python -m training.affinity final --recipe training/recipes/affinity.json --out runs/affinity --ship
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from covfast.nn.affinity import CLASSES, AffinityHead
from covfast.pipeline.diagnosis import MODEL_NAME, RoiFeatures, aggregate, class_probs, slice_view

CT_MD_CASES = {"P001": "covid", "cap001": "pneumonia", "normal001": "normal"}
CCCCII_SCANS = ("3131", "3132", "3133")
CCCCII_WINDOW_HU = (-1200.0, 0.0)
CCCCII_SPACING_MM = (1.0, 0.7, 0.7)
LOPO_PATIENTS = tuple(CT_MD_CASES)


def _infnet(device: str, weights_dir: str | Path | None = None):
    from covfast.pipeline.infection import SINGLE_CLASS, WEIGHTS_DIR, load_models

    return load_models(device, multiclass=False, weights_dir=weights_dir or WEIGHTS_DIR)[SINGLE_CLASS]


def _cache_backbone(out: Path) -> dict:
    """Name and SHA-256 of the Inf-Net whose backbone made ``out/cache`` (the installed one for caches from before
    ``cache_backbone.json`` was written)."""
    from covfast.pipeline.infection import SINGLE_CLASS

    path = out / "cache_backbone.json"
    if path.exists():
        return json.loads(path.read_text())
    return {"name": SINGLE_CLASS, "sha256": _infnet("cpu").card["sha256"]}


@torch.no_grad()
def _roi_batch(infnet, extractor: RoiFeatures, views: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """8-bit views -> (RoI features [N, beta, 65, 28, 28] float16, lesion counts), Inf-Net probability on the view."""
    from covfast.nn.preprocess import to_input

    x = torch.cat([to_input(torch.from_numpy(v)[None, None]) for v in views])
    prob = torch.sigmoid(infnet.model(x).prediction.float())
    rois, counts = extractor(x, prob)
    return rois.half().numpy(), counts


def _volume_views(hu: np.ndarray, lung: np.ndarray) -> list[tuple[int, np.ndarray]]:
    return [(z, found[0]) for z in range(hu.shape[0]) if (found := slice_view(hu[z], lung[z])) is not None]


def _ct_md_labels(info: dict, z_mm: np.ndarray) -> np.ndarray:
    """Radiologist slice labels on the canonical slices, matched by slice location (tolerance 1 mm)."""
    location = np.asarray(info["slice_location_mm"], dtype=np.float64)
    nearest = np.abs(location[None, :] - z_mm[:, None]).argmin(axis=1)
    if np.abs(location[nearest] - z_mm).max() > 1.0:
        raise ValueError("slice locations of labels.json do not match the volume's slices")
    return np.asarray(info["infection_slice_labels"], dtype=bool)[nearest]


def cache(data: Path, out: Path, device: str = "cpu", batch: int = 16, weights_dir: str | Path | None = None) -> None:
    """Compute and store RoI features and labels of every source slice under ``out/cache``, with the Inf-Net of
    ``weights_dir`` (default: the installed one), whose name and SHA-256 go to ``out/cache_backbone.json``."""
    from PIL import Image

    from covfast.io import load_volume
    from covfast.pipeline.lung import lung_mask

    infnet = _infnet(device, weights_dir)
    extractor = RoiFeatures(infnet.model.backbone, device=device)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    backbone = {"name": infnet.card["name"], "sha256": infnet.card["sha256"], "weights": str(infnet.card["file"])}
    (out / "cache_backbone.json").write_text(json.dumps(backbone, indent=2) + "\n")

    def store(name: str, views: list[np.ndarray], meta: dict) -> list[int]:
        feats, counts = [], []
        for start in range(0, len(views), batch):
            f, c = _roi_batch(infnet, extractor, views[start : start + batch])
            feats.append(f)
            counts += c
        np.save(out / "cache" / f"{name}.npy", np.concatenate(feats))
        (out / "cache" / f"{name}.json").write_text(json.dumps({**meta, "lesions": counts}))
        print(f"{name}: {len(views)} slices", flush=True)
        return counts

    semiseg = data / "infnet-semiseg/TrainingSet/LungInfection-Train/Doctor-label/Imgs"
    images = sorted(semiseg.glob("*.jpg"))
    views = [np.array(Image.open(p).convert("L")) for p in images]
    store(
        "infnet",
        views,
        {
            "patient": "medseg",
            "cls": ["covid"] * len(views),
            "scored": [False] * len(views),
            "slice": [p.name for p in images],
        },
    )
    labels = json.loads((data / "covid-ct-md/labels.json").read_text())
    for case, cls in CT_MD_CASES.items():
        volume = load_volume(data / "covid-ct-md" / case)
        lung = lung_mask(volume.hu, volume.spacing_mm)
        infected = _ct_md_labels(labels[case], np.asarray(volume.z_mm))
        work = _volume_views(volume.hu, lung)
        slice_cls = [cls if infected[z] or cls == "normal" else "normal" for z, _ in work]
        scored = [bool(infected[z]) or cls == "normal" for z, _ in work]
        store(
            case,
            [v for _, v in work],
            {
                "patient": case,
                "cls": slice_cls,
                "scored": scored,
                "infected": [bool(infected[z]) for z, _ in work],
                "slice": [int(z) for z, _ in work],
            },
        )
    lo, hi = CCCCII_WINDOW_HU
    for scan in CCCCII_SCANS:
        files = sorted(glob.glob(str(data / "ccccii-cp/CP/0" / scan / "*.png")))
        grey = np.stack([np.asarray(Image.open(f).convert("L")) for f in files]).astype(np.float32)
        hu = np.round(lo + grey * (hi - lo) / 255.0).astype(np.int16)
        work = _volume_views(hu, lung_mask(hu, CCCCII_SPACING_MM))
        store(
            f"ccccii_{scan}",
            [v for _, v in work],
            {
                "patient": "ccccii",
                "cls": ["pneumonia"] * len(work),
                "scored": [False] * len(work),
                "slice": [int(z) for z, _ in work],
            },
        )


def load_cache(out: Path) -> tuple[np.ndarray, list[dict]]:
    """All cached slices: (features [N, beta, 65, 28, 28] float16 memmap-backed array, per-slice records).

    CC-CCII slices without a lesion instance are dropped (their class is unknown).
    """
    feats, rows = [], []
    for meta_path in sorted((out / "cache").glob("*.json")):
        meta = json.loads(meta_path.read_text())
        f = np.load(meta_path.with_suffix(".npy"), mmap_mode="r")
        keep = [i for i in range(len(meta["cls"])) if meta["patient"] != "ccccii" or meta["lesions"][i] > 0]
        feats.append(np.asarray(f[keep]))
        for i in keep:
            rows.append(
                {
                    "source": meta_path.stem,
                    "patient": meta["patient"],
                    "cls": meta["cls"][i],
                    "scored": meta["scored"][i],
                    "infected": meta.get("infected", [None] * len(meta["cls"]))[i],
                    "slice": meta["slice"][i],
                }
            )
    return np.concatenate(feats), rows


def _head(recipe: dict) -> AffinityHead:
    return AffinityHead(**recipe["model"])


def train(feats: np.ndarray, rows: list[dict], index: np.ndarray, recipe: dict, log=print) -> AffinityHead:
    """Train a head on the slices ``index`` with per-class BCE, classes balanced by sampling weights."""
    opt_cfg = recipe["optim"]
    torch.manual_seed(recipe["seed"])
    rng = np.random.default_rng(recipe["seed"])
    model = _head(recipe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt_cfg["lr"], weight_decay=opt_cfg["weight_decay"])
    targets = np.array([CLASSES.index(rows[i]["cls"]) for i in index])
    weights = 1.0 / np.bincount(targets, minlength=3)[targets]
    weights /= weights.sum()
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


def lopo(out: Path, recipe: dict) -> dict:
    """Leave-one-patient-out over the COVID-CT-MD patients; pooled slice metrics and a diagnosis per volume."""
    feats, rows = load_cache(out)
    patients = np.array([r["patient"] for r in rows])
    scored_truth, scored_probs, volumes = [], [], {}
    for held in LOPO_PATIENTS:
        t0 = time.perf_counter()
        model = train(feats, rows, np.flatnonzero(patients != held), recipe, log=lambda m, h=held: print(h, m))
        test = np.flatnonzero(patients == held)
        probs = predict(model, feats, test)
        scored = np.array([rows[i]["scored"] for i in test])
        scored_truth += [rows[i]["cls"] for i in test[scored]]
        scored_probs.append(probs[scored])
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
    }
    (out / "lopo.json").write_text(json.dumps(result, indent=2))
    return result


def final(out: Path, recipe: dict, recipe_path: str, ship: bool) -> None:
    """Train on every cached slice; with ``ship`` write covfast/weights/affinity.{safetensors,json}.

    The card records the SHA-256 of the infnet whose backbone made the cached features (``cache_backbone.json``
    beside the cache): the diagnosis stage refuses the head beside any other infnet.
    """
    from covfast.nn import count_parameters, save_model
    from covfast.pipeline.infection import WEIGHTS_DIR

    feats, rows = load_cache(out)
    t0 = time.perf_counter()
    model = train(feats, rows, np.arange(len(rows)), recipe)
    seconds = time.perf_counter() - t0
    dest = Path("covfast/weights") if ship else out
    backbone = _cache_backbone(out)
    weights_arg = ""
    if backbone.get("weights") and Path(backbone["weights"]).resolve().parent != WEIGHTS_DIR.resolve():
        weights_arg = f" --weights {Path(backbone['weights']).parent}"
    sha = save_model(model, dest / f"{MODEL_NAME}.safetensors", MODEL_NAME, recipe["model"])
    lopo_path = out / "lopo.json"
    card = {
        "name": MODEL_NAME,
        "task": "diagnosis",
        "architecture": {"arch": MODEL_NAME, "config": recipe["model"]},
        "params": count_parameters(model),
        "input": "RoI features of the shipped infnet backbone (stage 2 + infection probability, 65 x 28 x 28, "
        "beta RoIs per slice); see covfast/pipeline/diagnosis.py",
        "classes": list(CLASSES),
        "backbone": {key: value for key, value in backbone.items() if key in ("name", "sha256")},
        "data": {src: sum(r["source"] == src for r in rows) for src in sorted({r["source"] for r in rows})},
        "recipe": recipe,
        "command": f"python -m training.affinity cache --data ../shared/data --out {out}{weights_arg} && "
        "python -m training.affinity "
        f"lopo --recipe {recipe_path} --out {out} && python -m training.affinity final --recipe "
        f"{recipe_path} --out {out} --ship",
        "training": {"device": "cpu", "seconds": seconds},
        "validation": json.loads(lopo_path.read_text()) if lopo_path.exists() else None,
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
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.command == "cache":
        cache(Path(args.data), out, args.device, weights_dir=args.weights)
        return 0
    recipe = json.loads(Path(args.recipe).read_text())
    if args.command == "lopo":
        lopo(out, recipe)
    else:
        final(out, recipe, args.recipe, args.ship)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
