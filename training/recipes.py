"""Run a training recipe (a JSON file under ``training/recipes/``) with cross-validation and/or a final fit.

Recipe kinds:
    ``pretrain``  self-supervised inpainting on the unlabelled slices, with ``"mask": "coach"`` or ``"random"``;
                  writes ``<runs>/<name>/final.safetensors`` (the inpainting network).
    ``segment``   supervised segmentation on ``"data": "labelled"`` (5-fold CV -> ``fold<k>.safetensors``,
                  ``cv.json``; final fit on all 50 -> ``final.safetensors``) or ``"pseudo"`` (the unlabelled
                  slices with their pseudo labels; one fit -> ``final.safetensors``).
Optional keys: ``"init": {"run": NAME, "prefix": "backbone.", "file": "final.safetensors"}`` starts from matching
weights of another run's ``final.safetensors`` (or the ``file`` named, e.g. ``fold0.safetensors``; ``"{model}"`` means
the same fit's model of that run: ``fold<k>.safetensors`` in CV fold k, ``final.safetensors`` in the final fit, so a
two-stage recipe cross-validates cleanly); ``"prior": {"run": NAME}`` feeds that single-class run's prediction (fold model in CV,
final model otherwise) as the second input channel (``{"runs": [NAME, ...]}``: the mean of their predictions, as the
pipeline averages its ensemble); ``"negatives": {..., "mix": {"labelled": P, GROUP: P, ...}}``
adds infection-free slices (:func:`training.negatives.load_negatives`) to the labelled training slices and draws
each group with the given probability; ``"teacher": {"runs": [NAME, ...], "tta": {NAME: "h"}, "pseudo_weight": W}`` adds the group
``"teacher"`` (name it in ``mix``; the teacher's own ``"mix"`` when the recipe has no ``negatives``): the 1,600 unlabelled slices with soft targets = the mean probability of those
runs' models for the same fit (self-training; in CV fold k the fold-k models, which never saw fold k), cached in
``<runs>/<name>/teacher_<fit>.npz`` keyed by the teacher files' SHA-256; with ``pseudo_weight`` W the target is
(1 - W) x teacher + W x the slice's published Semi-Inf-Net pseudo label.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from covfast.evaluate import summarize
from covfast.nn import build_model, count_parameters, load_model, save_model, sha256_file
from training.augment import AugmentConfig
from training.data import SliceSet, cv_folds, load_labelled, load_unlabelled
from training.loops import OptimConfig, flip_probs, predict, score, train_inpainting, train_segmentation
from training.negatives import load_negatives
from training.ship import fold_summary


def load_recipe(path: str | Path) -> dict:
    """Read a recipe JSON file; its file stem is the default run name."""
    recipe = json.loads(Path(path).read_text())
    recipe.setdefault("name", Path(path).stem)
    return recipe


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto" -> CUDA when available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def init_from(model: torch.nn.Module, path: Path, prefix: str = "") -> int:
    """Copy the tensors of ``path`` whose names start with ``prefix`` and whose shapes fit into ``model``.

    A first convolution with more input channels than the source (slice + prior after slice-only pretraining)
    gets the source's weights in its first channels and zeros elsewhere, so it starts as the pretrained
    slice-only filter. Returns the number of tensors copied.
    """
    source = load_file(str(path))
    target = model.state_dict()
    copied = 0
    for key, value in source.items():
        if not key.startswith(prefix) or key not in target:
            continue
        dest = target[key]
        if dest.shape == value.shape:
            target[key] = value
        elif dest.dim() == 4 and dest.shape[0] == value.shape[0] and dest.shape[2:] == value.shape[2:]:
            widened = torch.zeros_like(dest)
            widened[:, : value.shape[1]] = value
            target[key] = widened
        else:
            continue
        copied += 1
    model.load_state_dict(target)
    return copied


def _model(recipe: dict, runs: Path, model_file: str = "final.safetensors") -> tuple[torch.nn.Module, str]:
    """Build the recipe's model; ``init.file`` may say ``{model}``: the init run's model of the same fit
    (``fold<k>.safetensors`` for CV fold k, ``final.safetensors`` for the final fit)."""
    spec = recipe["model"]
    model = build_model(spec["arch"], **spec.get("config", {}))
    note = f"{spec['arch']} {count_parameters(model) / 1e6:.2f} M parameters"
    if recipe.get("init"):
        init_file = recipe["init"].get("file", "final.safetensors").replace("{model}", model_file)
        source = runs / recipe["init"]["run"] / init_file
        copied = init_from(model, source, recipe["init"].get("prefix", ""))
        note += f"; {copied} tensors from {source}"
    return model, note


def _optim(recipe: dict) -> OptimConfig:
    return OptimConfig(**recipe.get("optim", {}))


def _augment(recipe: dict) -> AugmentConfig | None:
    cfg = recipe.get("augment")
    if cfg is None:
        return None
    return AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


def _mean_probability(runs: Path, names: list[str], model_file: str, images: torch.Tensor,
                      tta: dict | None = None) -> torch.Tensor:
    """[N, 1, S, S] mean single-class probability of the runs' ``model_file`` models, each over its flips in
    ``tta`` (name -> "none" | "h" | "hv"; default "none")."""
    tta = tta or {}
    return sum(flip_probs(load_model(runs / name / model_file, images.device), images, tta.get(name, "none"))
               for name in names) / len(names)


def _priors(recipe: dict, runs: Path, model_file: str, images: torch.Tensor) -> torch.Tensor | None:
    """The prior channel: the prediction of the ``prior`` run's model, or the mean of the ``prior`` runs' models (the
    pipeline's ensemble), for the same fit (``model_file``)."""
    spec = recipe.get("prior")
    if not spec:
        return None
    return _mean_probability(runs, spec["runs"] if "runs" in spec else [spec["run"]], model_file, images)


def teacher_targets(spec: dict, runs: Path, model_file: str, images: torch.Tensor, cache: Path) -> torch.Tensor:
    """[N, 1, S, S] uint8 soft targets (0..255): the mean probability of the ``spec["runs"]`` models ``model_file``.

    Args:
        spec: the recipe's ``teacher`` entry: ``{"runs": [NAME, ...], "tta": {NAME: "none" | "h" | "hv"}}``.
        runs: the runs folder holding ``<NAME>/<model_file>``.
        model_file: ``fold<k>.safetensors`` or ``final.safetensors``.
        images: [N, 1, S, S] uint8 slices (the unlabelled set) on the training device.
        cache: ``.npz`` file reused while the teacher files' SHA-256 match.
    """
    shas = [sha256_file(runs / name / model_file) for name in spec["runs"]]
    key = "|".join([*shas, json.dumps(spec.get("tta", {}), sort_keys=True), str(tuple(images.shape))])
    if cache.exists():
        with np.load(cache) as saved:
            if str(saved["key"]) == key:
                return torch.from_numpy(saved["targets"]).to(images.device)
    t0 = time.perf_counter()
    prob = _mean_probability(runs, spec["runs"], model_file, images, spec.get("tta"))
    targets = (prob * 255).round().clamp(0, 255).to(torch.uint8)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, targets=targets.cpu().numpy(), key=np.array(key))
    print(f"teacher {model_file}: {len(images)} slices in {time.perf_counter() - t0:.0f}s", flush=True)
    return targets


