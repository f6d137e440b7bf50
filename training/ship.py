"""Install a trained run's final model into ``covfast/weights`` with its JSON model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from covfast.nn import count_parameters, load_model, sha256_file
from covfast.nn.preprocess import INPUT_SIZE

WEIGHTS = Path(__file__).resolve().parent.parent / "covfast" / "weights"
DATA_NOTE = (
    "COVID-SemiSeg (Fan et al., Inf-Net, IEEE TMI 2020): the 50 doctor-labelled MedSeg slices for supervision; "
    "the 1,600 unlabelled Zenodo slices (images only) for self-supervised pretraining."
)


def forward_flops(model: torch.nn.Module, in_ch: int, size: int = INPUT_SIZE) -> int:
    """FLOPs (2 per multiply-add) of one forward pass on a [1, in_ch, size, size] input."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, in_ch, size, size))
    return int(counter.get_total_flops())


def ship(run_dir: str | Path, name: str, task: str, command: str, weights_dir: Path = WEIGHTS) -> dict:
    """Copy ``run_dir/final.safetensors`` to ``weights_dir/<name>.safetensors`` and write ``<name>.json``.

    Args:
        run_dir: a run folder with ``final.safetensors``, ``final.json`` and (for validation numbers) ``cv.json``.
        name: installed model name ("infnet" or "infnet_multiclass").
        task: "infection" or "multiclass".
        command: the command line that trains this model (recorded in the card).
        weights_dir: destination folder.

    Returns:
        the model card.
    """
    run_dir = Path(run_dir)
    final = json.loads((run_dir / "final.json").read_text())
    cv_path = run_dir / "cv.json"
    cv = json.loads(cv_path.read_text()) if cv_path.exists() else {}
    model = load_model(run_dir / "final.safetensors")
    spec = final["recipe"]["model"]
    in_ch = spec["config"].get("in_ch", 1)
    weights_dir.mkdir(parents=True, exist_ok=True)
    dest = weights_dir / f"{name}.safetensors"
    shutil.copyfile(run_dir / "final.safetensors", dest)
    card = {
        "name": name,
        "task": task,
        "architecture": spec,
        "params": count_parameters(model),
        "flops_per_slice": forward_flops(model, in_ch),
        "input": {"size": INPUT_SIZE, "channels": in_ch},
        "data": DATA_NOTE,
        "recipe": final["recipe"],
        "command": command,
        "training": {"device": final.get("device"), "final_fit_seconds": final.get("final_seconds")},
        "validation": {
            "protocol": "5-fold cross-validation over the 50 labelled slices (split by slice: no patient IDs)",
            "metrics": cv.get("cv"),
            "cv_seconds": cv.get("cv_seconds"),
        },
        "sha256": sha256_file(dest),
    }
    (weights_dir / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
