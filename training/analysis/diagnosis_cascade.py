"""Leave-one-patient-out check of the diagnosis cascade against the affinity head alone (issue 5).

The head's held-out predictions come from ``python -m training.affinity lopo`` (``lopo.json``, key
``predictions``); the segmentation side (per-slice infected area, infected volume) from ``covfast infer`` reports
of the same COVID-CT-MD volumes. cap001 and normal001 were never used to train the shipped segmentation networks;
44 P001 slices taken as infection-free were negatives of their second stages, so P001's slice specificity flatters
them. The Inf-Net's second stage (session 15) read the labels right; the U-Net partner's (session 8) read them in
reverse, so 9 of its 44 are labelled infected. The slice labels here are read superior first (:mod:`training.ctmd`).

    python -m training.affinity lopo --recipe training/recipes/affinity.json --out runs/s11/affinity
    covfast infer ../shared/data/covid-ct-md/{P001,cap001,normal001} -o runs/s11/reports -q --device cpu
    python training/analysis/diagnosis_cascade.py runs/s11/affinity/lopo.json runs/s11/reports --json OUT.json \
        --replicates runs/s11/affinity_seed1/lopo.json runs/s11/affinity_seed2/lopo.json   # other seeds (optional)

With ``--json runs/s11/affinity/cascade.json`` (beside ``lopo.json``), ``python -m training.affinity final`` copies
the result into the model card as ``validation_cascade``, which the report's ``diagnosis.validation`` line quotes.

Scored slices as in ``lopo``: infected slices (radiologists' labels) of P001 and cap001, all lung slices of
normal001. ``segmentation`` scores the report's ``covid_positive`` flags against the radiologists' slice labels on
every lung slice of the three volumes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from covfast.nn.affinity import CLASSES
from covfast.pipeline.diagnosis import (
    MIN_INFECTED_ML,
    aggregate,
    aggregate_cascade,
    cascade_probs,
    pattern_share,
    slice_label,
)
from covfast.pipeline.severity import DEFAULT_RULES
from training.affinity import slice_metrics
from training.ctmd import labels_at

# head: the affinity head alone; cascade: segmentation decides abnormal, the head which kind (shipped until session
# 13); pattern: the same, the kind from the infection's peripheral odds ratio (report "distribution"), the head unused;
# blend: the kind share averaged between the head's and the pattern's.
RULES = ("head", "cascade", "pattern", "blend")


def _report_slices(report: dict, slices: list[int]) -> np.ndarray:
    by_index = {entry["index"]: entry for entry in report["slices"]}
    return np.array([by_index[z]["infected_area_mm2"] for z in slices], dtype=np.float64)


def evaluate(lopo: dict, reports: dict[str, dict], area_mm2: float, min_infected_ml: float) -> dict:
    """Slice metrics and volume calls of the head alone and of the cascade, per held-out patient and pooled."""
    out = {"area_mm2": area_mm2, "min_infected_ml": min_infected_ml, "volumes": {}}
    pooled = {name: ([], []) for name in RULES}
    for held, pred in lopo["predictions"].items():
        truth = lopo["volumes"][held]["truth"]
        head = np.asarray(pred["probs"], dtype=np.float64)
        scored = np.asarray(pred["scored"], dtype=bool)
        cls = [c for c, s in zip(pred["cls"], scored) if s]
        report = reports[held]
        areas = _report_slices(report, pred["slice"])
        infected_ml = float(report["infected_volume_ml"]["total"])
        cascade = cascade_probs(head, areas, area_mm2)
        entry = {"truth": truth, "infected_ml": infected_ml}
        rules = [
            ("head", head, aggregate(head)),
            ("cascade", cascade, aggregate_cascade(cascade, areas, infected_ml, area_mm2, min_infected_ml)),
        ]
        share = pattern_share(report.get("distribution"))
        if share is not None:
            entry["pattern_share"] = share
            pattern = cascade_probs(head, areas, area_mm2, kind_share=share)
            blend = cascade_probs(head, areas, area_mm2, kind_share=None)
            # the head's share and the pattern's, averaged per slice
            abnormal = 1.0 - blend[:, CLASSES.index("normal")]
            blend[:, CLASSES.index("covid")] = 0.5 * (blend[:, CLASSES.index("covid")] + abnormal * share)
            blend[:, CLASSES.index("pneumonia")] = abnormal - blend[:, CLASSES.index("covid")]
            for name, probs in (("pattern", pattern), ("blend", blend)):
                rules.append((name, probs, aggregate_cascade(probs, areas, infected_ml, area_mm2, min_infected_ml)))
        for name, probs, call in rules:
            entry[name] = {
                "label": call["label"],
                "probs": call["probs"],
                "abnormal_slices": call["abnormal_slices"],
                "slices": slice_metrics(cls, probs[scored]),
            }
            pooled[name][0].extend(cls)
            pooled[name][1].append(probs[scored])
        out["volumes"][held] = entry
    for name, (truth, probs) in pooled.items():
        if not probs:
            continue
        out[name] = {
            "volumes_right": sum(v[name]["label"] == v["truth"] for v in out["volumes"].values()),
            "slices": slice_metrics(truth, np.concatenate(probs)),
            # The same slices scored by the report's per-slice "class" (abnormal first, then the kind) instead of
            # the argmax of the three probabilities.
            "slices_class": slice_metrics(truth, _one_hot_class(np.concatenate(probs))),
        }
    return out


def _one_hot_class(probs: np.ndarray) -> np.ndarray:
    """[N, 3] probabilities -> [N, 3] one-hot of :func:`covfast.pipeline.diagnosis.slice_label`."""
    out = np.zeros_like(probs)
    for i, row in enumerate(probs):
        out[i, CLASSES.index(slice_label(row))] = 1.0
    return out


def _summary(result: dict) -> dict:
    """Volumes right and slice macro-F1 of both rules, and the volume calls."""
    return {
        name: {
            "volumes_right": result[name]["volumes_right"],
            "macro_f1": result[name]["slices"]["macro_f1"],
            "labels": {held: v[name]["label"] for held, v in result["volumes"].items()},
        }
        for name in RULES
        if name in result
    }


def segmentation_flags(reports: dict[str, dict], labels: dict) -> dict:
    """Sensitivity / specificity of the reports' ``covid_positive`` flags against the radiologists' slice labels."""
    out = {}
    for case, report in reports.items():
        lung = [entry for entry in report["slices"] if entry["lung_area_mm2"] > 0]
        flags = np.array([bool(entry["covid_positive"]) for entry in lung])
        marked = labels_at(labels[case], np.array([entry["z_mm"] for entry in lung], dtype=np.float64))
        out[case] = {
            "slices": len(flags),
            "sensitivity": float(flags[marked].mean()) if marked.any() else None,
            "specificity": float((~flags[~marked]).mean()) if (~marked).any() else None,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lopo", type=Path, help="lopo.json of python -m training.affinity lopo")
    parser.add_argument("--replicates", type=Path, nargs="*", default=[],
                        help="lopo.json of the same recipe with other seeds: their summaries go to 'replicates'")
    parser.add_argument("reports", type=Path, help="folder of covfast infer outputs (<case>/report.json)")
    parser.add_argument("--labels", type=Path, default=Path("../shared/data/covid-ct-md/labels.json"))
    parser.add_argument("--area", type=float, default=DEFAULT_RULES.min_lesion_area_mm2)
    parser.add_argument("--min-infected-ml", type=float, default=MIN_INFECTED_ML)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    lopo = json.loads(args.lopo.read_text())
    reports = {case: json.loads((args.reports / case / "report.json").read_text()) for case in lopo["predictions"]}
    result = {
        "protocol": f"{lopo['protocol']}; the affinity head trained without the held-out patient, the segmentation "
        "as shipped (it never saw cap001 or normal001; 44 P001 slices taken as infection-free were negatives of the "
        "second stages: the Inf-Net's read the labels right, the U-Net partner's in reverse, so 9 of its 44 are "
        "labelled infected); slice labels read superior first (training/ctmd.py)",
        "command": f"python training/analysis/diagnosis_cascade.py {args.lopo} {args.reports}",
        **evaluate(lopo, reports, args.area, args.min_infected_ml),
    }
    result["segmentation_flags"] = segmentation_flags(reports, json.loads(args.labels.read_text()))
    if args.replicates:
        result["command"] += " --replicates " + " ".join(map(str, args.replicates))
        result["replicates"] = [
            {"lopo": str(path), "seed": rep["recipe"].get("seed"), **_summary(evaluate(rep, reports, args.area,
                                                                                     args.min_infected_ml))}
            for path, rep in ((path, json.loads(path.read_text())) for path in args.replicates)
        ]
    for name in (name for name in RULES if name in result):
        s = result[name]["slices"]
        f1 = " / ".join(f"{s['f1'][c]:.2f}" if s["f1"][c] is not None else "-" for c in CLASSES)
        calls = ", ".join(f"{h} -> {v[name]['label']}" for h, v in result["volumes"].items())
        print(
            f"{name:8s} volumes right {result[name]['volumes_right']} of {len(result['volumes'])} ({calls}); "
            f"slice macro-F1 {s['macro_f1']:.3f} (F1 {'/'.join(CLASSES)} {f1}); COVID sens / spec "
            f"{s['covid_sensitivity']:.2f} / {s['covid_specificity']:.2f}; confusion {s['confusion']}; by the "
            f"per-slice class: macro-F1 {result[name]['slices_class']['macro_f1']:.3f}, COVID sens / spec "
            f"{result[name]['slices_class']['covid_sensitivity']:.2f} / "
            f"{result[name]['slices_class']['covid_specificity']:.2f}"
        )
    for case, flags in result["segmentation_flags"].items():
        print(f"covid_positive flags {case}: {flags}")
    for rep in result.get("replicates", []):
        print(f"seed {rep['seed']}: " + "; ".join(
            f"{name} {rep[name]['volumes_right']} of 3 volumes, macro-F1 {rep[name]['macro_f1']:.3f}"
            for name in RULES if name in rep))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
