"""Multi-class fold-0 model on CV fold 0 (prior: shipped v2), plain vs flip TTA of both networks."""

import torch

from covfast.evaluate import summarize
from covfast.nn import load_model
from training.data import cv_folds, load_labelled
from training.loops import predict, score

torch.set_num_threads(1)
lab = load_labelled("../shared/data/infnet-semiseg", 256, "multiclass")
vs = lab.subset(cv_folds(len(lab.names), 5, 0)[0])
single = load_model("runs/cpu/infnet_v2_shipped/fold0.safetensors")
multi = load_model("runs/cpu/multiclass_cpu/fold0.safetensors")


def run(x, flips):
    p = predict(single, x, "infection")
    p = (p + sum(predict(single, x.flip(d), "infection").flip(d) for d in flips)) / (1 + len(flips))
    # the prior of each flipped pass is the (averaged) prior flipped the same way
    m = predict(multi, x, "multiclass", p)
    m = (m + sum(predict(multi, x.flip(d), "multiclass", p.flip(d)).flip(d) for d in flips)) / (1 + len(flips))
    return m


with torch.no_grad():
    for name, flips in (("plain", []), ("h", [(-1,)]), ("hv", [(-1,), (-2,)])):
        per = score(run(vs.images, flips), vs.native_targets, vs.names, "multiclass")
        out = {
            c: (
                round(summarize([p[c] for p in per])["dice"]["mean"], 3),
                round(summarize([p[c] for p in per])["dice_present"]["mean"], 3),
            )
            for c in ("ggo", "consolidation")
        }
        print(name, out, flush=True)
