"""Neural networks of covfast: Inf-Net (single-class), the residual U-Net (multi-class, inpainting, coach)
and the plain U-Net baseline, with safetensors save/load.
"""

from covfast.nn.infnet import InfNet, InfNetOutput
from covfast.nn.io import build_model, count_parameters, load_model, read_architecture, save_model, sha256_file
from covfast.nn.unet import ResUNet, UNet

__all__ = [
    "InfNet",
    "InfNetOutput",
    "ResUNet",
    "UNet",
    "build_model",
    "count_parameters",
    "load_model",
    "read_architecture",
    "save_model",
    "sha256_file",
]
