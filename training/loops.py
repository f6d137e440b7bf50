"""Training loops: supervised segmentation (Inf-Net, U-Net, multi-class) and self-supervised inpainting
pretraining with a coach network or with random erasing.

Loops sample batches from tensors that live on the training device, checkpoint every ``ckpt_every`` steps
and resume from the last checkpoint when restarted with the same arguments.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from covfast import ops
from covfast.evaluate import binary_metrics, multiclass_metrics
from covfast.nn import InfNetOutput
from covfast.nn.preprocess import PIXEL_MEAN, PIXEL_STD
from training.augment import AugmentConfig, augment
from training.losses import infnet_loss, lovasz_hinge, multiclass_loss, reconstruction_loss, structure_loss


@dataclass
class OptimConfig:
    """Optimiser and schedule: AdamW, linear warm-up then cosine decay to zero.

    ``cpu_bf16`` trains on a CPU under bfloat16 autocast with channels-last tensors (weights, optimiser state and
    losses stay float32). On a CPU with AMX (Sapphire Rapids and later) this makes a training step 2-3.4 times
    faster (``benchmarks/train_step_speed.py``). On CUDA the loops always use bfloat16 autocast.

    ``ema`` > 0 keeps an exponential moving average of the weights and batch-norm statistics with that decay
    (warmed up as min(ema, (1 + step) / (10 + step))); :func:`train_segmentation` returns the model holding the
    average and the last weights in ``TrainLog.raw_state``.

    ``lovasz`` > 0 adds that weight times the Lovasz hinge (:func:`training.losses.lovasz_hinge`) of the single-class
    prediction map to the loss.
    """

    steps: int = 1000
    batch: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 50
    ckpt_every: int = 500
    cpu_bf16: bool = False
    ema: float = 0.0
    lovasz: float = 0.0


@dataclass
class TrainLog:
    """Loss history and wall time of one loop."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    raw_state: dict | None = None


class _Ema:
    """Exponential moving average of a model's floating-point state (parameters and batch-norm statistics)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        state = model.state_dict()
        for key, value in self.shadow.items():
            value.lerp_(state[key].detach(), 1 - decay)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state["shadow"].items():
            self.shadow[key].copy_(value)
        self.updates = int(state["updates"])

    def swap_into(self, model: nn.Module) -> dict:
        """Load the average into ``model``; return a copy of the weights it had."""
        raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict({**raw, **self.shadow})
        return raw


def standardize(x01: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] values in [0, 1] -> network input scale (see :mod:`covfast.nn.preprocess`)."""
    return (x01 - PIXEL_MEAN) / PIXEL_STD


def _schedule(opt: OptimConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < opt.warmup:
            return (step + 1) / opt.warmup
        progress = (step - opt.warmup) / max(1, opt.steps - opt.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _autocast(device: torch.device, opt: OptimConfig | None = None):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(opt is not None and opt.cpu_bf16))


def _channels_last(device: torch.device, opt: OptimConfig) -> bool:
    return device.type == "cpu" and opt.cpu_bf16


def _memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class _Checkpoint:
    """Save / restore modules, optimisers, schedulers, the step and the generator state in one file."""

    def __init__(self, path: Path | None, every: int, **objects):
        self.path, self.every, self.objects = path, every, objects

    def restore(self, generator: torch.Generator) -> int:
        if self.path is None or not self.path.exists():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        for name, obj in self.objects.items():
            obj.load_state_dict(state[name])
        generator.set_state(state["generator"])
        return int(state["step"])

    def maybe_save(self, step: int, generator: torch.Generator, final: bool = False) -> None:
        if self.path is None or not (final or (step % self.every == 0 and step > 0)):
            return
        state = {name: obj.state_dict() for name, obj in self.objects.items()}
        state["generator"] = generator.get_state()
        state["step"] = step
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)


def _optimizer(params, opt: OptimConfig):
    optimizer = torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(opt))


def model_inputs(images_u8: torch.Tensor, priors: torch.Tensor | None) -> torch.Tensor:
    """Stack the slice (and the prior probability) as [B, C, S, S] float in [0, 1]."""
    x = images_u8.float() / 255.0
    return x if priors is None else torch.cat([x, priors.float()], dim=1)


