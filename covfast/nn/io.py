"""Build, save and load covfast networks: safetensors weights with the architecture in the file metadata.

A model file holds only tensors and a JSON string of ``{"arch": ..., "config": {...}}`` in the safetensors
metadata, so loading never unpickles anything a user passes in.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from covfast.nn.infnet import InfNet
from covfast.nn.unet import ResUNet, UNet

ARCHITECTURES: dict[str, type[nn.Module]] = {"infnet": InfNet, "unet": UNet, "resunet": ResUNet}


def build_model(arch: str, **config) -> nn.Module:
    """Instantiate a network by architecture name ("infnet", "unet", "resunet") and keyword config."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return ARCHITECTURES[arch](**config)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(model: nn.Module, path: str | Path, arch: str, config: dict) -> str:
    """Write ``model``'s state (float32, contiguous) as safetensors; return the file's SHA-256.

    Args:
        model: the network.
        path: destination ``.safetensors`` file.
        arch: architecture name understood by :func:`build_model`.
        config: keyword arguments that rebuild the same architecture.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    meta = {"covfast": json.dumps({"arch": arch, "config": config})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return sha256_file(path)


def read_architecture(path: str | Path) -> tuple[str, dict]:
    """Return ``(arch, config)`` stored in a covfast safetensors file."""
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {}).get("covfast", "{}"))
    if "arch" not in meta:
        raise ValueError(f"{path}: not a covfast model file (no architecture metadata)")
    return meta["arch"], meta["config"]


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the network stored in ``path`` and load its weights; returned in eval mode on ``device``."""
    arch, config = read_architecture(path)
    model = build_model(arch, **config)
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()
