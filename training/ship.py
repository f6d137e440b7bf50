"""Install a trained run's final model into ``covfast/weights`` with its JSON model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from covfast.evaluate import CLASS_NAMES, summarize
from covfast.nn import count_parameters, load_model, sha256_file
from covfast.nn.preprocess import INPUT_SIZE

WEIGHTS = Path(__file__).resolve().parent.parent / "covfast" / "weights"
DATA_NOTE = "COVID-SemiSeg (Fan et al., Inf-Net, IEEE TMI 2020): the 50 doctor-labelled MedSeg slices for supervision"
PRETRAIN_NOTE = "; the 1,600 unlabelled Zenodo slices (images only) for self-supervised pretraining (via recipe.init)"
STAGE_NOTE = "; it starts from the weights of recipe.init.run (its kind and fit time: training.stages)"
PRIOR_NOTE = (
    " Second input channel: the probability map of the single-class model of recipe.prior.run, as the installed "
    "infnet model supplies it at inference."
)
PRIORS_NOTE = (
    " Second input channel: the mean probability of the single-class models of recipe.prior.runs, the networks the "
    "infection stage averages (installed infnet and infection_unet), as it supplies it at inference."
)
NEGATIVES_NOTE = (
    "Specificity fine-tune (recipe.negatives): COVID-CT-MD P001 slices labelled infection-free (more than "
    "recipe.negatives.ctmd.gap slices from a labelled one), mapped as at inference, with empty targets, and the "
    "unlabelled slices whose Semi-Inf-Net pseudo label covers at most pseudo_max_fraction of the slice, with that "
    "pseudo label as target. cap001 and normal001 are held out."
)


def forward_flops(model: torch.nn.Module, in_ch: int, size: int = INPUT_SIZE) -> int:
    """FLOPs (2 per multiply-add) of one forward pass on a [1, in_ch, size, size] input."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, in_ch, size, size))
    return int(counter.get_total_flops())


def fold_summary(run_dir: str | Path, task: str) -> dict | None:
    """Pooled out-of-fold scores of the ``fold<k>.json`` files a run folder holds (any subset of the 5 folds).

    Args:
        run_dir: a run folder of :func:`training.recipes.run_segment`.
        task: "infection" (one summary) or "multiclass" (one summary per lesion class).

    Returns:
        ``{"run", "folds", "slices", "seconds", "model", "recipe", "metrics"}`` (``model`` as the fold run noted
        it: its architecture and init; ``recipe`` None for runs that did not record it), or None when the folder
        holds no fold results.
    """
    files = sorted(Path(run_dir).glob("fold[0-9].json"))
    if not files:
        return None
    folds = [json.loads(f.read_text()) for f in files]
    per_image = [m for fold in folds for m in fold["per_image"]]
    if task == "multiclass":
        metrics = {name: summarize([m[name] for m in per_image]) for name in CLASS_NAMES.values()}
    else:
        metrics = summarize(per_image)
    return {
        "run": str(run_dir),
        "folds": [fold["fold"] for fold in folds],
        "slices": len(per_image),
        "seconds": sum(fold["seconds"] for fold in folds),
        "model": folds[0].get("model"),
        "recipe": folds[0].get("recipe"),
        "metrics": metrics,
    }


def _validation(
    run_dir: Path, model: str, volume_check: str | Path | None, task: str = "infection", cv_runs: tuple = (),
    ensemble_check: str | Path | None = None,
    prior_check: str | Path | None = None,
) -> dict:
    """The card's validation block: 5-fold CV (``cv.json``) for a final fit, the held-out fold for a fold model,
    the pooled folds of each of ``cv_runs`` (e.g. an earlier run of the recipe), plus the per-case slice flags of a
    ``check-volumes`` summary, the out-of-fold ensemble scores of ``training/analysis/ensemble_check.py --json``
    and the multi-class scores of ``training/analysis/mc_prior_check.py --json`` when given."""
    if model.startswith("fold"):
        fold = json.loads((run_dir / f"{model}.json").read_text())
        validation = {
            "protocol": f"CV fold {fold['fold']} of training/data.py:cv_folds (10 labelled slices) held out of this "
            "run's training; its init may have seen them (see recipe.init)",
            "metrics": summarize(fold["per_image"]),
            "val": fold["val"],
        }
    else:
        cv_path = run_dir / "cv.json"
        if cv_path.exists():
            cv = json.loads(cv_path.read_text())
            validation = {
                "protocol": "5-fold cross-validation over the 50 labelled slices (split by slice: no patient IDs)",
                "metrics": cv.get("cv"),
                "cv_seconds": cv.get("cv_seconds"),
            }
        else:
            validation = {"protocol": "no complete 5-fold cross-validation of this run; see cv_runs", "metrics": None}
    if cv_runs:
        validation["cv_runs"] = [fold_summary(run, task) for run in cv_runs]
    if ensemble_check is not None:
        found = json.loads(Path(ensemble_check).read_text())
        validation["ensemble"] = {
            "protocol": "mean probability of models trained on the same CV folds, each scored on its own fold's "
            "held-out slices (out of fold, pooled over the folds); thresholds other than 0.5 left out",
            "command": found.get("command"),
            "folds": found["folds"],
            "tta": found["tta"],
            "tta_of": found.get("tta_of", {}),
            "models": found["models"],
            "pooled": {name: scores for name, scores in found["pooled"].items() if "@" not in name},
            "paired_dice": found.get("paired", {}),
        }
    if prior_check is not None:
        validation["pipeline_prior"] = {
            "protocol": "each fold's multi-class model scored on its held-out slices with the prior the pipeline "
            "gives it (mean probability of that fold's single-class models, flips as at inference)",
            **json.loads(Path(prior_check).read_text()),
        }
    if volume_check is not None:
        validation["covid_ct_md_slice_flags"] = slice_flags_block(volume_check)
    return validation


