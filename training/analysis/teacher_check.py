"""How a self-training teacher's soft labels compare with the published Semi-Inf-Net pseudo labels (one-off analysis).

    python training/analysis/teacher_check.py runs/s10/infnet_st/teacher_fold0.npz

Reads a teacher cache that ``python -m training run`` writes for recipes with ``"teacher"`` (uint8 p x 255 on the
1,600 unlabelled slices at the recipe's size) and prints: the fraction of pixels each source marks (> 0.5), the
mean per-slice Dice between the two binary masks (over slices where either marks something), how many slices the
teacher leaves empty, and the fraction of pixels where the teacher is unsure (0.2 < p < 0.8).
"""

import argparse

import numpy as np

from training.data import load_unlabelled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache", help="teacher_<fit>.npz")
    ap.add_argument("--data", default="../shared/data/infnet-semiseg")
    args = ap.parse_args()
    with np.load(args.cache) as saved:
        teacher = saved["targets"]
    pseudo = load_unlabelled(args.data, teacher.shape[-1]).targets.numpy()
    ours, theirs = teacher > 127, pseudo > 127
    total = ours.sum(axis=(1, 2, 3)) + theirs.sum(axis=(1, 2, 3))
    dice = 2 * (ours & theirs).sum(axis=(1, 2, 3)) / np.maximum(total, 1)
    print(f"marked: teacher {ours.mean():.4f}, Semi-Inf-Net {theirs.mean():.4f} of the pixels")
    print(f"mean slice Dice teacher vs Semi-Inf-Net: {dice[total > 0].mean():.3f} over {(total > 0).sum()} slices")
    print(f"slices the teacher leaves empty: {(ours.sum(axis=(1, 2, 3)) == 0).sum()} of {len(teacher)}")
    print(f"pixels with 0.2 < p < 0.8: {((teacher > 51) & (teacher < 204)).mean():.4f}")


if __name__ == "__main__":
    main()