def _with_teacher(recipe, runs, negatives, unlabelled, model_file) -> dict | None:
    """The negative groups plus the ``teacher`` group for one fit (``model_file``), when the recipe asks for it."""
    if "teacher" not in recipe:
        return negatives
    spec = recipe["teacher"]
    cache = runs / recipe["name"] / f"teacher_{Path(model_file).stem}.npz"
    targets = teacher_targets(spec, runs, model_file, unlabelled.images, cache).cpu()
    if spec.get("pseudo_weight"):
        # Blend with the slices' published Semi-Inf-Net pseudo labels: where the two teachers disagree the target
        # stays soft (our networks, trained on tight MedSeg lung crops, fire on the chest wall of these wider crops).
        w = float(spec["pseudo_weight"])
        targets = ((1 - w) * targets.float() + w * unlabelled.targets.float()).round().to(torch.uint8)
    return {**(negatives or {}), "teacher": SliceSet(unlabelled.names, unlabelled.images.cpu(), targets)}


def _save(model, out: Path, recipe: dict, meta: dict) -> str:
    spec = recipe["model"]
    sha = save_model(model, out, spec["arch"], spec.get("config", {}))
    out.with_suffix(".json").write_text(json.dumps({**meta, "sha256": sha}, indent=2))
    return sha


