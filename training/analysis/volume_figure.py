"""Axial slices of a COVID-CT-MD case with the infection mask check-volumes found and the radiologists' slice label
(one-off figure).

    python training/analysis/volume_figure.py cap001 --prob runs/s9/check_int8/cap001_prob.npz \
        --slices 40,55,70,85,100,115 --out training/figures/cap001_s10.png

Each tile: the slice in a lung window (-1350..150 HU), the voxels with infection probability >= 0.5 in red (the
``<case>_prob.npz`` that ``python -m training check-volumes`` writes: p x 255 as uint8 on the volume's grid), and in its corner the
slice index, the radiologists' label from ``labels.json`` (1 = infection marked on that slice) and the infected
area the pipeline measured. With ``--volumes`` (check-volumes' ``volumes.json``), also prints how far each flagged
slice that the radiologists labelled 0 (infected area >= ``--area`` mm^2) lies from the nearest labelled slice.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from covfast.io import load_volume
from training.ctmd import labels_at


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case")
    ap.add_argument("--prob", required=True, help="<case>_prob.npz from check-volumes")
    ap.add_argument("--slices", required=True, help="comma-separated slice indices (ascending SliceLocation order)")
    ap.add_argument("--data", default="../shared/data/covid-ct-md")
    ap.add_argument("--out", required=True)
    ap.add_argument("--columns", type=int, default=3)
    ap.add_argument("--volumes", help="volumes.json of the same check-volumes run")
    ap.add_argument("--area", type=float, default=100.0, help="flag threshold in mm^2 (with --volumes)")
    args = ap.parse_args()
    if args.volumes:
        found = json.loads(Path(args.volumes).read_text())[args.case]
        area, label = np.array(found["infected_area_mm2"]), np.array(found["labels"])
        positive = np.flatnonzero(label == 1)
        flagged_clean = np.flatnonzero((area >= args.area) & (label == 0))
        if len(positive) and len(flagged_clean):
            distance = np.abs(flagged_clean[:, None] - positive[None, :]).min(axis=1)
            print(f"{args.case}: {len(flagged_clean)} flagged label-0 slices; distance to the nearest labelled slice "
                  f"1-5: {(distance <= 5).sum()}, 6-9: {((distance > 5) & (distance < 10)).sum()}, "
                  f">= 10: {(distance >= 10).sum()}")
    volume = load_volume(Path(args.data) / args.case)
    labels = labels_at(json.loads((Path(args.data) / "labels.json").read_text())[args.case], volume.z_mm)
    with np.load(args.prob) as saved:
        prob = saved["prob"].astype(np.float32) / 255.0  # check-volumes stores p x 255 as uint8
    if prob.shape != volume.hu.shape:
        raise SystemExit(f"{args.prob}: shape {prob.shape} is not the volume's {volume.hu.shape}")
    pixel_mm2 = float(volume.spacing_mm[1] * volume.spacing_mm[2])
    tiles = []
    for z in (int(s) for s in args.slices.split(",")):
        grey = np.clip((volume.hu[z].astype(np.float32) + 1350) / 1500, 0, 1) * 255
        rgb = np.repeat(grey[..., None], 3, -1)
        infected = prob[z] >= 0.5
        rgb[infected] = 0.5 * rgb[infected] + 0.5 * np.array([255, 0, 0])
        tile = Image.fromarray(rgb.astype(np.uint8)).resize((256, 256), Image.BILINEAR)
        ImageDraw.Draw(tile).text((4, 4), f"z{z} label {labels[z]} {infected.sum() * pixel_mm2:.0f} mm2",
                                  fill=(255, 255, 0))
        tiles.append(np.asarray(tile))
    while len(tiles) % args.columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i : i + args.columns], 1) for i in range(0, len(tiles), args.columns)]
    Image.fromarray(np.concatenate(rows, 0)).quantize(64).save(args.out, optimize=True)
    print(args.out)


if __name__ == "__main__":
    main()
