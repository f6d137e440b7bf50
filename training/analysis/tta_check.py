"""Fold-k Dice of a model file with and without flip test-time augmentation (one-off analysis)."""

import sys

import torch

from covfast.evaluate import summarize
from covfast.nn import load_model
from training.data import cv_folds, load_labelled
from training.loops import predict, score

torch.set_num_threads(1)
data = "../shared/data/infnet-semiseg"
labelled = load_labelled(data, 256, "infection")
out = {}
for spec in sys.argv[1:]:
    path, fold = spec.rsplit(":", 1)
    fold = int(fold)
    val = labelled.subset(cv_folds(len(labelled.names), 5, 0)[fold])
    model = load_model(path)
    with torch.no_grad():
        p = predict(model, val.images, "infection")
        pf = predict(model, val.images.flip(-1), "infection").flip(-1)
        pv = predict(model, val.images.flip(-2), "infection").flip(-2)
    for name, probs in (("plain", p), ("hflip", (p + pf) / 2), ("hvflip", (p + pf + pv) / 3)):
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
