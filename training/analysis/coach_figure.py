"""A picture of what the coach erases: slice, coach mask, masked input, the network's inpainting (one-off figure).

    python training/analysis/coach_figure.py runs/s10/pretrain_coach_cpu --out training/figures/coach_s10.png

Rows: held-out labelled slices (never seen by the pretraining, which uses only the unlabelled slices), each at
256 x 256 and shown at 128 px: the slice; the coach's mask M = coach_mask(score_gain * coach(x), keep, alpha) (white
= kept); the network's input x * M; its reconstruction; and the ground-truth infection outline on the slice, for
comparison with where the coach erases.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage as ndi

from covfast import ops
from covfast.nn import load_model
from training.data import load_labelled
from training.loops import standardize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="pretraining run folder (final.safetensors, coach.safetensors, final.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--slices", default="0,12,25,38", help="indices of labelled slices")
    ap.add_argument("--data", default="../shared/data/infnet-semiseg")
    args = ap.parse_args()
    run = Path(args.run)
    recipe = json.loads((run / "final.json").read_text())["recipe"]
    net, coach = load_model(run / "final.safetensors"), load_model(run / "coach.safetensors")
    labelled = load_labelled(args.data, 256, "infection")
    index = [int(i) for i in args.slices.split(",")]
    x = labelled.images[index].float() / 255.0
    with torch.no_grad():
        scores = coach(standardize(x)).float() * recipe.get("score_gain", 10.0)
        mask = ops.coach_mask(scores, recipe.get("keep", 0.75), recipe.get("alpha", 1.0))
        recon = torch.sigmoid(net(standardize(x * mask)).float())
    rows = []
    for i in range(len(index)):
        truth = labelled.targets[index[i], 0].numpy() > 0
        outline = truth & ~ndi.binary_erosion(truth, iterations=2)
        slice_rgb = np.repeat(x[i, 0].numpy()[..., None], 3, -1)
        slice_rgb[outline] = (1.0, 0.2, 0.2)
        tiles = [np.repeat(t[i, 0].numpy()[..., None], 3, -1) for t in (x, mask, x * mask, recon)] + [slice_rgb]
        row = np.concatenate([F.interpolate(torch.from_numpy(t).permute(2, 0, 1)[None], size=(128, 128),
                                            mode="bilinear", antialias=True)[0].permute(1, 2, 0).numpy()
                              for t in tiles], 1)
        rows.append(row)
    picture = Image.fromarray((np.clip(np.concatenate(rows, 0), 0, 1) * 255).astype(np.uint8))
    picture.quantize(64).save(args.out, optimize=True)  # 64 colours: grey levels and the red outline
    print(args.out)


if __name__ == "__main__":
    main()
