"""What int8 onnxruntime graphs do to the shipped ensemble's accuracy, out of fold (one-off analysis).

    python training/analysis/int8_check.py --folds 0,1,2,3,4 --tta h \
        --infnet runs/s3/infnet_long_v2/fold{k}.safetensors --partner runs/s8/unet_long_aug_v2/fold{k}.safetensors \
        --multiclass runs/cpu/multiclass_cpu/fold0.safetensors --json runs/s9/int8_check.json

For each fold, the fold's Inf-Net and U-Net partner are exported to ONNX and quantized as ``covfast infer --precision
int8`` quantizes the shipped ones (:mod:`covfast.engine.quantize`: calibrated on the shipped sample volume, which no
labelled slice comes from), and both versions run the fold's validation slices through the pipeline's own network
code (:func:`covfast.pipeline.infection._run_networks`: Inf-Net with the ``--tta`` flips, the partner one pass,
probabilities averaged). Prints pooled metrics of float32 and int8, their paired Dice difference and how many mask
pixels differ. With ``--multiclass`` (a fold-0 model), fold 0 also scores GGO / consolidation with each precision,
the multi-class network taking the ensemble's prior as in the pipeline.
"""

import argparse
import json
import shlex
import sys
import tempfile

import torch

from covfast.engine.quantize import ensure_int8_onnx, sample_calibration_slices
from covfast.engine.runtime import OnnxRuntimeEngine, ensure_onnx
from covfast.evaluate import summarize
from covfast.pipeline import infection as inf
from training.analysis.ensemble_check import KEYS, paired_dice
from training.data import cv_folds, load_labelled
from training.loops import model_inputs, score, standardize


def engines_for(files: dict, out_dir: str, calibration: dict) -> dict:
    """{precision: {pipeline model name: onnxruntime engine}} for fp32 and int8 of ``files`` ({name: weights});
    ``calibration``: {name: (key, function returning calibration inputs)}."""
    found = {"fp32": {}, "int8": {}}
    for name, path in files.items():
        found["fp32"][name] = OnnxRuntimeEngine(ensure_onnx(path, out_dir)["path"])
        found["int8"][name] = OnnxRuntimeEngine(ensure_int8_onnx(path, out_dir, calibration[name])["path"])
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--infnet", required=True, help="Inf-Net fold weights, {k} = fold")
    ap.add_argument("--partner", required=True, help="U-Net partner fold weights, {k} = fold")
    ap.add_argument("--multiclass", help="fold-0 multi-class weights")
    ap.add_argument("--folds", default="0,1,2,3,4")
    ap.add_argument("--tta", default="h", choices=inf.TTA_CHOICES)
    ap.add_argument("--data", default="../shared/data/infnet-semiseg")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    labelled = load_labelled(args.data, 256, "infection")
    split = cv_folds(len(labelled.names), 5, 0)
    sample = torch.from_numpy(sample_calibration_slices())
    per: dict[str, list] = {}
    differing = {"pixels": 0, "of": 0}
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in (int(f) for f in args.folds.split(",")):
            files = {inf.SINGLE_CLASS: args.infnet.format(k=k), inf.PARTNER: args.partner.format(k=k)}
            engines = engines_for(files, f"{tmp}/fold{k}", {name: ("sample", sample.numpy) for name in files})
            val = labelled.subset(split[k])
            x = standardize(model_inputs(val.images, None))
            masks = {}
            for precision, members in engines.items():
                prob, _, _, own = inf._run_networks(inf._runners(members, args.tta), x)
                per.setdefault(precision, []).extend(score(prob, val.native_targets, val.names, "infection"))
                per.setdefault(f"{precision} infnet alone", []).extend(
                    score(own, val.native_targets, val.names, "infection"))
                masks[precision] = prob > 0.5
            differing["pixels"] += int((masks["fp32"] != masks["int8"]).sum())
            differing["of"] += masks["fp32"].numel()
            if args.multiclass and k == 0:
                results["multiclass_fold0"] = multiclass_scores(args, engines, files, sample, f"{tmp}/fold0")
            print(f"fold {k} done", flush=True)
    pooled = {}
    for label, scores in per.items():
        s = summarize(scores)
        pooled[label] = {"slices": len(scores), **{key: round(s[key]["mean"], 4) for key in KEYS},
                         "dice_ci95": [round(v, 4) for v in s["dice"]["ci95"]]}
        print(label, pooled[label])
    results.update(pooled=pooled, paired={"int8-fp32": paired_dice(per, "int8", "fp32"),
                                          "int8 alone-fp32 alone": paired_dice(per, "int8 infnet alone",
                                                                               "fp32 infnet alone")},
                   mask_pixels_differing=differing)
    print("paired", results["paired"], "mask pixels differing", differing)
    if "multiclass_fold0" in results:
        print("multiclass fold 0", results["multiclass_fold0"])
    if args.json:
        results["command"] = shlex.join(["python", "training/analysis/int8_check.py", *sys.argv[1:]])
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def multiclass_scores(args, engines: dict, files: dict, sample: torch.Tensor, out_dir: str) -> dict:
    """GGO / consolidation Dice on fold 0 with all three networks in float32, and all three in int8."""
    lab = load_labelled(args.data, 256, "multiclass")
    val = lab.subset(cv_folds(len(lab.names), 5, 0)[0])
    x = standardize(model_inputs(val.images, None))
    def calibration():
        return inf.multiclass_calibration(engines["fp32"], sample, args.tta)

    multi = engines_for({inf.MULTI_CLASS: args.multiclass}, out_dir, {inf.MULTI_CLASS: ("sample+prior", calibration)})
    found = {}
    for precision in ("fp32", "int8"):
        members = {**engines[precision], **multi[precision]}
        class_prob = inf._run_networks(inf._runners(members, args.tta), x)[1]
        scores = score(class_prob, val.native_targets, val.names, "multiclass")
        found[precision] = {}
        for cls in ("ggo", "consolidation"):
            s = summarize([p[cls] for p in scores])
            found[precision][cls] = {"dice": round(s["dice"]["mean"], 4),
                                     "dice_present": round(s["dice_present"]["mean"], 4)}
    return found


if __name__ == "__main__":
    main()
