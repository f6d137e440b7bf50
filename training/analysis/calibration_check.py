"""Is the shipped ensemble's out-of-fold probability calibrated? Reliability deciles and sharpening (one-off analysis).

    python training/analysis/calibration_check.py --infnet "runs/s3/infnet_long_v2/fold{k}.safetensors" \
        --partner "runs/s8/unet_long_aug_v2/fold{k}.safetensors" --json runs/s10/calibration.json

Each fold's Inf-Net (flips ``h``) and U-Net partner (one pass) run through the pipeline's slice code on their own
validation slices, at native size (:func:`training.analysis.ensemble_check.pipeline_oof_probs`). Prints, over all
pixels of the 50 slices: per probability decile the mean probability and the fraction of infected pixels; and for
a sharpening p -> sigmoid(k logit p) (k = 1: as shipped) the pixel log-loss, the pooled pixel MAE and the mean
per-slice MAE (``covfast evaluate-slices``'s convention). Dice at 0.5 does not depend on k.
"""

import argparse
import itertools
import json

import numpy as np
import torch

from training.analysis.ensemble_check import pipeline_oof_probs

SHARPENING = (0.8, 1.0, 1.5, 2.0, 3.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--infnet", required=True, help="fold model path with {k}")
    ap.add_argument("--partner", help="fold model path with {k} of the U-Net partner")
    ap.add_argument("--data", default="../shared/data/infnet-semiseg")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = pipeline_oof_probs(args.infnet, args.partner, "h", args.data)
    probs, truths = [prob.astype(np.float64) for _, prob, _ in cases], [truth for _, _, truth in cases]
    p, g = np.concatenate([q.ravel() for q in probs]), np.concatenate([t.ravel() for t in truths])
    deciles = []
    for lo in np.arange(0, 1, 0.1):
        inside = (p >= lo) & ((p < lo + 0.1) if lo < 0.85 else (p <= 1))
        deciles.append({"from": round(float(lo), 1), "pixels": int(inside.sum()), "mean_p": round(float(p[inside].mean()), 4),
                        "infected_fraction": round(float(g[inside].mean()), 4)})
        print(deciles[-1])
    logit = np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1))
    sharpened = {}
    for k in SHARPENING:
        q = np.clip(1 / (1 + np.exp(-k * logit)), 1e-7, 1 - 1e-7)
        offsets = np.cumsum([0] + [t.size for t in truths])
        per_slice = [np.abs(q[a:b] - g[a:b]).mean() for a, b in itertools.pairwise(offsets)]
        sharpened[str(k)] = {"log_loss": round(float(-(g * np.log(q) + (1 - g) * np.log(1 - q)).mean()), 4),
                             "pixel_mae": round(float(np.abs(q - g).mean()), 4),
                             "mean_slice_mae": round(float(np.mean(per_slice)), 4)}
        print("k", k, sharpened[str(k)])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"infnet": args.infnet, "partner": args.partner, "deciles": deciles, "sharpening": sharpened},
                      f, indent=2)


if __name__ == "__main__":
    main()
