"""Which infection components of a report rest on the diaphragm's domes (one-off analysis of the dome-cap rule).

    python training/analysis/dome_caps.py ../shared/data/covid-ct-md/P001 runs/s19/reports/P001 [--top 5]

Reads the volume and the report's ``lung_mask.nii.gz`` / ``infection_mask.nii.gz`` (a report written without the
rule, e.g. before session 20 or with ``SeverityRules(dome_cap_support=None)``). Prints the infected volume, the
volume of the lung mask's per-slice holes, and for the components with the most lower-surface voxels over a hole
in the slice below: their volume, slices and that share, the quantity ``covfast.pipeline.infection.drop_dome_caps``
thresholds (``dome_cap_support``, 0.6). Then what the pipeline's own function removes at 0.6.
"""

import argparse

import cc3d
import nibabel as nib
import numpy as np

from covfast.io import load_volume
from covfast.io.volume import canonical_view
from covfast.pipeline.infection import drop_dome_caps
from covfast.pipeline.lung import fill_holes_per_slice


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("volume")
    ap.add_argument("report_dir")
    ap.add_argument("--top", type=int, default=5)
    args = ap.parse_args()
    volume = load_volume(args.volume)

    def mask(name):
        return np.ascontiguousarray(canonical_view(np.asarray(nib.load(f"{args.report_dir}/{name}").dataobj),
                                                   volume.affine)).astype(np.uint8)

    lung, infection = mask("lung_mask.nii.gz"), mask("infection_mask.nii.gz")
    ml = float(np.prod(volume.spacing_mm)) / 1000.0
    holes = fill_holes_per_slice(lung > 0) & (lung == 0)
    labels = cc3d.connected_components(infection > 0, connectivity=26)
    count = int(labels.max())
    upper = labels[1:]
    lower = (upper != 0) & (labels[:-1] != upper)
    surface = np.bincount(upper[lower], minlength=count + 1)
    on_holes = np.bincount(upper[lower & holes[:-1]], minlength=count + 1)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    print(f"{args.volume}: infected {np.count_nonzero(infection) * ml:.2f} mL, lung-mask holes {holes.sum() * ml:.1f} mL")
    for i in np.argsort(-on_holes)[: args.top]:
        if on_holes[i] == 0:
            break
        zs = np.flatnonzero((labels == i).any(axis=(1, 2)))
        print(f"  component {i}: {sizes[i] * ml:.2f} mL, slices {zs[0]}-{zs[-1]}, lower surface {surface[i]} voxels, "
              f"{on_holes[i] / surface[i]:.2f} of it over holes")
    prob = np.where(infection > 0, 1.0, 0.0).astype(np.float32)
    before = np.count_nonzero(infection)
    removed = drop_dome_caps(infection, prob, lung, 0.6)
    print(f"  drop_dome_caps at 0.6: {removed} components, {(before - np.count_nonzero(infection)) * ml:.2f} mL")


if __name__ == "__main__":
    main()
