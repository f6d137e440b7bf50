"""Install a trained run's final model into ``covfast/weights`` with its JSON model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from covfast.evaluate import summarize
from covfast.nn import count_parameters, load_model, sha256_file
from covfast.nn.preprocess import INPUT_SIZE

WEIGHTS = Path(__file__).resolve().parent.parent / "covfast" / "weights"
DATA_NOTE = (
    "COVID-SemiSeg (Fan et al., Inf-Net, IEEE TMI 2020): the 50 doctor-labelled MedSeg slices for supervision; "
    "the 1,600 unlabelled Zenodo slices (images only) for self-supervised pretraining."
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


def _validation(run_dir: Path, model: str, volume_check: str | Path | None) -> dict:
    """The card's validation block: 5-fold CV (``cv.json``) for a final fit, the held-out fold for a fold model,
    plus the per-case slice flags of a ``check-volumes`` summary when given."""
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
        cv = json.loads(cv_path.read_text()) if cv_path.exists() else {}
        validation = {
            "protocol": "5-fold cross-validation over the 50 labelled slices (split by slice: no patient IDs)",
            "metrics": cv.get("cv"),
            "cv_seconds": cv.get("cv_seconds"),
        }
    if volume_check is not None:
        summary = json.loads(Path(volume_check).read_text())
        validation["covid_ct_md_slice_flags"] = {
            "protocol": "slice flagged when infected area (p > 0.5) inside the lungs >= A mm^2, against the "
            "radiologists' infection_slice_labels (python -m training check-volumes)",
            **{case: {"diagnosis": v["diagnosis"], **v["slice_flags"]} for case, v in summary.items()},
        }
    return validation


def ship(
    run_dir: str | Path,
    name: str,
    task: str,
    command: str,
    weights_dir: Path = WEIGHTS,
    model: str = "final",
    volume_check: str | Path | None = None,
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
    data_note = DATA_NOTE
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
        "training": {"device": final.get("device"), "fit_seconds": final.get("final_seconds", final.get("seconds"))},
        "validation": _validation(run_dir, model, volume_check),
        "sha256": sha256_file(dest),
    }
    (weights_dir / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