def init_stages(run_dir: Path, recipe: dict) -> list[dict]:
    """The runs a recipe's ``init`` chain starts from, nearest first, as far as their ``final.json`` is on disk.

    Each entry: ``{"run", "kind", "fit_seconds"}``; ``kind`` is the init run's recipe kind (``pretrain`` for the
    self-supervised runs, ``segment`` for a supervised first stage).
    """
    stages, seen = [], set()
    while recipe.get("init") and recipe["init"]["run"] not in seen:
        seen.add(recipe["init"]["run"])
        final = run_dir.parent / recipe["init"]["run"] / "final.json"
        if not final.is_file():
            stages.append({"run": recipe["init"]["run"], "kind": None, "fit_seconds": None})
            break
        found = json.loads(final.read_text())
        recipe = found["recipe"]
        stages.append({"run": final.parent.name, "kind": recipe.get("kind"),
                       "fit_seconds": found.get("final_seconds", found.get("seconds"))})
    return stages


def slice_flags_block(volume_check: str | Path, what: str = "") -> dict:
    """The card's ``covid_ct_md_slice_flags``: per case and area threshold, the slice flags of a ``check-volumes``
    summary against the radiologists' slice labels (read superior first, :mod:`training.ctmd`); ``what`` says
    which probability was thresholded when it is not this model's alone."""
    summary = json.loads(Path(volume_check).read_text())
    return {
        "protocol": "slice flagged when infected area (p > 0.5) inside the lungs >= A mm^2, against the "
        "radiologists' infection_slice_labels read superior first (training/ctmd.py; python -m training "
        "check-volumes)" + (f"; {what}" if what else ""),
        **{case: {"diagnosis": v["diagnosis"], **v["slice_flags"]} for case, v in summary.items()},
    }


def update_slice_flags(card_path: str | Path, volume_check: str | Path, what: str = "") -> dict:
    """Replace an installed card's ``covid_ct_md_slice_flags`` with those of a new ``check-volumes`` run (the
    weights and their SHA-256 are untouched); returns the card."""
    card_path = Path(card_path)
    card = json.loads(card_path.read_text())
    card["validation"]["covid_ct_md_slice_flags"] = slice_flags_block(volume_check, what)
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return card


def ship(
    run_dir: str | Path,
    name: str,
    task: str,
    command: str,
    weights_dir: Path = WEIGHTS,
    model: str = "final",
    volume_check: str | Path | None = None,
    cv_runs: tuple[str | Path, ...] = (),
    ensemble_check: str | Path | None = None,
    prior_check: str | Path | None = None,
) -> dict:
    """Copy ``run_dir/<model>.safetensors`` to ``weights_dir/<name>.safetensors`` and write ``<name>.json``.

    Args:
        run_dir: a run folder with ``<model>.safetensors``, ``<model>.json`` and (for a final fit's validation
            numbers) ``cv.json``.
        name: installed model name ("infnet" or "infnet_multiclass").
        task: "infection" or "multiclass".
        command: the command line that trains this model (recorded in the card).
        weights_dir: destination folder.
        model: "final" (fit on all labelled slices) or "fold<k>" (fit without CV fold k, scored on it).
        volume_check: optional ``volumes.json`` of ``python -m training check-volumes`` for this model.
        cv_runs: run folders whose ``fold<k>.json`` results are pooled into the card (:func:`fold_summary`), for
            a final fit validated by cross-validation runs made elsewhere or with a partly different recipe.
        ensemble_check: optional ``--json`` output of ``training/analysis/ensemble_check.py`` for a model shipped as
            an ensemble member (the out-of-fold scores of the ensemble it joins).
        prior_check: optional ``--json`` output of ``training/analysis/mc_prior_check.py`` for a multi-class model
            (its folds scored with the pipeline's prior).

    Returns:
        the model card.
    """
    run_dir = Path(run_dir)
    final = json.loads((run_dir / f"{model}.json").read_text())
    network = load_model(run_dir / f"{model}.safetensors")
    spec = final["recipe"]["model"]
    in_ch = spec["config"].get("in_ch", 1)
    weights_dir.mkdir(parents=True, exist_ok=True)
    dest = weights_dir / f"{name}.safetensors"
    shutil.copyfile(run_dir / f"{model}.safetensors", dest)
    stages = init_stages(run_dir, final["recipe"])
    pretrained = any(stage["kind"] == "pretrain" for stage in stages)
    data_note = DATA_NOTE + (PRETRAIN_NOTE if pretrained else STAGE_NOTE if stages else "") + "."
    if final["recipe"].get("prior"):
        data_note += PRIORS_NOTE if "runs" in final["recipe"]["prior"] else PRIOR_NOTE
    if final["recipe"].get("negatives"):
        data_note += " " + NEGATIVES_NOTE
    card = {
        "name": name,
        "task": task,
        "architecture": spec,
        "params": count_parameters(network),
        "flops_per_slice": forward_flops(network, in_ch),
        "input": {"size": INPUT_SIZE, "channels": in_ch},
        "data": data_note,
        "recipe": final["recipe"],
        "command": command,
        "training": {"device": final.get("device"), "fit_seconds": final.get("final_seconds", final.get("seconds")),
                     **({"stages": stages} if stages else {})},
        "validation": _validation(run_dir, model, volume_check, task, cv_runs, ensemble_check, prior_check),
        "sha256": sha256_file(dest),
    }
    (weights_dir / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
