"""Fold-k Dice of a model file with and without flip test-time augmentation (one-off analysis)."""

import sys

import torch

from covfast.evaluate import summarize
from covfast.nn import load_model
from training.data import cv_folds, load_labelled
from training.loops import flip_probs, score

torch.set_num_threads(1)
data = "../shared/data/infnet-semiseg"
labelled = load_labelled(data, 256, "infection")
out = {}
for spec in sys.argv[1:]:
    path, fold = spec.rsplit(":", 1)
    fold = int(fold)
    val = labelled.subset(cv_folds(len(labelled.names), 5, 0)[fold])
    model = load_model(path)
    passes = {name: flip_probs(model, val.images, tta) for name, tta in (("plain", "none"), ("hflip", "h"),
                                                                             ("hvflip", "hv"))}
    for name, probs in passes.items():
        s = summarize(score(probs, val.native_targets, val.names, "infection"))
        out.setdefault(name, []).extend(score(probs, val.native_targets, val.names, "infection"))
        print(
            path,
            fold,
            name,
            {
                k: round(s[k]["mean"], 4)
                for k in ("dice", "dice_mean256", "sensitivity", "specificity", "mae", "s_measure", "e_measure")
            },
            flush=True,
        )
for name, per in out.items():
    s = summarize(per)
    print(
        "pooled",
        name,
        len(per),
        {
            k: round(s[k]["mean"], 4)
            for k in ("dice", "dice_mean256", "sensitivity", "specificity", "mae", "s_measure", "e_measure")
        },
    )
