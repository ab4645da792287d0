"""The training data path at MOTS scale: preprocessing, disk, per-sample CPU cost, loader rate, RSS per rank.

Generates N MOTS-sized synthetic CTs (``scripts.data.synth.generate_case`` with ``size="realistic"``: 512 x 512
at 0.6-1.0 mm, 40-``max_slices`` slices at 0.7-5 mm) in a temporary folder, preprocesses them with
``dodnet-preprocess`` and reports:

- preprocessing wall seconds per case and disk bytes per case and per resampled voxel (target <= 3);
- CPU ms per [192, 192, 64] training sample (``LoadPatchd`` + ``train#augmentations`` + label mapping, one
  thread, as one loader worker runs it; target <= 150 ms);
- loader samples/s with 1, 2 and 4 worker processes;
- peak RSS of one rank (the rank process plus its loader workers) of a 2-rank gloo training run with a tiny
  network at N and 4N training items (4N: hard links to the same N cases under new names; target: within 10%).

Run (CPU heavy; a 2-core machine takes minutes)::

    python benchmarks/bench_training_data.py --cases 4 --max_slices 200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "dodnet_bundle"
sys.path.insert(0, str(BUNDLE))

from scripts.tasks import TASKS  # noqa: E402


def generate(root: Path, cases: int, max_slices: int) -> Path:
    """N realistic cases (tasks in turn) as uncompressed NIfTI, all training; the first two also validation (one per
    rank of the 2-rank run)."""
    import nibabel as nib

    from scripts.data.synth import generate_case

    items = []
    for index in range(cases):
        spec = TASKS[index % len(TASKS)]
        case = generate_case(spec, np.random.default_rng(index), size="realistic", max_slices=max_slices)
        for kind, array in (("images", case.image), ("labels", case.label)):
            (root / kind).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, case.affine), str(root / kind / f"case{index:03d}.nii"))
        items.append(
            {"image": f"images/case{index:03d}.nii", "label": f"labels/case{index:03d}.nii", "task": spec.name}
        )
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({"training": items, "validation": items[:2] * (3 - len(items[:2]))}))
    return datalist


def sample_cost(pre: Path, patch: List[int], samples: int) -> float:
    """Mean CPU ms per training sample (one thread)."""
    import torch
    from monai.bundle import ConfigParser

    torch.set_num_threads(1)
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLE), "preprocessed_dir": str(pre), "patch_size": patch})
    dataset = parser.get_parsed_content("train#dataset")
    dataset[0]
    start = time.process_time()
    for i in range(samples):
        dataset[i % len(dataset)]
    return 1000.0 * (time.process_time() - start) / samples


def loader_rate(pre: Path, patch: List[int], workers: int, batches: int) -> float:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update(
        {
            "bundle_root": str(BUNDLE),
            "preprocessed_dir": str(pre),
            "patch_size": patch,
            "num_workers": workers,
            "iterations_per_epoch": batches + 2 * workers,
        }
    )
    loader = parser.get_parsed_content("train#dataloader")
    it = iter(loader)
    for _ in range(workers):  # workers started and warm
        next(it)
    start = time.perf_counter()
    n = 0
    for batch in it:
        n += batch["image"].shape[0]
    return n / (time.perf_counter() - start)


def _tree_rss(pid: int) -> int:
    """RSS bytes of ``pid`` and all its descendants (from /proc)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total


def ddp_peak_rss(pre: Path, patch: List[int], out: Path, iterations: int) -> float:
    """Peak RSS (MiB) of the largest rank (rank process + loader workers) of a 2-rank gloo run."""
    overrides = {
        "bundle_root": str(BUNDLE),
        "preprocessed_dir": str(pre),
        "ckpt_dir": str(out / "models"),
        "output_dir": str(out / "eval"),
        "epochs": 1,
        "val_interval": 1000,
        "patch_size": patch,
        "batch_size": 1,
        "num_workers": 2,
        "iterations_per_epoch": iterations,
        "network_def#base_channels": 4,
    }
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    config = json.dumps([str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "multi_gpu_train.json")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    cmd += ["-m", "monai.bundle", "run", "--config_file", config, "--dist_backend", "gloo"] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak: Dict[int, int] = {}

    def poll() -> None:
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                    ranks = [int(c) for c in f.read().split()]
            except OSError:
                ranks = []
            for rank in ranks:
                peak[rank] = max(peak.get(rank, 0), _tree_rss(rank))
            time.sleep(0.2)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    log = proc.communicate()[0]
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"training run failed:\n{log[-3000:]}")
    return max(peak.values()) / 2**20


