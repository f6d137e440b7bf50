"""A multi-class fold model scored on its CV fold with the prior of given single-class fold models (one-off analysis).

    python training/analysis/mc_prior_check.py --fold 0 --tta h \
        runs/s3/infnet_long_v2/fold0.safetensors runs/s6/unet_long_aug/fold0.safetensors
    python training/analysis/mc_prior_check.py --folds 0,1,2,3,4 --multiclass "runs/s9/multiclass_ens/fold{k}.safetensors" \
        "runs/s3/infnet_long_v2/fold{k}.safetensors" "runs/s8/unet_long_aug_v2/fold{k}.safetensors"

The prior is the mean probability of the single-class models (one: that model's; two: the pipeline's ensemble), as
the infection stage feeds it to the multi-class network. With ``--tta`` both networks also run on flipped slices,
each flipped pass of the multi-class network taking the (averaged) prior flipped the same way, as the pipeline does.
Prints GGO and consolidation Dice over the fold's slices and over the slices where the class is present.
(Session 4's ``mc_tta_check.py`` is this script with the v2 model as the only prior.)
"""

import argparse
import json
import shlex
import sys

import torch

from covfast.evaluate import summarize
from covfast.nn import load_model
from training.data import cv_folds, load_labelled
from training.loops import predict, score

FLIPS = {"none": [], "h": [(-1,)], "hv": [(-1,), (-2,)]}


def prior_and_classes(priors: list, multi, x: torch.Tensor, flips: list) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, 1, S, S] prior, [N, 3, S, S] class probabilities): the mean probability of ``priors`` over the flips, and
    ``multi``'s class probabilities with it as its prior."""
    def single(t: torch.Tensor) -> torch.Tensor:
        return sum(predict(m, t, "infection") for m in priors) / len(priors)

    prior = (single(x) + sum(single(x.flip(d)).flip(d) for d in flips)) / (1 + len(flips))
    out = predict(multi, x, "multiclass", prior)
    out = out + sum(predict(multi, x.flip(d), "multiclass", prior.flip(d)).flip(d) for d in flips)
    return prior, out / (1 + len(flips))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("priors", nargs="+", help="single-class fold model files (averaged); {k} = fold")
    ap.add_argument("--multiclass", default="runs/cpu/multiclass_cpu/fold0.safetensors", help="{k} = fold")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--folds", help="comma-separated folds, pooled (overrides --fold)")
    ap.add_argument("--tta", default="h", choices=tuple(FLIPS))
    ap.add_argument("--data", default="../shared/data/infnet-semiseg")
    ap.add_argument("--json", help="write the pooled scores here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lab = load_labelled(args.data, 256, "multiclass")
    split = cv_folds(len(lab.names), 5, 0)
    folds = [int(f) for f in args.folds.split(",")] if args.folds else [args.fold]
    per = []
    for k in folds:
        val = lab.subset(split[k])
        with torch.no_grad():
            _, probs = prior_and_classes([load_model(p.format(k=k)) for p in args.priors],
                                     load_model(args.multiclass.format(k=k)), val.images, FLIPS[args.tta])
        per += score(probs, val.native_targets, val.names, "multiclass")
    found = {}
    for cls in ("ggo", "consolidation"):
        s = summarize([p[cls] for p in per])
        found[cls] = {"dice": round(s["dice"]["mean"], 4), "dice_present": round(s["dice_present"]["mean"], 4),
                      "dice_present_ci95": [round(v, 4) for v in s["dice_present"]["ci95"]],
                      "present_slices": s["dice_present"]["n"]}
        print(cls, "dice", round(s["dice"]["mean"], 3), "dice_present", round(s["dice_present"]["mean"], 3),
              f"({s['dice_present']['n']} slices)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"folds": folds, "slices": len(per), "tta": args.tta, "priors": args.priors,
                       "multiclass": args.multiclass, "scores": found,
                       "command": shlex.join(["python", "training/analysis/mc_prior_check.py", *sys.argv[1:]])},
                      f, indent=2)


if __name__ == "__main__":
    main()
