"""Time and memory of the folder evaluator on whole-CT-sized label maps.

    python benchmarks/bench_evaluate.py                      # 512 x 512 x 300 at 0.7 x 0.7 x 1.0 mm, 1 case
    python benchmarks/bench_evaluate.py --shape 256,256,150  # a quicker look

Writes one merged prediction and one reference label map (all 11 structures as ellipsoids, the
prediction shifted by two voxels and grown by one) to a temporary folder, evaluates them with
``scripts.evaluation.folders.evaluate_folders`` in a child process and prints seconds and the child's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "dodnet_bundle"


def ellipsoid_maps(shape, spacing):
    """(prediction, reference) uint8 merged label maps holding the 11 structures."""
    sys.path.insert(0, str(BUNDLE_ROOT))
    from scripts.tasks import merge_precedence

    ref = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    rng = np.random.default_rng(0)
    axes = [np.arange(n, dtype=np.float32) * s for n, s in zip(shape, spacing)]
    extent = [n * s for n, s in zip(shape, spacing)]
    for mid in merge_precedence():  # paint in the inference's precedence order
        tumor = mid in (2, 4, 6, 8, 9, 10)
        radii = rng.uniform(8, 20, 3) if tumor else rng.uniform(25, 60, 3)
        centre = [rng.uniform(0.3, 0.7) * e for e in extent]
        for out, shift, grow in ((ref, 0.0, 0.0), (pred, 2.0 * spacing[2], spacing[0])):
            d = sum(
                ((a - c - (shift if i == 2 else 0.0)) / (r + grow)) ** 2
                for i, (a, c, r) in enumerate(zip(np.meshgrid(*axes, indexing="ij", sparse=True), centre, radii))
            )
            out[d <= 1.0] = mid
    return pred, ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="512,512,300")
    parser.add_argument("--spacing", default="0.7,0.7,1.0")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(BUNDLE_ROOT))
        from scripts.evaluation.folders import evaluate_folders

        start = time.perf_counter()
        summary = evaluate_folders(*args.child)
        seconds = time.perf_counter() - start
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"seconds": seconds, "peak_rss_mb": rss_mb, "dice": summary["table6_average"]["dice"]}))
        return

    shape = tuple(int(v) for v in args.shape.split(","))
    spacing = tuple(float(v) for v in args.spacing.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pred, ref = ellipsoid_maps(shape, spacing)
        affine = np.diag([*spacing, 1.0])
        for folder, name, arr in ((tmp / "p", "case_seg.nii.gz", pred), (tmp / "r", "case.nii.gz", ref)):
            folder.mkdir()
            nib.save(nib.Nifti1Image(arr, affine), str(folder / name))
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(tmp / "p"), str(tmp / "r"), str(tmp / "o")],
            capture_output=True,
            text=True,
            check=True,
            env=dict(os.environ),
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
    sys.path.insert(0, str(BUNDLE_ROOT))
    from scripts.networks.acceleration import cpu_name

    print(f"machine: {cpu_name()}, {os.cpu_count()} CPU cores, no GPU used")
    print(f"evaluate_folders, 1 case {shape} at {spacing} mm, 11 structures (Dice, HD95, NSD):")
    print(f"  {result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB (mean Dice {result['dice']:.3f})")


if __name__ == "__main__":
    main()