def grow(pre: Path, factor: int, dest: Path) -> Path:
    """A preprocessed folder with ``factor`` x the training items: hard links to the same cases, new names."""
    datalist = json.loads((pre / "datalist.json").read_text())
    dest.mkdir(parents=True)
    os.link(pre / "manifest.json", dest / "manifest.json")
    out: Dict[str, List[dict]] = {"training": [], "validation": []}
    for split, copies in (("training", factor), ("validation", 1)):
        for k in range(copies):
            for item in datalist[split]:
                name = f"{Path(item['case']).name}-{k}"
                if not (dest / "cases" / name).exists():
                    (dest / "cases" / name).mkdir(parents=True)
                    for f in (pre / item["case"]).iterdir():
                        os.link(f, dest / "cases" / name / f.name)
                paths = {key: str(item[key]).replace(item["case"], f"cases/{name}") for key in ("image", "label")}
                paths.update(locations=f"cases/{name}/locations.npz", case=f"cases/{name}")
                out[split].append({**item, **paths})
    (dest / "datalist.json").write_text(json.dumps(out))
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--max_slices", type=int, default=900)
    parser.add_argument("--workers", type=int, default=2, help="preprocessing processes")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--ddp_patch", type=int, nargs=3, default=[96, 96, 32])
    parser.add_argument("--ddp_iterations", type=int, default=4)
    parser.add_argument("--rss_only", action="store_true", help="skip the sample cost and loader measurements")
    parser.add_argument("--sample_only", action="store_true", help="skip the loader and RSS measurements")
    args = parser.parse_args()
    from scripts.data.preprocess import preprocess_datalist

    patch = [192, 192, 64]
    with tempfile.TemporaryDirectory(prefix="dodnet_bench_") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        datalist = generate(root / "source", args.cases, args.max_slices)
        print(f"generated {args.cases} cases in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        _, failures = preprocess_datalist(datalist, root / "pre", workers=args.workers, progress=False)
        seconds = time.perf_counter() - start
        assert not failures, failures
        manifest = json.loads((root / "pre" / "manifest.json").read_text())
        records = [json.loads((root / "pre" / "cases" / n / "case.json").read_text()) for n in manifest["cases"]]
        voxels = sum(int(np.prod(r["resampled_shape"])) for r in records)
        kept = sum(int(np.prod(r["shape"])) for r in records)
        disk = manifest["total_bytes"]
        print(f"source shapes: {[r['resampled_shape'] for r in records]} (resampled)")
        print(
            f"preprocessing: {seconds / args.cases:.1f} s per case wall ({args.workers} workers), "
            f"{disk / args.cases / 2**20:.1f} MiB per case, {disk / voxels:.2f} bytes per resampled voxel "
            f"(body crop keeps {100 * kept / voxels:.0f}% of the voxels)"
        )
        for workers in () if args.rss_only or args.sample_only else (1, 2, 4):
            rate = loader_rate(root / "pre", patch, workers, args.batches)
            print(f"loader, {workers} worker(s): {rate:.2f} samples/s")
        if not args.rss_only:
            load = os.getloadavg()[0]
            cost = sample_cost(root / "pre", patch, args.samples)
            print(f"CPU per [192, 192, 64] training sample: {cost:.0f} ms ({args.samples} samples, load {load:.1f})")
        if args.sample_only:
            return
        small = ddp_peak_rss(root / "pre", args.ddp_patch, root / "run1", args.ddp_iterations)
        big = ddp_peak_rss(grow(root / "pre", 4, root / "pre4"), args.ddp_patch, root / "run4", args.ddp_iterations)
        print(
            f"peak RSS per rank (2-rank gloo, {args.ddp_patch} patches): {small:.0f} MiB at {args.cases} cases, "
            f"{big:.0f} MiB at {4 * args.cases} items ({100 * (big / small - 1):+.1f}%)"
        )


if __name__ == "__main__":
    main()