def segmentation_targets(targets_u8: torch.Tensor, task: str, soft: bool) -> torch.Tensor:
    """uint8 targets -> float: [B, 1] probability for "infection", [B, 3] one-hot for "multiclass"."""
    if task == "multiclass":
        return F.one_hot(targets_u8[:, 0].long(), 3).permute(0, 3, 1, 2).float()
    return targets_u8.float() / 255.0 if soft else targets_u8.float()


def segmentation_loss(model_out, target: torch.Tensor, valid: torch.Tensor, task: str, lovasz: float = 0.0
                      ) -> torch.Tensor:
    """The loss of the model's output type: Inf-Net deep supervision, multi-class, or a single map; plus ``lovasz``
    times the Lovasz hinge of the single-class prediction map when ``lovasz`` > 0."""
    if isinstance(model_out, InfNetOutput):
        loss, prediction = infnet_loss(model_out, target, valid), model_out.prediction
    elif task == "multiclass":
        return multiclass_loss(model_out, target, valid)
    else:
        loss, prediction = structure_loss(model_out, target, valid), model_out
    return loss + lovasz * lovasz_hinge(prediction, target, valid) if lovasz > 0 else loss


def train_segmentation(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    task: str,
    opt: OptimConfig,
    aug: AugmentConfig | None,
    device: torch.device,
    seed: int,
    priors: torch.Tensor | None = None,
    soft_targets: bool = False,
    ckpt_path: Path | None = None,
    log_every: int = 100,
    sample_weights: torch.Tensor | None = None,
) -> TrainLog:
    """Supervised training of a segmentation network.

    Args:
        model: Inf-Net, U-Net or residual U-Net.
        images: [N, 1, S, S] uint8 slices on ``device``.
        targets: [N, 1, S, S] uint8 targets (0/1, 0/1/2, or 0..255 soft with ``soft_targets``).
        task: "infection" or "multiclass".
        opt: optimiser settings.
        aug: augmentation, or None for none.
        device: training device.
        seed: seed of batch sampling and augmentation.
        priors: optional [N, 1, S, S] float prior probabilities (multi-class input).
        soft_targets: targets are 0..255 soft labels.
        ckpt_path: checkpoint file for resuming, or None.
        log_every: print the mean loss every this many steps.
        sample_weights: optional [N] float relative probability of drawing each slice (e.g. to balance slices
            with and without infection); uniform when None.

    Returns:
        the loss history and wall time.
    """
    channels_last = _channels_last(device, opt)
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer, scheduler = _optimizer(model.parameters(), opt)
    generator = torch.Generator(device=device).manual_seed(seed)
    extra = {"ema": _Ema(model, opt.ema)} if opt.ema > 0 else {}
    ckpt = _Checkpoint(ckpt_path, opt.ckpt_every, model=model, optimizer=optimizer, scheduler=scheduler, **extra)
    start = ckpt.restore(generator)
    log, t0 = TrainLog(), time.perf_counter()
    for step in range(start, opt.steps):
        if sample_weights is None:
            index = torch.randint(len(images), (opt.batch,), device=device, generator=generator)
        else:
            index = torch.multinomial(sample_weights, opt.batch, replacement=True, generator=generator)
        x = model_inputs(images[index], None if priors is None else priors[index])
        y = segmentation_targets(targets[index], task, soft_targets)
        if aug is not None:
            x, y, valid = augment(x, y, aug, generator)
        else:
            valid = torch.ones_like(y[:, :1])
        with _autocast(device, opt):
            loss = segmentation_loss(model(_memory_format(standardize(x), channels_last)), y, valid, task, opt.lovasz)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if extra:
            extra["ema"].update(model)
        log.losses.append(float(loss.detach()) if (step + 1) % log_every == 0 else math.nan)
        if (step + 1) % log_every == 0:
            print(f"step {step + 1}/{opt.steps} loss {log.losses[-1]:.4f} {time.perf_counter() - t0:.0f}s", flush=True)
        ckpt.maybe_save(step + 1, generator, final=step + 1 == opt.steps)
    log.seconds = time.perf_counter() - t0
    if extra:
        log.raw_state = extra["ema"].swap_into(model)
    model.to(memory_format=torch.contiguous_format).eval()
    return log


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, task: str, priors: torch.Tensor | None = None, batch: int = 16
) -> torch.Tensor:
    """Probabilities of a segmentation network.

    Args:
        model: network in eval mode on the images' device.
        images: [N, 1, S, S] uint8 slices.
        task: "infection" (sigmoid of the prediction) or "multiclass" (softmax over 3 classes).
        priors: optional [N, 1, S, S] float priors.
        batch: slices per forward pass.

    Returns:
        [N, 1 or 3, S, S] float32 probabilities.
    """
    model.eval()
    outs = []
    for i in range(0, len(images), batch):
        x = standardize(model_inputs(images[i : i + batch], None if priors is None else priors[i : i + batch]))
        out = model(x)
        logits = (out.prediction if isinstance(out, InfNetOutput) else out).float()
        outs.append(torch.softmax(logits, dim=1) if task == "multiclass" else torch.sigmoid(logits))
    return torch.cat(outs)


