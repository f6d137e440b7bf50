"""Compare covfast's outputs under bf16 (or fp16) autocast or int8 with fp32 on COVID-CT-MD volumes (issue 6: the
Dice change of reduced precision).

    python benchmarks/precision_compare.py P001 cap001 normal001 --json runs/precision_check.json
    python benchmarks/precision_compare.py P001 cap001 normal001 --precision int8

For each case of ``--data`` it runs ``covfast.infer`` once per precision (bf16 / fp16 in torch against torch fp32;
int8 in onnxruntime against onnxruntime fp32) and prints the Dice of
the infection masks (any class, GGO, consolidation), the largest probability difference, and the report fields a
user reads (percent infected, CT class, diagnosis, COVID-positive slices), with the infection and diagnosis stage
times.
"""

from __future__ import annotations

import argparse
import json
import time


def _dice(a, b) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2 * int((a & b).sum()) / total if total else 1.0


def compare(path: str, device: str, precision: str) -> dict:
    """fp32 against ``precision`` on one input."""
    import numpy as np

    from covfast.api import infer

    runs = {}
    engine = "onnx" if precision == "int8" else "torch"
    for prec in ("fp32", precision):
        start = time.perf_counter()
        runs[prec] = infer(path, device=device, engine=engine, precision=prec)
        runs[prec].report["timings_s"]["wall"] = time.perf_counter() - start
    a, b = runs["fp32"], runs[precision]
    return {
        "infected_dice": _dice(a.infection_mask > 0, b.infection_mask > 0),
        "ggo_dice": _dice(a.infection_mask == 1, b.infection_mask == 1),
        "consolidation_dice": _dice(a.infection_mask == 2, b.infection_mask == 2),
        "max_abs_prob_diff": float(np.abs(a.infection_prob - b.infection_prob).max()),
        "percent_infected": [a.percent_infected, b.percent_infected],
        "ct_class": [a.ct_class, b.ct_class],
        "diagnosis": [r.report["diagnosis"]["label"] if r.report["diagnosis"] else None for r in (a, b)],
        "covid_positive_slices": [sum(s["covid_positive"] for s in r.report["slices"]) for r in (a, b)],
        "infection_s": [r.report["timings_s"]["infection"] for r in (a, b)],
        "diagnosis_s": [r.report["timings_s"].get("diagnosis") for r in (a, b)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", help="case folders under --data (e.g. P001 cap001 normal001)")
    parser.add_argument("--data", default="../shared/data/covid-ct-md")
    parser.add_argument("--precision", choices=("bf16", "fp16", "int8"), default="bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    results = {}
    for case in args.cases:
        results[case] = compare(f"{args.data}/{case}", args.device, args.precision)
        print(case, json.dumps(results[case]), flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
