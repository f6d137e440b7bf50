"""Peak host memory of one network forward pass at a given batch, on the CPU (a rough upper bound of the activations
a GPU batch needs: float32 here, about half that in fp16 there).

    python benchmarks/activation_memory.py --batch 16 64 --json benchmarks/results/activation_memory_cpu_YYYY-MM-DD.json

Each (network, batch) runs in a fresh process: a warm-up pass of 2 slices, then one pass of ``batch`` slices at 256 x
256 (2 channels for the multi-class network); printed is the rise of the process's peak RSS over the warm-up's.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import date

CHILD = """
import resource, sys, torch
from covfast.engine.runtime import TorchEngine
from covfast.pipeline.infection import load_models
name, batch = sys.argv[1], int(sys.argv[2])
engine = TorchEngine(load_models("cpu")[name].model, "cpu")
channels = 2 if name == "infnet_multiclass" else 1
engine.run_tensor(torch.randn(2, channels, 256, 256))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
engine.run_with_features(torch.randn(batch, channels, 256, 256))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--models", nargs="+", default=["infnet", "infection_unet", "infnet_multiclass"])
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for name in args.models:
        for batch in args.batch:
            out = subprocess.run([sys.executable, "-c", CHILD, name, str(batch)], check=True, capture_output=True,
                                 text=True).stdout.strip().splitlines()[-1]
            rows.append({"model": name, "batch": batch, "peak_rss_rise_mb": round(float(out))})
            print(f"{name} batch {batch}: +{float(out):.0f} MB peak RSS")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"date": date.today().isoformat(), "command": " ".join(sys.argv), "machine": platform.processor()
                       or platform.machine(), "precision": "fp32, torch on the CPU", "results": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
