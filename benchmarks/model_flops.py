"""Parameters and multiply-accumulates per 256 x 256 slice of the segmentation networks (a markdown table).

    python benchmarks/model_flops.py

Counted by ``torch.utils.flop_counter`` on one forward pass (FLOPs / 2 = MACs); the multi-class network is the
installed one (its input is slice + prior, two channels).
"""

import torch
from torch.utils.flop_counter import FlopCounterMode

from covfast.nn import load_model
from covfast.nn.infnet import InfNet
from covfast.nn.unet import UNet
from covfast.pipeline.infection import MULTI_CLASS, WEIGHTS_DIR


def main() -> None:
    nets = {
        "InfNet() (shipped single-class config)": (InfNet(), 1),
        "InfNet(fine=True, fine_ch=32)": (InfNet(fine=True, fine_ch=32), 1),
        "UNet(base=16) (unet_long_aug)": (UNet(in_ch=1, out_ch=1, base=16), 1),
        f"installed {MULTI_CLASS} (ResUNet)": (load_model(WEIGHTS_DIR / f"{MULTI_CLASS}.safetensors"), 2),
    }
    print("| network | parameters | GMAC per 256 x 256 slice |\n|---|---:|---:|")
    for name, (model, in_ch) in nets.items():
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_ch, 256, 256))
        print(f"| {name} | {sum(p.numel() for p in model.parameters()):,} | {counter.get_total_flops() / 2e9:.2f} |")


if __name__ == "__main__":
    main()
