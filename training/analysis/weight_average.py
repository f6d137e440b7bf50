"""Average the weights of several snapshots of one network (one-off analysis: snapshot / SWA-style averaging).

    python training/analysis/weight_average.py --folds 0,1,2,3,4 --out runs/s20/avg_v345/fold{k}.safetensors \
        runs/s19/infnet_xxl_v3/fold{k}.safetensors runs/s19/infnet_xxl_v4/fold{k}.safetensors ...

Every input must hold the same architecture (same metadata, same tensor names and shapes). Floating-point tensors,
BatchNorm running statistics included, are averaged with equal weights (or ``--weights``); integer tensors (BatchNorm's
batch counters) come from the last input. Averaging only makes sense for snapshots of one training line, which sit in
one basin of the loss; the out-of-fold check (``ensemble_check.py``) says whether it helped.
"""

import argparse
import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file


def average_files(paths: list[str], out: str, weights: list[float] | None = None) -> None:
    """Write the weighted mean of the model files ``paths`` to ``out`` with the first file's metadata."""
    if len(paths) < 2:
        raise ValueError("need at least two model files to average")
    weights = weights or [1.0] * len(paths)
    if len(weights) != len(paths):
        raise ValueError(f"{len(weights)} weights for {len(paths)} files")
    total = sum(weights)
    metas = []
    for p in paths:
        with safe_open(p, framework="pt") as fh:
            metas.append((fh.metadata() or {}).get("covfast"))
    if any(m != metas[0] for m in metas):
        raise ValueError(f"{paths}: the files hold different architectures")
    states = [load_file(p) for p in paths]
    keys = set(states[0])
    for p, s in zip(paths, states, strict=True):
        if set(s) != keys or any(s[k].shape != states[0][k].shape for k in keys):
            raise ValueError(f"{p}: tensor names or shapes differ from {paths[0]}")
    merged = {}
    for k in sorted(keys):
        if states[0][k].is_floating_point():
            merged[k] = sum(w * s[k].double() for w, s in zip(weights, states, strict=True)).div(total).float()
        else:
            merged[k] = states[-1][k].clone()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in merged.items()}, out, metadata={"covfast": metas[0]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", help="model files, with {k} for the fold when --folds is given")
    ap.add_argument("--out", required=True, help="output file, with {k} for the fold when --folds is given")
    ap.add_argument("--folds", default="", help="comma-separated folds to average one by one")
    ap.add_argument("--weights", default="", help="comma-separated weights, one per input (default equal)")
    args = ap.parse_args()
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    folds = [int(k) for k in args.folds.split(",")] if args.folds else [None]
    for k in folds:
        paths = [p.format(k=k) if k is not None else p for p in args.inputs]
        out = args.out.format(k=k) if k is not None else args.out
        average_files(paths, out, weights)
        print(json.dumps({"out": out, "inputs": paths, "weights": weights}))


if __name__ == "__main__":
    main()
