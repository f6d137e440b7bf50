"""Command line of the training layer.

Examples:
    python -m training carry --source ../shared/data/infnet-semiseg --dest .devcarry/infnet-semiseg
    python -m training run training/recipes/infnet_aug.json --data ../shared/data/infnet-semiseg --final
    python -m training run training/recipes/infnet_aug.json --folds 0 --device cpu
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_DATA = "../shared/data/infnet-semiseg"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args = parser.parse_args(argv)
    if args.command == "carry":
        from training.carry import make_carry

        print(f"{make_carry(args.source, args.dest) / 1e6:.1f} MB written to {args.dest}")
        return 0
    from training.recipes import run_recipe

    folds = [int(f) for f in args.folds.split(",") if f.strip()]
    for recipe in args.recipe:
        run_recipe(recipe, args.data, args.runs, args.device, args.seed, folds, args.final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
