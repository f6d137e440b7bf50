"""Out-of-fold scores of single models, probability-averaged ensembles of them and other thresholds (one-off analysis).

    python training/analysis/ensemble_check.py --folds 0,1,2,3,4 --tta h \
        infnet=runs/s3/infnet_long/fold{k}.safetensors unet=runs/s6/unet_long_aug/fold{k}.safetensors

Each ``name=pattern`` names one model per fold (``{k}`` = fold). Every model scores only its own fold's validation
slices, so every ensemble below is out-of-fold too. Prints, pooled over the folds' slices, the metrics of each
model, of the mean probability of every subset of two or more models, and Dice of each at thresholds other
than 0.5 (calibration: a model whose best threshold is far from 0.5 loses Dice@0.5).
"""

import argparse
import itertools
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from covfast.evaluate import _interval, summarize
from covfast.nn import load_model
from training.data import cv_folds, load_labelled
from training.loops import flip_probs, score

KEYS = ("dice", "dice_mean256", "iou", "sensitivity", "specificity", "mae")
THRESHOLDS = (0.3, 0.4, 0.6)  # besides 0.5


def pipeline_oof_probs(infnet: str, partner: str | None, tta: str, data: str = "../shared/data/infnet-semiseg"):
    """Out-of-fold single-class probabilities of the labelled slices as the pipeline computes them.

    Each fold's Inf-Net (``infnet``, a path with ``{k}``), averaged with its U-Net partner (``partner``) when given,
    runs on its own validation slices through :func:`covfast.pipeline.infection.predict_slices` (Inf-Net with the
    flips of ``tta``, the partner as the pipeline runs it), at each slice's native size. Returns a list of
    ``(name, prob [H, W] float32, truth [H, W] bool)`` over the 50 slices, fold by fold.
    """
    from PIL import Image

    from covfast.evaluate import read_infection_mask
    from covfast.pipeline.infection import PARTNER, LoadedModel, predict_slices
    from training.data import LABELLED

    names = load_labelled(data, 256, "infection").names
    found = []
    for k, val in enumerate(cv_folds(len(names), 5, 0)):
        models = {"infnet": LoadedModel(load_model(infnet.format(k=k)), {})}
        if partner:
            models[PARTNER] = LoadedModel(load_model(partner.format(k=k)), {})
        for i in val:
            with Image.open(Path(data) / LABELLED / "Imgs" / f"{names[i]}.jpg") as im:
                image = np.asarray(im.convert("L"))
            prob, _ = predict_slices(models, image[None], tta=tta)
            truth = read_infection_mask(Path(data) / LABELLED / "GT" / f"{names[i]}.png") > 0
            found.append((names[i], prob[0], truth))
    return found


def paired_dice(per: dict, first: str, second: str) -> dict:
    """Mean per-slice Dice of ``first`` minus ``second`` (same slices, same order) with its 95 % interval, and on how
    many slices ``first`` is better."""
    diff = [a["dice"] - b["dice"] for a, b in zip(per[first], per[second], strict=True)]
    found = _interval(diff)
    return {"mean": round(found["mean"], 4), "ci95": [round(v, 4) for v in found["ci95"]],
            "better": sum(d > 0 for d in diff), "slices": len(diff)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="name=path pattern with {k} for the fold")
    ap.add_argument("--folds", default="0")
    ap.add_argument("--tta", default="h", choices=["none", "h", "hv"])
    ap.add_argument("--tta-of", action="append", default=[], metavar="NAME=TTA",
                    help="another test-time augmentation for one model (e.g. unet=none); repeat")
    ap.add_argument("--size-of", action="append", default=[], metavar="NAME=SIZE",
                    help="run one model at another input size than 256 (probabilities resized back); repeat")
    ap.add_argument("--data", default="../shared/data/infnet-semiseg")
    ap.add_argument("--json", help="write the pooled numbers here")
    ap.add_argument("--paired", action="append", default=[], metavar="A-B",
                    help="also the per-slice Dice difference of two labels, e.g. v2+unet-v2; repeat")
    args = ap.parse_args()
    torch.set_num_threads(1)
    specs = dict(m.split("=", 1) for m in args.models)
    tta_of = dict(m.split("=", 1) for m in args.tta_of)
    size_of = {name: int(size) for name, size in (m.split("=", 1) for m in args.size_of)}
    sets = {size: load_labelled(args.data, size, "infection") for size in {256, *size_of.values()}}
    labelled = sets[256]
    split = cv_folds(len(labelled.names), 5, 0)
    per: dict[str, list] = {}
    for k in (int(f) for f in args.folds.split(",")):
        val = labelled.subset(split[k])
        probs = {}
        for name, p in specs.items():
            images = sets[size_of.get(name, 256)].images[torch.as_tensor(split[k])]
            prob = flip_probs(load_model(p.format(k=k)), images, tta_of.get(name, args.tta))
            probs[name] = F.interpolate(prob, size=(256, 256), mode="bilinear", align_corners=False)
        combos = {name: [name] for name in specs}
        for r in range(2, len(specs) + 1):
            combos.update({"+".join(c): list(c) for c in itertools.combinations(specs, r)})
        for label, members in combos.items():
            mean = sum(probs[m] for m in members) / len(members)
            per.setdefault(label, []).extend(score(mean, val.native_targets, val.names, "infection"))
            for t in THRESHOLDS:  # Dice at another threshold: shift the probabilities so that t maps to 0.5
                shifted = (mean - t + 0.5).clamp(0, 1)
                scores = score(shifted, val.native_targets, val.names, "infection")
                per.setdefault(f"{label}@{t}", []).extend(scores)
        print(f"fold {k} done", flush=True)
    pooled = {}
    for label, scores in per.items():
        s = summarize(scores)
        pooled[label] = {"slices": len(scores), **{key: round(s[key]["mean"], 4) for key in KEYS}}
        if "@" not in label:
            pooled[label]["dice_ci95"] = [round(v, 4) for v in s["dice"]["ci95"]]
        print(label, pooled[label] if "@" not in label else {"dice": pooled[label]["dice"]})
    order = list(specs)

    def canonical(label: str) -> str:  # "xl+long" names the same ensemble as "long+xl"
        return "+".join(sorted(label.split("+"), key=order.index))

    paired = {pair: paired_dice(per, *map(canonical, pair.split("-", 1))) for pair in args.paired}
    for pair, found in paired.items():
        print("paired", pair, found)
    if args.json:
        with open(args.json, "w") as f:
            command = shlex.join(["python", "training/analysis/ensemble_check.py", *sys.argv[1:]])
            found = {"folds": args.folds, "tta": args.tta, "tta_of": tta_of, "size_of": size_of, "models": specs, "pooled": pooled,
                     "paired": paired, "command": command}
            json.dump(found, f, indent=2)


if __name__ == "__main__":
    main()
