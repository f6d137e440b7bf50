"""Time the CPU steps after the infection networks (hole filling, the component rules) against another revision.

    python benchmarks/postprocess_speed.py ../shared/data/covid-ct-md/P001 ... --reference 7472eaa --runs 5 \
        --json benchmarks/results/postprocess_cpu_YYYY-MM-DD.json

Per volume: the lung mask and the infection networks run once (current code); then, alternating run by run on fresh
copies of the same arrays, the current and the reference revision's (:mod:`_reference`)
``lung.fill_holes_per_slice`` of the lung mask and ``infection.drop_components`` with the default rules
(small components, dome caps). Printed: median seconds of each, their ratio, and whether the outputs are equal.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _reference import alternate, comparison_parser, reference_modules, write_comparison


def _measure(path: str, reference: dict, runs: int) -> dict:
    from covfast.io.inputs import load_volume
    from covfast.pipeline import infection, lung
    from covfast.pipeline.severity import DEFAULT_RULES

    volume = load_volume(path)
    labels = lung.lung_mask(volume.hu, volume.spacing_mm)
    seg = infection.segment_infection(volume.hu, labels, volume.spacing_mm)
    inside = labels > 0

    def drop(module):
        def run():
            mask, prob = seg.mask.copy(), seg.prob.copy()
            removed = module.drop_components(mask, prob, volume.spacing_mm, min_ml=DEFAULT_RULES.min_component_ml,
                                             lung=labels, dome_support=DEFAULT_RULES.dome_cap_support)
            return removed, mask, prob
        return run

    row = {"volume": path, "shape": list(volume.hu.shape)}
    current, old, out = alternate(lambda: lung.fill_holes_per_slice(inside),
                                  lambda: reference["lung"].fill_holes_per_slice(inside), runs)
    row["fill_holes"] = {"current_s": current, "reference_s": old, "speedup": old / current,
                         "identical": bool(np.array_equal(out["current"], out["reference"]))}
    current, old, out = alternate(drop(infection), drop(reference["infection"]), runs)
    row["drop_components"] = {
        "current_s": current, "reference_s": old, "speedup": old / current, "removed": out["current"][0],
        "identical": out["current"][0] == out["reference"][0]
        and all(np.array_equal(a, b) for a, b in zip(out["current"][1:], out["reference"][1:])),
    }
    for step in ("fill_holes", "drop_components"):
        r = row[step]
        print(f"{path} {step}: current {r['current_s']:.4f} s, reference {r['reference_s']:.4f} s, "
              f"{r['speedup']:.2f}x, identical {r['identical']}")
    return row


def main() -> None:
    args = comparison_parser(__doc__.splitlines()[0]).parse_args()
    reference = reference_modules(args.reference, ("lung", "morphology", "infection"))
    write_comparison(args, [_measure(path, reference, args.runs) for path in args.volumes])


if __name__ == "__main__":
    main()
