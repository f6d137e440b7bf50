"""Compact copy of COVID-SemiSeg for a remote training machine.

The labelled slices are copied byte for byte; the 1,600 unlabelled slices are re-encoded (JPEG quality 85,
long side at most ``max_side``) with their pseudo labels resized to match, which keeps the copy near 30 MB.
The layout is that of ``../shared/data/infnet-semiseg`` so the training code reads either.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image

from training.data import LABELLED, MULTICLASS, UNLABELLED


def make_carry(source: str | Path, dest: str | Path, max_side: int = 320) -> int:
    """Write the compact copy of ``source`` into ``dest``; returns the number of bytes written."""
    source, dest = Path(source), Path(dest)
    for sub in (LABELLED / "Imgs", LABELLED / "GT", MULTICLASS / "Imgs", MULTICLASS / "GT"):
        shutil.copytree(source / sub, dest / sub, dirs_exist_ok=True)
    (dest / UNLABELLED / "Imgs").mkdir(parents=True, exist_ok=True)
    (dest / UNLABELLED / "GT").mkdir(parents=True, exist_ok=True)
    for image_path in sorted((source / UNLABELLED / "Imgs").glob("*.jpg")):
        with Image.open(image_path) as im:
            scale = min(1.0, max_side / max(im.size))
            size = (round(im.width * scale), round(im.height * scale))
            im.convert("L").resize(size, Image.BILINEAR).save(dest / UNLABELLED / "Imgs" / image_path.name, quality=85)
        with Image.open(source / UNLABELLED / "GT" / f"{image_path.stem}.png") as gt:
            gt.convert("L").resize(size, Image.BILINEAR).save(dest / UNLABELLED / "GT" / f"{image_path.stem}.png")
    return sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
