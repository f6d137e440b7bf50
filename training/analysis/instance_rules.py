"""Out-of-fold lesion-instance AP of the instance rule's variants (minimum area, score) on the labelled slices.

    python training/analysis/instance_rules.py runs/s3/infnet_long_v2/fold{k}.safetensors --tta h \
        [--partner runs/s8/unet_long_aug_v2/fold{k}.safetensors]

Each fold's model scores only its own validation slices (5-fold split of ``training.data.cv_folds``), at the
slices' native size as ``covfast evaluate-slices --task instances`` does (with ``--partner``, on the mean probability
of the two models, the partner run as the pipeline runs it). Variants: the minimum instance area in
pixels and the instance score (mean probability, the shipped rule; maximum probability; mean probability times
an area factor 1 - exp(-area / a0)); with ``--split``, also the shipped rule with each component split where an
erosion by r pixels separates it (its pixels go to the nearest eroded part; r = 1, 2, 3, 5), with and without the
whole component kept as a lower-scored extra detection, components of other probability thresholds, and how the ground truth's components sit against the
predicted ones (covered by one that also covers other ground-truth components, covered alone but at IoU < 0.5,
not covered). With ``--oracle``, two bounds that no instance rule can pass: the predicted mask cut into parts by
the nearest ground-truth component (every splitting rule's best case on these masks), and the components of the
ground truth itself after a morphological closing of radius r (what merging neighbouring patches alone costs a
perfect mask). One-off analysis: the rule is chosen on these 50 slices, so its numbers here are optimistic.
"""

import argparse
import json

import numpy as np
import torch
from scipy import ndimage as ndi

from covfast.instances import Instance, _box, components, extract_instances, mask_iou, slice_ap, truth_instances
from training.analysis.ensemble_check import pipeline_oof_probs


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


def ap_summary(aps: list) -> dict:
    """Mean AP50, AP75 and mAP over slices of :func:`covfast.instances.slice_ap` results."""
    aps = np.array(aps)
    return {"ap50": round(float(aps[:, 0].mean()), 4), "ap75": round(float(aps[:, 5].mean()), 4),
            "map": round(float(aps.mean()), 4)}


def split_instances(prob: np.ndarray, radius: int, keep_whole: bool) -> list[Instance]:
    """The shipped rule's instances, each split into the parts an erosion by ``radius`` pixels separates."""
    found = []
    for comp in components(prob >= 0.5, 20):
        core, n = ndi.label(ndi.binary_erosion(comp, np.ones((3, 3), bool), iterations=radius), np.ones((3, 3), bool))
        if n <= 1:
            found.append(Instance(_box(comp), float(prob[comp].mean()), comp))
            continue
        _, (rows, cols) = ndi.distance_transform_edt(core == 0, return_indices=True)
        nearest = core[rows, cols]
        for part in ((nearest == j) & comp for j in range(1, n + 1)):
            if part.sum() >= 20:
                found.append(Instance(_box(part), float(prob[part].mean()), part))
        if keep_whole:
            found.append(Instance(_box(comp), 0.5 * float(prob[comp].mean()), comp))
    return found


def oracle_partition(prob: np.ndarray, truth: list[Instance]) -> list[Instance]:
    """The mask ``prob >= 0.5`` cut by the nearest ground-truth component: an upper bound of any splitting rule."""
    mask = prob >= 0.5
    if not truth or not mask.any():
        return extract_instances(prob)
    labels = np.zeros(mask.shape, np.int32)
    for j, inst in enumerate(truth, 1):
        labels[inst.mask] = j
    _, (rows, cols) = ndi.distance_transform_edt(labels == 0, return_indices=True)
    nearest = labels[rows, cols]
    parts = ((nearest == j) & mask for j in range(1, len(truth) + 1))
    return [Instance(_box(m), float(prob[m].mean()), m) for m in parts if m.any()]


def closed_truth(truth: list[Instance], shape: tuple[int, int], radius: int) -> list[Instance]:
    """Components of the ground truth after a closing with a disk of ``radius`` pixels, as detections."""
    mask = np.zeros(shape, bool)
    for inst in truth:
        mask |= inst.mask
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    closed = ndi.binary_closing(np.pad(mask, radius), x * x + y * y <= radius * radius)[radius:-radius, radius:-radius]
    return [Instance(_box(m), 1.0, m) for m in components(closed | mask, 1)]


def coverage(cases) -> dict:
    """How the ground-truth components sit against the predicted instances (shipped rule)."""
    out = {"truth_components": 0, "merged": 0, "covered_low_iou": 0, "matched_iou50": 0, "not_covered": 0}
    for prob, truth in cases:
        pred = [inst.mask for inst in extract_instances(prob)]
        for j, g in enumerate(inst.mask for inst in truth):
            out["truth_components"] += 1
            share = np.array([(p & g).sum() / g.sum() for p in pred])
            owners = np.flatnonzero(share > 0.5)
            if not len(owners):
                out["not_covered"] += 1
                continue
            owner = pred[owners[0]]
            if mask_iou([owner], [g])[0, 0] >= 0.5:
                out["matched_iou50"] += 1
            elif sum((owner & t.mask).sum() / t.mask.sum() > 0.5 for t in truth) > 1:
                out["merged"] += 1
            else:
                out["covered_low_iou"] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("pattern", help="fold model path with {k}")
    ap.add_argument("--tta", default="h")
    ap.add_argument("--partner", help="fold model path with {k} of a U-Net partner averaged in")
    ap.add_argument("--split", action="store_true", help="also the erosion-split variants and the coverage counts")
    ap.add_argument("--oracle", action="store_true", help="also the bounds: oracle split and closed ground truth")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = [(prob, truth_instances(truth))
             for _, prob, truth in pipeline_oof_probs(args.pattern, args.partner, args.tta)]
    variants = [(a, s) for a in (0, 10, 20, 40, 80, 160) for s in ("mean", "max", "mean*area100", "mean*area400")]
    out = {}
    for min_area, score in variants:
        out[f"min_area={min_area} score={score}"] = ap_summary([slice_ap(instances(p, min_area, score), gt)
                                                                for p, gt in cases])
        print(f"min_area={min_area:4d} score={score:14s}", out[f"min_area={min_area} score={score}"], flush=True)
    if args.split:
        for radius in (1, 2, 3, 5):
            for keep in (False, True):
                key = f"split r={radius}" + (" +whole" if keep else "")
                out[key] = ap_summary([slice_ap(split_instances(p, radius, keep), gt) for p, gt in cases])
                print(key, out[key], flush=True)
        for threshold in (0.3, 0.4, 0.6, 0.7, 0.8, 0.9):
            key = f"threshold={threshold}"
            out[key] = ap_summary([slice_ap(extract_instances(p, threshold=threshold), gt) for p, gt in cases])
            print(key, out[key], flush=True)
        out["coverage"] = coverage(cases)
        print("coverage", out["coverage"])
    if args.oracle:
        out["oracle split"] = ap_summary([slice_ap(oracle_partition(p, gt), gt) for p, gt in cases])
        print("oracle split", out["oracle split"], flush=True)
        for radius in (3, 6, 10):
            key = f"closed truth r={radius}"
            out[key] = ap_summary([slice_ap(closed_truth(gt, p.shape, radius), gt) for p, gt in cases])
            print(key, out[key], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pattern": args.pattern, "partner": args.partner, "tta": args.tta, "slices": len(cases), "variants": out}, f, indent=2)


if __name__ == "__main__":
    main()