def _save_raw(log, recipe: dict, path: Path) -> None:
    """With ``optim.ema``, the saved model is the weight average; the last weights go to ``path`` beside it."""
    if log.raw_state is None:
        return
    spec = recipe["model"]
    raw = build_model(spec["arch"], **spec.get("config", {}))
    raw.load_state_dict(log.raw_state)
    save_model(raw, path, spec["arch"], spec.get("config", {}))


def run_pretrain(recipe: dict, data: Path, runs: Path, device: torch.device, seed: int) -> dict:
    """Self-supervised inpainting pretraining on the unlabelled slices; writes final.safetensors."""
    out_dir = runs / recipe["name"]
    size = recipe.get("size", 352)
    images = load_unlabelled(data, size).images.to(device)
    model, note = _model(recipe, runs)
    coach = None
    if recipe["mask"] == "coach":
        spec = recipe["coach"]
        coach = build_model(spec["arch"], **spec.get("config", {}))
    opt = _optim(recipe)
    log = train_inpainting(
        model,
        images,
        opt,
        device,
        seed,
        coach=coach,
        steps_coach=recipe.get("steps_coach", 0),
        steps_alt=recipe.get("steps_alt", 0),
        keep=recipe.get("keep", 0.75),
        alpha=recipe.get("alpha", 1.0),
        score_gain=recipe.get("score_gain", 10.0),
        aug=_augment(recipe),
        ckpt_path=out_dir / "ckpt.pt",
    )
    meta = {"recipe": recipe, "model": note, "device": str(device), "seconds": log.seconds, "l_rec": log.losses}
    _save(model, out_dir / "final.safetensors", recipe, meta)
    if coach is not None:
        save_model(coach, out_dir / "coach.safetensors", recipe["coach"]["arch"], recipe["coach"].get("config", {}))
    return meta


def _with_negatives(slices: SliceSet, negatives: dict[str, SliceSet], mix: dict[str, float]):
    """Labelled slices plus negative groups on the soft 0..255 target scale, and per-slice sampling weights."""
    groups = {"labelled": SliceSet(slices.names, slices.images, slices.targets * 255), **negatives}
    weights = torch.cat([torch.full((len(g.names),), mix[name] / len(g.names)) for name, g in groups.items()])
    names = [n for g in groups.values() for n in g.names]
    merged = SliceSet(
        names, torch.cat([g.images for g in groups.values()]), torch.cat([g.targets for g in groups.values()])
    )
    return merged, weights


def _fit(
    recipe, runs, slices, device, seed, ckpt, priors=None, soft=False, negatives=None, model_file="final.safetensors"
):
    model, note = _model(recipe, runs, model_file)
    task = recipe.get("task", "infection")
    weights = None
    if negatives:
        mix = recipe["negatives"]["mix"] if "negatives" in recipe else recipe["teacher"]["mix"]
        slices, weights = _with_negatives(slices, negatives, mix)
        soft = True
        note += f"; {len(slices.names)} slices with negatives"
    log = train_segmentation(
        model,
        slices.images.to(device),
        slices.targets.to(device),
        task,
        _optim(recipe),
        _augment(recipe),
        device,
        seed,
        priors=priors,
        soft_targets=soft,
        ckpt_path=ckpt,
        log_every=recipe.get("log_every", 100),
        sample_weights=None if weights is None else weights.to(device),
    )
    return model, note, log