def flip_probs(model: nn.Module, images: torch.Tensor, tta: str) -> torch.Tensor:
    """Single-class probabilities averaged over the identity and the flips of ``tta`` ("none", "h" or "hv"), the
    pipeline's test-time augmentation (:data:`covfast.pipeline.infection.TTA_CHOICES`)."""
    dims = {"none": [], "h": [-1], "hv": [-1, -2]}[tta]
    with torch.no_grad():
        probs = [predict(model, images, "infection")]
        probs += [predict(model, images.flip(d), "infection").flip(d) for d in dims]
    return sum(probs) / len(probs)


def score(probs: torch.Tensor, native_targets: list[np.ndarray], names: list[str], task: str) -> list[dict]:
    """Per-slice metrics at each slice's native size (probabilities resized bilinearly)."""
    per_image = []
    for prob, truth, name in zip(probs, native_targets, names):
        native = F.interpolate(prob[None].float(), size=truth.shape, mode="bilinear", align_corners=False)[0]
        native = native.cpu().numpy()
        metrics = binary_metrics(native[0], truth > 0) if task == "infection" else multiclass_metrics(native, truth)
        per_image.append({"image": name, **metrics})
    return per_image


def random_scores(
    shape: tuple[int, ...], device: torch.device, generator: torch.Generator, cells: int = 11, gain: float = 50.0
) -> torch.Tensor:
    """Smooth random score maps [B, 1, S, S] for the random-erasing masks.

    Uniform noise on a coarse ``cells`` x ``cells`` grid upsampled bicubically, so thresholding at a quantile
    erases blobs of lesion-like size; ``gain`` spreads the scores over tens of logits so that with alpha = 1
    the mask is nearly binary except at blob borders.
    """
    coarse = torch.rand(shape[0], 1, cells, cells, device=device, generator=generator) * gain
    return F.interpolate(coarse, size=shape[-2:], mode="bicubic", align_corners=False)


