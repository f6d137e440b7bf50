"""Command line of the training layer.

Examples:
    python -m training carry --source ../shared/data/infnet-semiseg --dest .devcarry/infnet-semiseg
    python -m training run training/recipes/infnet_aug.json --data ../shared/data/infnet-semiseg --final
    python -m training run training/recipes/infnet_aug.json --folds 0 --device cpu
    python -m training check-volumes --data ../shared/data/covid-ct-md --out runs/check_volumes
    python -m training check-volumes --weights runs/cpu/infnet_v2/weights --out runs/check_v2
    python -m training score covfast/weights/infnet.safetensors --fold 0
    python -m training ship runs/infnet_erase --name infnet --task infection --train-command "..."
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_DATA = "../shared/data/infnet-semiseg"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    carry = sub.add_parser("carry", help="write a compact copy of the data for a remote machine")
    carry.add_argument("--source", default=DEFAULT_DATA)
    carry.add_argument("--dest", default=".devcarry/infnet-semiseg")
    run = sub.add_parser("run", help="run a recipe: cross-validation folds and/or the final fit")
    run.add_argument("recipe", nargs="+", help="recipe JSON file(s), run in order")
    run.add_argument("--data", default=DEFAULT_DATA, help="root laid out like infnet-semiseg")
    run.add_argument("--runs", default="runs", help="output folder (one subfolder per recipe)")
    run.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--folds", default="0,1,2,3,4", help="comma-separated CV folds to run; empty for none")
    run.add_argument("--final", action="store_true", help="also fit on all labelled slices")
    run.add_argument(
        "--cpu-bf16",
        action="store_true",
        help="on a CPU, train under bfloat16 autocast with channels-last tensors (2-3x faster with AMX); "
        "recorded in the run's recipe as optim.cpu_bf16",
    )
    ship = sub.add_parser("ship", help="install a run's final model into covfast/weights with its model card")
    ship.add_argument("run_dir", help="run folder holding final.safetensors, final.json and cv.json")
    ship.add_argument("--name", required=True, help="installed name: infnet, infection_unet (the partner) or infnet_multiclass")
    ship.add_argument("--task", choices=("infection", "multiclass"), required=True)
    ship.add_argument("--train-command", required=True, help="the command that trained the run (kept in the card)")
    ship.add_argument("--model", default="final", help="final (all labelled slices) or fold<k> (fold k held out)")
    ship.add_argument("--volume-check", help="volumes.json of check-volumes for this model, kept in the card")
    ship.add_argument(
        "--cv-run", action="append", default=[], help="run folder whose fold<k>.json scores go into the card (repeat)"
    )
    ship.add_argument("--ensemble-check", help="ensemble_check.py --json output kept in the card (ensemble members)")
    ship.add_argument("--prior-check", help="mc_prior_check.py --json output kept in the card (multi-class models)")
    ship.add_argument("--dest", help="install into this folder instead of covfast/weights (to check a candidate)")
    flags = sub.add_parser(
        "card-slice-flags", help="replace an installed card's COVID-CT-MD slice flags with a new check-volumes run"
    )
    flags.add_argument("card", help="model card JSON, e.g. covfast/weights/infnet.json")
    flags.add_argument("volumes", help="volumes.json of python -m training check-volumes")
    flags.add_argument("--what", default="", help="which probability was thresholded, kept in the protocol text")
    score = sub.add_parser("score", help="score a single-class model file on one CV fold of the labelled slices")
    score.add_argument("model", help="a .safetensors model file")
    score.add_argument("--data", default=DEFAULT_DATA)
    score.add_argument("--fold", type=int, default=0)
    score.add_argument("--json", help="write the scores as JSON")
    check = sub.add_parser("check-volumes", help="check the HU mapping on the COVID-CT-MD volumes")
    check.add_argument("--data", default="../shared/data/covid-ct-md")
    check.add_argument("--out", default="runs/check_volumes")
    check.add_argument("--min-area-mm2", type=float, default=100.0)
    check.add_argument(
        "--weights", default=None, help="folder with infnet.safetensors + infnet.json (default: installed)"
    )
    check.add_argument("--areas", default="20,100,500", help="comma-separated flag areas in mm^2 also scored")
    check.add_argument("--hu-gates", default="", help="comma-separated HU thresholds applied afterwards and scored")
    check.add_argument("--tta", default=None, help="test-time augmentation: none, h or hv (default: infer's)")
    check.add_argument(
        "--min-component-ml", type=float, default=None, help="drop smaller infection components (default: infer's)"
    )
    check.add_argument("--precision", default=None, help="network precision, as covfast infer (default: infer's)")
    args = parser.parse_args(argv)
    if args.command == "carry":
        from training.carry import make_carry

        print(f"{make_carry(args.source, args.dest) / 1e6:.1f} MB written to {args.dest}")
        return 0
    if args.command == "check-volumes":
        from training.check_volumes import check_volumes

        areas = tuple(float(a) for a in args.areas.split(",") if a.strip())
        gates = tuple(float(g) for g in args.hu_gates.split(",") if g.strip())
        check_volumes(
            args.data, args.out, args.min_area_mm2, args.weights, areas, gates, args.tta, args.min_component_ml,
            args.precision,
        )
        return 0
    if args.command == "score":
        import json

        from training.recipes import score_fold

        result = score_fold(args.model, args.data, args.fold)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v["mean"] for k, v in result["summary"].items()}, indent=1))
        return 0
    if args.command == "card-slice-flags":
        from training.ship import update_slice_flags

        card = update_slice_flags(args.card, args.volumes, args.what)
        print(f"{card['name']}: slice flags from {args.volumes}")
        return 0
    if args.command == "ship":
        from training.ship import WEIGHTS, ship

        dest = Path(args.dest) if args.dest else WEIGHTS
        card = ship(
            args.run_dir, args.name, args.task, args.train_command, dest, args.model, args.volume_check, args.cv_run,
            args.ensemble_check, args.prior_check,
        )
        print(f"{card['name']}: {card['params']} parameters, sha256 {card['sha256']}")
        return 0
    from training.recipes import run_recipe

    folds = [int(f) for f in args.folds.split(",") if f.strip()]
    for recipe in args.recipe:
        run_recipe(recipe, args.data, args.runs, args.device, args.seed, folds, args.final, args.cpu_bf16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
