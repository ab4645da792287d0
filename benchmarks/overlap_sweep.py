"""Sliding-window overlap and Gaussian sigma against time and label-map agreement, with the demo's weights.

Runs ``configs/inference.json`` (all seven tasks, the demo's network and post-processing) once per setting on
the shared real CT (``../shared/data/real-ct/example_ct_sm.nii.gz``) and on the demo's MOTS-synth test volumes,
then compares every setting's merged label map with the reference setting's (overlap 0.5, sigma 0.125, today's
defaults): Dice per label value present in either map, per case (on the real CT the minimum is taken over the
values with at least ``--min_voxels`` reference voxels; all are listed). Prints one row per setting with the network
seconds of the real CT (from the run's ``summary.json``) and the lowest agreement on either data::

    bash dev.sh demo --output_dir demo_output          # the weights and the test volumes
    python benchmarks/overlap_sweep.py --demo_dir demo_output

The demo's test volumes span one or two of the demo's windows (demo.json's ``patch_size`` at its ``pixdim``, which
inference also uses), so mostly the real CT tells the settings apart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "dodnet_bundle"))

from scripts.demo import demo_inference_overrides  # noqa: E402
from scripts.networks.acceleration import cpu_name  # noqa: E402
from scripts.utils import BUNDLE_ROOT  # noqa: E402

REAL_CT = REPO.parent / "shared" / "data" / "real-ct" / "example_ct_sm.nii.gz"


def run_setting(inputs: Path, output_dir: Path, overrides: Dict[str, object]) -> Dict[str, object]:
    """Run inference.json on the folder ``inputs`` into ``output_dir``; returns its ``summary.json``."""
    from monai.bundle import ConfigWorkflow

    configs = BUNDLE_ROOT / "configs"
    workflow = ConfigWorkflow(
        config_file=str(configs / "inference.json"),
        meta_file=str(configs / "metadata.json"),
        logging_file=False,
        workflow_type=None,
        **{**overrides, "input": str(inputs), "output_dir": str(output_dir), "progress": False},
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return json.loads((output_dir / "summary.json").read_text())


def agreement(a: np.ndarray, b: np.ndarray) -> Dict[int, Tuple[float, int]]:
    """Per label value present in either map: (Dice between the maps, voxels of the value in ``a``)."""
    from monai.metrics import compute_dice

    out: Dict[int, Tuple[float, int]] = {}
    for value in sorted((set(np.unique(a).tolist()) | set(np.unique(b).tolist())) - {0}):
        x, y = (torch.from_numpy(np.ascontiguousarray(m == value))[None, None].float() for m in (a, b))
        out[int(value)] = (float(compute_dice(y, x, ignore_empty=False)[0, 0]), int(x.sum()))
    return out


def network_seconds(summary: Dict[str, object], case: str) -> float:
    """The network phase of ``case`` in an inference ``summary.json``."""
    for item in summary["succeeded"]:
        if item["case"] == case:
            return float(item["phases"]["network"])
    raise RuntimeError(f"{case} is not among the segmented cases: {summary.get('failed')}")


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo_dir", default="demo_output", help="a finished demo's output folder")
    parser.add_argument("--overlaps", default="0.5,0.33,0.25")
    parser.add_argument("--sigmas", default="0.125,0.25")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--min_voxels",
        type=int,
        default=1000,
        help="real-CT structures smaller than this are listed, not in the minimum",
    )
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    demo = Path(args.demo_dir).resolve()
    ckpt = demo / "models" / "model.pt"
    if not ckpt.is_file():
        sys.exit(f"overlap_sweep: {ckpt} not found (run `bash dev.sh demo --output_dir {args.demo_dir}` first)")
    if not REAL_CT.is_file():
        sys.exit(f"overlap_sweep: {REAL_CT} not found (the shared real CT beside the repository)")
    datalist = next(demo.glob("data/*/datalist.json"))
    tests = [datalist.parent / item["image"] for item in json.loads(datalist.read_text())["test"]]
    settings: List[Tuple[float, float]] = [
        (float(o), float(s)) for o in args.overlaps.split(",") for s in args.sigmas.split(",")
    ]
    reference = settings[0]
    base = demo_inference_overrides(ckpt)
    if args.threads:
        base["threads"] = args.threads
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs"
        inputs.mkdir()
        for path in [REAL_CT] + tests:
            os.symlink(path, inputs / path.name)
        rows = []
        for overlap, sigma in settings:
            out = Path(tmp) / f"o{overlap}_s{sigma}"
            summary = run_setting(inputs, out, {**base, "overlap": overlap, "inferer#sigma_scale": sigma})
            real_case = REAL_CT.name[: -len(".nii.gz")]
            rows.append(
                {"overlap": overlap, "sigma": sigma, "out": out, "network_s": network_seconds(summary, real_case)}
            )
        ref_dir = rows[settings.index(reference)]["out"]
        for row in rows:
            real: Dict[int, Tuple[float, int]] = {}
            synth: List[float] = []
            for path in [REAL_CT] + tests:
                case = path.name[: -len(".nii.gz")]
                a = np.asarray(nib.load(str(ref_dir / f"{case}_seg.nii.gz")).dataobj)
                b = np.asarray(nib.load(str(row["out"] / f"{case}_seg.nii.gz")).dataobj)
                if path == REAL_CT:
                    real = agreement(a, b)
                else:
                    synth.extend(d for d, _ in agreement(a, b).values())
            large = [d for d, n in real.values() if n >= args.min_voxels]
            row.update(real_min=min(large, default=1.0), synth_min=min(synth, default=1.0))
            row["real_ct"] = {str(k): {"dice": round(d, 4), "reference_voxels": n} for k, (d, n) in real.items()}
            del row["out"]
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPU cores; reference: overlap {reference[0]}, sigma {reference[1]}")
    head = f"{'overlap':>8} {'sigma':>6} {'real CT network s':>18} {'real CT min agreement (>= min_voxels)':>38}"
    print(head + f" {'MOTS-synth min':>15}")
    for row in rows:
        print(
            f"{row['overlap']:>8.2f} {row['sigma']:>6.3f} {row['network_s']:>18.1f} "
            f"{row['real_min']:>38.4f} {row['synth_min']:>15.4f}"
        )
        print(
            "    real CT per label value (Dice, reference voxels): "
            + ", ".join(f"{k}: {v['dice']:.3f} ({v['reference_voxels']})" for k, v in row["real_ct"].items())
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