def run_segment(
    recipe: dict, data: Path, runs: Path, device: torch.device, seed: int, folds: list[int], final: bool
) -> dict:
    """Supervised segmentation: CV folds and/or the final fit (see the module docstring)."""
    out_dir = runs / recipe["name"]
    out_dir.mkdir(parents=True, exist_ok=True)
    size = recipe.get("size", 352)
    task = recipe.get("task", "infection")
    summary: dict = {"recipe": recipe, "device": str(device)}
    if recipe.get("data", "labelled") == "pseudo":
        slices = load_unlabelled(data, size)
        model, note, log = _fit(recipe, runs, slices, device, seed, out_dir / "ckpt.pt", soft=True)
        summary.update(model=note, seconds=log.seconds)
        _save(model, out_dir / "final.safetensors", recipe, summary)
        return summary
    labelled = load_labelled(data, size, task)
    all_images = labelled.images.to(device)
    negatives = load_negatives(recipe["negatives"], data, size) if recipe.get("negatives") else None
    unlabelled = load_unlabelled(data, size) if "teacher" in recipe else None
    if unlabelled is not None:
        unlabelled.images = unlabelled.images.to(device)
    split = cv_folds(len(labelled.names), 5, recipe.get("split_seed", 0))
    for k in folds:
        val = split[k]
        train = [i for i in range(len(labelled.names)) if i not in set(val.tolist())]
        priors = _priors(recipe, runs, f"fold{k}.safetensors", all_images)
        model, note, log = _fit(
            recipe,
            runs,
            labelled.subset(train),
            device,
            seed + k,
            out_dir / f"fold{k}.pt",
            priors=None if priors is None else priors[train],
            negatives=_with_teacher(recipe, runs, negatives, unlabelled, f"fold{k}.safetensors"),
            model_file=f"fold{k}.safetensors",
        )
        val_set = labelled.subset(val)
        probs = predict(model, all_images[val], task, None if priors is None else priors[val])
        per_image = score(probs, val_set.native_targets, val_set.names, task)
        fold = {"recipe": recipe, "device": str(device), "fold": k, "model": note, "seconds": log.seconds}
        fold.update(val=val_set.names, per_image=per_image)
        # fold<k>.json: the model's metadata (as for final.json) plus its per-slice validation scores.
        sha = save_model(
            model, out_dir / f"fold{k}.safetensors", recipe["model"]["arch"], recipe["model"].get("config", {})
        )
        _save_raw(log, recipe, out_dir / f"fold{k}_raw.safetensors")
        (out_dir / f"fold{k}.json").write_text(json.dumps({**fold, "sha256": sha}, indent=2))
        print(f"{recipe['name']} fold {k}: {log.seconds:.0f}s", flush=True)
    pooled = fold_summary(out_dir, task)
    if pooled is not None and len(pooled["folds"]) == 5:
        summary.update(cv=pooled["metrics"], cv_seconds=pooled["seconds"])
        (out_dir / "cv.json").write_text(json.dumps(summary, indent=2))
    if final:
        priors = _priors(recipe, runs, "final.safetensors", all_images)
        model, note, log = _fit(
            recipe, runs, labelled, device, seed, out_dir / "final.pt", priors=priors,
            negatives=_with_teacher(recipe, runs, negatives, unlabelled, "final.safetensors"),
        )
        summary.update(model=note, final_seconds=log.seconds)
        _save(model, out_dir / "final.safetensors", recipe, summary)
        _save_raw(log, recipe, out_dir / "final_raw.safetensors")
    return summary


def run_recipe(
    path: str | Path,
    data: str | Path,
    runs: str | Path = "runs",
    device: str = "auto",
    seed: int = 0,
    folds: list[int] | None = None,
    final: bool = False,
    cpu_bf16: bool = False,
) -> dict:
    """Run one recipe file; returns the summary it also writes next to its outputs.

    ``cpu_bf16`` sets the recipe's ``optim.cpu_bf16`` (see :class:`training.loops.OptimConfig`), so the run's
    saved recipe records it.
    """
    recipe = load_recipe(path)
    if cpu_bf16:
        recipe["optim"] = {**recipe.get("optim", {}), "cpu_bf16": True}
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    if recipe["kind"] == "pretrain":
        result = run_pretrain(recipe, Path(data), Path(runs), dev, seed)
    elif recipe["kind"] == "segment":
        result = run_segment(
            recipe, Path(data), Path(runs), dev, seed, list(range(5)) if folds is None else folds, final
        )
    else:
        raise ValueError(f"{path}: unknown recipe kind {recipe['kind']!r}")
    print(f"{recipe['name']}: done in {time.perf_counter() - t0:.0f}s on {dev}", flush=True)
    return result


def score_fold(model_path: str | Path, data: str | Path, fold: int, size: int = 256, split_seed: int = 0) -> dict:
    """Metrics of a single-class model file on one CV fold of the labelled slices (native size, as in ``cv.json``).

    Returns:
        ``{"model": path, "fold": k, "val": names, "summary": summarize(...), "per_image": [...]}``.
    """
    labelled = load_labelled(data, size, "infection")
    val = labelled.subset(cv_folds(len(labelled.names), 5, split_seed)[fold])
    per_image = score(
        predict(load_model(model_path), val.images, "infection"), val.native_targets, val.names, "infection"
    )
    return {
        "model": str(model_path),
        "fold": fold,
        "val": val.names,
        "summary": summarize(per_image),
        "per_image": per_image,
    }
