"""Out-of-fold lesion-instance AP of the instance rule's variants (minimum area, score) on the labelled slices.

    python training/analysis/instance_rules.py runs/s3/infnet_long_v2/fold{k}.safetensors --tta h \
        [--partner runs/s8/unet_long_aug_v2/fold{k}.safetensors]

Each fold's model scores only its own validation slices (5-fold split of ``training.data.cv_folds``), at the
slices' native size as ``covfast evaluate-slices --task instances`` does (with ``--partner``, on the mean probability
of the two models, the partner run as the pipeline runs it). Variants: the minimum instance area in
pixels and the instance score (mean probability, the shipped rule; maximum probability; mean probability times
an area factor 1 - exp(-area / a0)). One-off analysis: the rule is chosen on these 50 slices, so its numbers here
are optimistic.
"""

import argparse
import json

import numpy as np
import torch
from PIL import Image

from covfast.evaluate import read_infection_mask
from covfast.instances import Instance, _box, components, slice_ap, truth_instances
from covfast.nn import load_model
from covfast.pipeline.infection import PARTNER, LoadedModel, predict_slices
from training.data import cv_folds, load_labelled

DATA = "../shared/data/infnet-semiseg/TrainingSet/LungInfection-Train/Doctor-label"


def instances(prob: np.ndarray, min_area: int, score: str) -> list[Instance]:
    found = []
    for m in components(prob >= 0.5, min_area):
        p = prob[m]
        if score == "mean":
            s = p.mean()
        elif score == "max":
            s = p.max()
        else:  # "mean*area<a0>"
            a0 = float(score.split("area")[1])
            s = p.mean() * (1 - np.exp(-m.sum() / a0))
        found.append(Instance(_box(m), float(s), m))
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("pattern", help="fold model path with {k}")
    ap.add_argument("--tta", default="h")
    ap.add_argument("--partner", help="fold model path with {k} of a U-Net partner averaged in")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = load_labelled("../shared/data/infnet-semiseg", 256, "infection").names
    split = cv_folds(len(names), 5, 0)
    cases = []
    for k in range(5):
        model = {"infnet": LoadedModel(load_model(args.pattern.format(k=k)), {})}
        if args.partner:
            model[PARTNER] = LoadedModel(load_model(args.partner.format(k=k)), {})
        for i in split[k]:
            name = names[i]
            image = np.asarray(Image.open(f"{DATA}/Imgs/{name}.jpg").convert("L"))
            truth = read_infection_mask(f"{DATA}/GT/{name}.png")
            prob, _ = predict_slices(model, image[None], tta=args.tta)
            cases.append((prob[0], truth_instances(truth)))
    variants = [(a, s) for a in (0, 10, 20, 40, 80, 160) for s in ("mean", "max", "mean*area100", "mean*area400")]
    out = {}
    for min_area, score in variants:
        aps = np.array([slice_ap(instances(p, min_area, score), gt) for p, gt in cases])
        out[f"min_area={min_area} score={score}"] = {
            "ap50": round(float(aps[:, 0].mean()), 4),
            "ap75": round(float(aps[:, 5].mean()), 4),
            "map": round(float(aps.mean()), 4),
        }
        print(f"min_area={min_area:4d} score={score:14s}", out[f"min_area={min_area} score={score}"], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pattern": args.pattern, "partner": args.partner, "tta": args.tta, "slices": len(cases), "variants": out}, f, indent=2)


if __name__ == "__main__":
    main()
