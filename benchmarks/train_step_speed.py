"""Time one training step of the shipped architectures on the CPU: float32 as every run before session 14 trained
(the loss's boundary weights by ``avg_pool2d``, once per supervised map), float32 (running-sum box means, one
weight per target), bfloat16 autocast, and bfloat16 with channels-last tensors (what ``python -m training run
--cpu-bf16`` does).

    python benchmarks/train_step_speed.py --threads 2 --json benchmarks/results/train_step_cpu_s15.json

Each recipe's network (``training/recipes/<name>.json``) takes a batch of 8 random 256 x 256 slices through
forward, the recipe's loss, backward and an AdamW step; the time is the mean of ``--steps`` steps after two
warm-up steps. The speed-up is large only where the CPU has bfloat16 matrix units (AMX, Intel Sapphire Rapids and
later): oneDNN then runs the convolutions on them. The CPU's flags are recorded beside the times.
"""

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from covfast.nn import build_model
from training import loops, losses
from training.loops import OptimConfig, _autocast, segmentation_loss

RECIPES = Path(__file__).resolve().parents[1] / "training" / "recipes"
MODES = ("fp32_avgpool_loss", "fp32", "bf16", "bf16_channels_last")


def infnet_loss_before_s14(out, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The Inf-Net loss as it ran before session 14: each of the four maps computed its own boundary weight."""
    loss = losses.structure_loss(out.global_map, target, valid)
    for side in out.side:
        loss = loss + losses.structure_loss(side, target, valid)
    return loss + F.binary_cross_entropy_with_logits(out.edge.float(), losses.edge_target(target), weight=valid)


def step_ms(arch: str, config: dict, mode: str, steps: int, batch: int, size: int) -> float:
    torch.manual_seed(0)
    model = build_model(arch, **config)
    x = torch.rand(batch, 1, size, size)
    y = (torch.rand(batch, 1, size, size) > 0.8).float()
    valid = torch.ones_like(y)
    if mode == "bf16_channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = OptimConfig(cpu_bf16=mode.startswith("bf16"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def one():
        with _autocast(torch.device("cpu"), opt):
            loss = segmentation_loss(model(x), y, valid, "infection")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    box_mean, infnet_loss = losses.box_mean, loops.infnet_loss
    if mode == "fp32_avgpool_loss":
        losses.box_mean = lambda x, size=31: F.avg_pool2d(x, size, stride=1, padding=size // 2)
        loops.infnet_loss = infnet_loss_before_s14
    try:
        one()
        one()
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
    finally:
        losses.box_mean, loops.infnet_loss = box_mean, infnet_loss
    return (time.perf_counter() - t0) / steps * 1000


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512_vnni", "avx_vnni")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="infnet_long,unet_long_aug")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.recipes.split(","):
        spec = json.loads((RECIPES / f"{name}.json").read_text())["model"]
        times = {m: step_ms(spec["arch"], spec.get("config", {}), m, args.steps, args.batch, args.size) for m in MODES}
        rows.append({"recipe": name, "arch": spec["arch"], "ms_per_step": {m: round(t, 1) for m, t in times.items()},
                     "speedup": {m: round(times[MODES[0]] / t, 2) for m, t in times.items()}})
        print(name, "  ".join(f"{m} {t:.0f} ms ({times[MODES[0]] / t:.2f}x)" for m, t in times.items()), flush=True)
    result = {
        "date": date.today().isoformat(),
        "device": platform.processor() or platform.machine(),
        "cpu_flags": cpu_flags(),
        "threads": args.threads,
        "torch": torch.__version__,
        "batch": args.batch,
        "size": args.size,
        "command": "python benchmarks/train_step_speed.py " + f"--threads {args.threads} --steps {args.steps}",
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
