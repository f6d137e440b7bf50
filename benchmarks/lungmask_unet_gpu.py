"""Time lungmask's U-Net (R231's architecture, random weights) on a CT volume on the GPU, as lungmask runs it.

Issue 6 asks for ``covfast infer`` to be at least 20x faster than lungmask's U-Net on the same volume and the same
GPU. lungmask cannot be installed whole on the GPU machine (SimpleITK's wheel is too large to carry), and its
weights cannot be downloaded, so this script takes only ``lungmask/resunet.py`` from lungmask's wheel (loaded by
file, without the package's ``__init__``, which imports SimpleITK) and times the inference loop of
``LMInferer._inference``: slices at 256 x 256, clipped at 600 HU and scaled by (HU + 1024) / 1624, batches of 20
(lungmask's default) as float32 on the device, ``argmax`` over the classes and the uint8 labels copied back to the
host for each batch. lungmask's own preprocessing (body crop and resampling with scikit-image on the CPU) and its
volume postprocessing are left out and replaced by one ``F.interpolate`` on the GPU, so the figure is a lower bound
for lungmask's time on the volume: the ratio against covfast is, if anything, in lungmask's favour.

    python benchmarks/lungmask_unet_gpu.py VOLUME.nii.gz --resunet /path/to/lungmask/resunet.py --runs 5 --json F
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import statistics
import time

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F


def load_unet(resunet_path: str) -> torch.nn.Module:
    """lungmask's ``UNet`` class built like ``lungmask.mask.get_model`` builds R231 (3 classes), random weights."""
    spec = importlib.util.spec_from_file_location("lungmask_resunet", resunet_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return module.UNet(n_classes=3, padding=True, depth=5, up_mode="upsample", batch_norm=True, residual=False).eval()


def lungmask_loop(model: torch.nn.Module, hu: torch.Tensor, device: str, batch_size: int = 20) -> np.ndarray:
    """[Z, Y, X] int16 HU on the host -> [Z, 256, 256] uint8 labels on the host, lungmask's inference loop."""
    slices = F.interpolate(hu.to(device).float()[:, None], size=(256, 256), mode="bilinear", align_corners=False)
    slices = (slices.clamp(max=600) + 1024) / 1624
    labels = []
    with torch.inference_mode():
        for start in range(0, slices.shape[0], batch_size):
            prediction = model(slices[start:start + batch_size])
            labels.append(prediction.argmax(1).to(torch.uint8).cpu().numpy())
    return np.concatenate(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("volume", help="a NIfTI volume")
    parser.add_argument("--resunet", required=True, help="lungmask/resunet.py, taken from lungmask's wheel")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()

    data = np.asarray(nib.load(args.volume).dataobj).astype(np.int16)
    hu = torch.from_numpy(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))  # [Z, Y, X]
    model = load_unet(args.resunet).to(args.device)
    lungmask_loop(model, hu, args.device)  # warm-up: cuDNN autotuning, allocator
    seconds = []
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for _ in range(args.runs):
        sync()
        start = time.perf_counter()
        lungmask_loop(model, hu, args.device)
        sync()
        seconds.append(time.perf_counter() - start)
    result = {
        "what": "lungmask R231 U-Net (random weights), lungmask's inference loop, batches of 20, float32",
        "volume": args.volume, "shape_zyx": list(hu.shape), "runs_s": seconds, "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "parameters": sum(p.numel() for p in model.parameters()),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