def train_inpainting(
    net: nn.Module,
    images: torch.Tensor,
    opt: OptimConfig,
    device: torch.device,
    seed: int,
    coach: nn.Module | None = None,
    steps_coach: int = 0,
    steps_alt: int = 0,
    keep: float = 0.75,
    alpha: float = 1.0,
    score_gain: float = 10.0,
    aug: AugmentConfig | None = None,
    ckpt_path: Path | None = None,
    log_every: int = 100,
) -> TrainLog:
    """Self-supervised inpainting pretraining, with a coach (min-max) or with random erasing.

    The image x is masked by M = coach_mask(score, keep, alpha) (``covfast.ops.coach_mask``: M =
    sigmoid(alpha (score - t_k)), a fraction ``keep`` of each image stays); the network reconstructs x from
    x * M with loss L_rec = mean |net(x * M) - x|. Schedule: ``opt.steps`` network steps on random-score
    masks; then with a coach, ``steps_coach`` coach steps on L_coach = 1 - L_rec(x * M) (the coach learns to
    erase what the network inpaints worst), then ``steps_alt`` alternating steps (one network step on the
    coach's mask, one coach step).

    Args:
        net: inpainting network (1 channel in, 1 channel out; sigmoid gives the reconstruction).
        images: [N, 1, S, S] uint8 slices on ``device``.
        opt: network optimiser settings; ``opt.steps`` is the number of random-mask warm-up steps.
        device: training device.
        seed: seed of sampling, augmentation and random masks.
        coach: coach network scoring pixels (1 channel in and out), or None for random erasing only.
        steps_coach: coach-only steps.
        steps_alt: alternating steps.
        keep: fraction of each image kept.
        alpha: sigmoid sharpness.
        score_gain: fixed scale of the coach's output (part of the coach network): a freshly initialised coach
            outputs values near 0, where alpha = 1 would give a uniform half-dimmed mask instead of an erasure.
        aug: optional augmentation (geometric only is meaningful here).
        ckpt_path: checkpoint for resuming.
        log_every: print every this many steps.

    Returns:
        the network's reconstruction-loss history and the wall time.
    """
    net.to(device).train()
    net_opt, net_sched = _optimizer(net.parameters(), OptimConfig(**{**opt.__dict__, "steps": opt.steps + steps_alt}))
    objects = {"net": net, "net_opt": net_opt, "net_sched": net_sched}
    if coach is not None:
        coach.to(device).train()
        coach_cfg = OptimConfig(**{**opt.__dict__, "steps": steps_coach + steps_alt})
        coach_opt, coach_sched = _optimizer(coach.parameters(), coach_cfg)
        objects.update(coach=coach, coach_opt=coach_opt, coach_sched=coach_sched)
    generator = torch.Generator(device=device).manual_seed(seed)
    total = opt.steps + (steps_coach + steps_alt if coach is not None else 0)
    ckpt = _Checkpoint(ckpt_path, opt.ckpt_every, **objects)
    start = ckpt.restore(generator)
    log, t0 = TrainLog(), time.perf_counter()

    def batch():
        index = torch.randint(len(images), (opt.batch,), device=device, generator=generator)
        x = images[index].float() / 255.0
        if aug is not None:
            x, _, _ = augment(x, x, aug, generator)
        return x

    def coach_scores(x):
        with _autocast(device, opt):
            return coach(standardize(x)).float() * score_gain

    def net_step(x, mask):
        with _autocast(device, opt):
            recon = torch.sigmoid(net(standardize(x * mask)).float())
        loss = reconstruction_loss(recon, x)
        net_opt.zero_grad(set_to_none=True)
        loss.backward()
        net_opt.step()
        net_sched.step()
        return loss

    def coach_step(x):
        mask = ops.coach_mask(coach_scores(x), keep, alpha)
        with _autocast(device, opt):
            recon = torch.sigmoid(net(standardize(x * mask)).float())
        loss = 1 - reconstruction_loss(recon, x)
        coach_opt.zero_grad(set_to_none=True)
        net_opt.zero_grad(set_to_none=True)
        loss.backward()
        coach_opt.step()
        coach_sched.step()

    for step in range(start, total):
        x = batch()
        phase = "net" if step < opt.steps else ("coach" if step < opt.steps + steps_coach else "alt")
        if phase == "net":
            loss = net_step(x, ops.coach_mask(random_scores(x.shape, device, generator), keep, alpha))
        elif phase == "coach":
            coach_step(x)
            loss = None
        else:
            with torch.no_grad():
                mask = ops.coach_mask(coach_scores(x), keep, alpha)
            loss = net_step(x, mask)
            coach_step(batch())
        if loss is not None and (step + 1) % log_every == 0:
            log.losses.append(float(loss.detach()))
            print(
                f"{phase} step {step + 1}/{total} L_rec {log.losses[-1]:.4f} {time.perf_counter() - t0:.0f}s",
                flush=True,
            )
        ckpt.maybe_save(step + 1, generator, final=step + 1 == total)
    log.seconds = time.perf_counter() - t0
    net.eval()
    return log
