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
    for rule, scores in found.items():
        print(f"{rule:36s}", scores, chosen.get(rule, ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"folds": folds, "slices": len(cases), "dice_present": found, "nested_thresholds": chosen,
                       "command": shlex.join(["python", "training/analysis/mc_typing.py", *sys.argv[1:]])}, f, indent=2)


if __name__ == "__main__":
    main()
