"""Time one installed single-input network on a batch of real slices through each CPU engine, against onnxruntime fp32.

    python benchmarks/network_engines.py infection_unet --batch 8 --repeats 4

The batch is the first ``--batch`` labelled COVID-SemiSeg slices (``../shared/data``), prepared as the networks see
them. For each engine: milliseconds per batch (mean of ``--repeats`` after one warm-up), the largest probability
difference from onnxruntime fp32 and the share of pixels whose 0.5-thresholded mask agrees with it.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from covfast.engine.quantize import ensure_int8_onnx
from covfast.engine.runtime import OnnxRuntimeEngine, TorchEngine, default_cache_dir, ensure_onnx
from covfast.nn import load_model
from covfast.nn.preprocess import to_input
from covfast.pipeline.infection import WEIGHTS_DIR

SLICES = Path("../shared/data/infnet-semiseg/TrainingSet/LungInfection-Train/Doctor-label/Imgs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="installed model name (infnet, infection_unet) or a .safetensors file of a "
                    "single-input network")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    images = [np.array(Image.open(p).convert("L")) for p in sorted(SLICES.glob("*.jpg"))[: args.batch]]
    x = torch.cat([to_input(torch.from_numpy(image)[None, None]) for image in images])
    weights = Path(args.name) if args.name.endswith(".safetensors") else WEIGHTS_DIR / f"{args.name}.safetensors"
    model = load_model(weights).eval()
    onnx = OnnxRuntimeEngine(ensure_onnx(weights, default_cache_dir())["path"])
    reference = onnx.run_tensor(x)
    int8 = OnnxRuntimeEngine(ensure_int8_onnx(weights, default_cache_dir())["path"], precision="int8")
    engines = {"onnxruntime fp32": onnx, "onnxruntime int8": int8, "torch fp32": TorchEngine(model, "cpu"),
               "torch bf16": TorchEngine(model, "cpu", "bf16")}
    print(f"{args.name}, batch {args.batch}, {torch.get_num_threads()} torch threads")
    print("| engine | ms per batch | max abs prob diff | mask agreement |\n|---|---:|---:|---:|")
    for label, engine in engines.items():
        out = engine.run_tensor(x)
        start = time.perf_counter()
        for _ in range(args.repeats):
            engine.run_tensor(x)
        ms = (time.perf_counter() - start) / args.repeats * 1000
        agree = ((out > 0.5) == (reference > 0.5)).float().mean().item()
        print(f"| {label} | {ms:.0f} | {(out - reference).abs().max().item():.4f} | {agree:.5f} |")


if __name__ == "__main__":
    main()
