"""Where the multi-class network loses Dice: the infected region or its GGO / consolidation typing (one-off analysis).

    python training/analysis/mc_typing.py --folds 0,1,2,3,4 --multiclass "runs/s9/multiclass_ens/fold{k}.safetensors" \
        "runs/s3/infnet_long_v2/fold{k}.safetensors" "runs/s8/unet_long_aug_v2/fold{k}.safetensors" \
        --json runs/s10/mc_typing.json

Out of fold, each fold's multi-class model with the mean of the single-class fold models as its prior (flips ``h``, as
``mc_prior_check.py``). A class map is an infected region plus a typing of its pixels; this scores, as
``dice_present`` of GGO and consolidation at each slice's native size:

* ``argmax``: the shipped rule (argmax of the three class probabilities);
* ``prior_region+net_type``: region = prior >= 0.5, consolidation where the network's p(cons) >= p(GGO);
* ``prior_region+intensity_type``: the same region, consolidation where the slice, Gaussian-smoothed (sigma 2 px),
  is at least T (8-bit lung window; consolidation is denser than GGO). T is chosen on the other four folds from
  ``--thresholds`` (nested, so out of fold);
* ``prior_region+logistic_type``: the same region, consolidation where a logistic model of (the network's
  log-ratio of p(cons) to p(GGO), the smoothed intensity) says so, fitted on the other four folds' truly infected
  pixels (nested);
* oracles: ``truth_region+net_type`` and ``truth_region+intensity_type`` (the ground truth's infected region, typed
  by the network or by intensity with the nested T), ``prior_region+truth_type`` (our region, typed by the truth;
  pixels outside the truth's region count as GGO).
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage as ndi

from covfast.evaluate import multiclass_metrics, summarize
from covfast.nn import load_model
from training.analysis.mc_prior_check import FLIPS, prior_and_classes
from training.data import MULTICLASS, cv_folds, load_labelled

CLASSES = ("ggo", "consolidation")


def class_map(region: np.ndarray, consolidation: np.ndarray) -> np.ndarray:
    """[3, H, W] one-hot class map: background outside ``region``, else consolidation or GGO."""
    labels = np.where(region, np.where(consolidation, 2, 1), 0)
    return np.stack([(labels == c).astype(np.float64) for c in range(3)])


def type_features(probs: np.ndarray, smooth: np.ndarray) -> np.ndarray:
    """[H, W, 3]: log(p(cons) / p(GGO)), the smoothed 8-bit intensity (centred, scaled), 1."""
    ratio = np.clip(probs[2] / np.maximum(probs[1] + probs[2], 1e-6), 1e-4, 1 - 1e-4)
    return np.stack([np.log(ratio / (1 - ratio)), (smooth - 128) / 40, np.ones_like(smooth)], -1)


def fit_logistic(cases) -> np.ndarray:
    """Newton-fitted logistic weights for consolidation vs GGO over the cases' ground-truth infected pixels."""
    x = np.concatenate([type_features(probs, smooth)[truth > 0] for _, truth, _, probs, smooth in cases])
    y = np.concatenate([(truth[truth > 0] == 2).astype(np.float64) for _, truth, _, _, _ in cases])
    keep = np.random.default_rng(0).choice(len(y), min(len(y), 400_000), replace=False)
    x, y, w = x[keep], y[keep], np.zeros(3)
    for _ in range(50):
        p = 1 / (1 + np.exp(-x @ w))
        hessian = (x * (p * (1 - p))[:, None]).T @ x / len(y) + 1e-6 * np.eye(3)
        w -= np.linalg.solve(hessian, x.T @ (p - y) / len(y))
    return w


def dice_present(per: list[dict]) -> dict:
    return {c: round(summarize([p[c] for p in per])["dice_present"]["mean"], 4) for c in CLASSES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("priors", nargs="+", help="single-class fold model files (averaged); {k} = fold")
    ap.add_argument("--multiclass", required=True, help="{k} = fold")
    ap.add_argument("--folds", default="0,1,2,3,4")
    ap.add_argument("--thresholds", default="110,120,130,140,150,160", help="candidate T of the intensity typing")
    ap.add_argument("--data", default="../shared/data/infnet-semiseg")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lab = load_labelled(args.data, 256, "multiclass")
    split = cv_folds(len(lab.names), 5, 0)
    folds = [int(f) for f in args.folds.split(",")]
    thresholds = [float(t) for t in args.thresholds.split(",")]
    cases = []  # (fold, truth, prior, class probabilities, smoothed image), native size
    for k in folds:
        val = lab.subset(split[k])
        with torch.no_grad():
            prior, probs = prior_and_classes([load_model(p.format(k=k)) for p in args.priors],
                                             load_model(args.multiclass.format(k=k)), val.images, FLIPS["h"])
        for i, (name, truth) in enumerate(zip(val.names, val.native_targets)):
            image = next((Path(args.data) / MULTICLASS / "Imgs").glob(f"{name}.*"))
            with Image.open(image) as im:
                grey = np.asarray(im.convert("L"), dtype=np.float32)
            prior_i, probs_i = (F.interpolate(t[i : i + 1], size=truth.shape, mode="bilinear", align_corners=False)[0]
                                .numpy() for t in (prior, probs))
            cases.append((k, truth, prior_i[0], probs_i, ndi.gaussian_filter(grey, 2)))

    def score(rule, subset, t=None):
        per = []
        for _, truth, prior, probs, smooth in subset:
            region = prior >= 0.5 if rule.startswith("prior_region") else truth > 0
            if rule == "argmax":
                onehot = np.stack([(probs.argmax(0) == c).astype(np.float64) for c in range(3)])
            elif rule.endswith("net_type"):
                onehot = class_map(region, probs[2] >= probs[1])
            elif rule.endswith("intensity_type"):
                onehot = class_map(region, smooth >= t)
            elif rule.endswith("logistic_type"):
                onehot = class_map(region, type_features(probs, smooth) @ t >= 0)
            else:  # prior_region+truth_type
                onehot = class_map(region, truth == 2)
            per.append(multiclass_metrics(onehot, truth))
        return per

    found, chosen = {}, {}
    for rule in ("argmax", "prior_region+net_type", "truth_region+net_type", "prior_region+truth_type"):
        found[rule] = dice_present(score(rule, cases))
    for rule in ("prior_region+intensity_type", "truth_region+intensity_type"):
        per = []
        for k in folds:
            train = [c for c in cases if c[0] != k]
            t = max(thresholds, key=lambda t: sum(dice_present(score(rule, train, t)).values()))
            chosen.setdefault(rule, []).append(t)
            per += score(rule, [c for c in cases if c[0] == k], t)
        found[rule] = dice_present(per)
        for t in thresholds:  # not nested: the whole curve, for reading the trade-off
            found[f"{rule}@{t:g}"] = dice_present(score(rule, cases, t))
    per = []
    for k in folds:
        weights = fit_logistic([c for c in cases if c[0] != k])
        chosen.setdefault("prior_region+logistic_type", []).append([round(float(v), 3) for v in weights])
        per += score("prior_region+logistic_type", [c for c in cases if c[0] == k], weights)
    found["prior_region+logistic_type"] = dice_present(per)
    for rule, scores in found.items():
        print(f"{rule:36s}", scores, chosen.get(rule, ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"folds": folds, "slices": len(cases), "dice_present": found, "nested_thresholds": chosen,
                       "command": shlex.join(["python", "training/analysis/mc_typing.py", *sys.argv[1:]])}, f, indent=2)


if __name__ == "__main__":
    main()
