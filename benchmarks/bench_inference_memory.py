"""Peak host memory of whole-volume inference: all 7 tasks of an abdominal-size CT with the full network on CPU.

The target (issue 4): stitching every task of a 512 x 512 x 300 CT at 0.7 x 0.7 x 1.0 mm fits in 6 GB
of host memory with the full-size network on CPU. This benchmark writes such a volume (a synthetic
body phantom in HU), runs the bundle's ``configs/inference.json`` on it in a child process (the
published network size, random weights: memory does not depend on the weight values) and reports the
child's peak resident set size (``ru_maxrss``) and the peak RSS of each phase, sampled every 0.2 s.

    python benchmarks/bench_inference_memory.py                  # half-precision stitching (default)
    python benchmarks/bench_inference_memory.py --stitch_dtype float32
    python benchmarks/bench_inference_memory.py --overlap 0      # 36 instead of 96 windows, same buffers
    python benchmarks/bench_inference_memory.py --network tiny   # same pipeline and buffers, width-8 network
    python benchmarks/bench_inference_memory.py --mode window    # the full network on one window only

The full run takes about an hour on a 2-core CPU (each 192 x 192 x 64 window of the full network costs
about 30 s there). The overlap changes the number of windows, not the size of any buffer: the stitched
output and the count map are allocated once for the whole volume and windows are processed one at a
time. Where the full run is too slow, ``--network tiny`` measures everything but the network's own
activations (a width-8 network with the same 14 output channels) and ``--mode window`` measures those
activations (one full-size window); their sum minus one interpreter baseline bounds the full run's
peak, because the window's activations are freed before post-processing starts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "dodnet_bundle"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_phantom(path: Path, shape=(512, 512, 300), spacing=(0.7, 0.7, 1.0)) -> None:
    """An abdominal-size HU volume: air, an elliptic body of fat and soft tissue, a 'liver' and a 'spleen'."""
    import nibabel as nib
    import numpy as np

    h, w, d = shape
    x, y = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 <= 1
    liver = ((x + 0.35) / 0.35) ** 2 + ((y + 0.1) / 0.3) ** 2 <= 1
    spleen = ((x - 0.5) / 0.15) ** 2 + ((y + 0.2) / 0.12) ** 2 <= 1
    slice_ = np.full((h, w), -1000, np.int16)
    slice_[body] = 40
    slice_[liver] = 110
    slice_[spleen] = 95
    volume = np.repeat(slice_[:, :, None], d, axis=2)
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), str(path))


def child(args: argparse.Namespace) -> None:
    """Run inference.json on the phantom and print phase peaks as JSON (the parent reads ru_maxrss)."""
    sys.path.insert(0, str(BUNDLE))
    import torch

    from scripts.inference.cli import segment
    from scripts.networks import DoDNet

    torch.set_num_threads(args.threads or torch.get_num_threads())
    tiny = {"base_channels": 8, "norm_groups": 8, "blocks": (1, 1, 1, 1, 1)} if args.network == "tiny" else {}
    if args.mode == "window":  # the full network's activations on one window
        net = DoDNet().eval()
        baseline = rss_mb()
        start = time.time()
        with torch.no_grad():
            net(torch.zeros(1, 1, 192, 192, 64))
        print("RESULT " + json.dumps({"baseline_mb": baseline, "seconds": round(time.time() - start, 1)}))
        return
    ckpt = Path(args.workdir) / "random_weights.pt"
    torch.save({"model": DoDNet(**tiny).state_dict()}, ckpt)  # weights irrelevant to memory
    overrides = {f"network_def#{k}": list(v) if isinstance(v, tuple) else v for k, v in tiny.items()}
    if args.contiguous:
        overrides["channels_last"] = False
    if args.gpu_pipeline != "auto":
        overrides["gpu_pipeline"] = args.gpu_pipeline == "on"
    peaks = {"baseline_mb": rss_mb()}
    phase = {"name": "run", "peak": 0.0, "inference": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            phase["peak"] = max(phase["peak"], rss_mb())
            if phase["name"] == "inference":
                phase["inference"] = max(phase["inference"], rss_mb())
            time.sleep(0.2)

    if args.reader != "ITKReader":  # machines without ITK (e.g. a GPU image lacking it): read the NIfTI otherwise
        from monai.transforms import LoadImaged

        import scripts.data.transforms

        def load_with_reader(*a, **k):
            return LoadImaged(*a, **{**k, "reader": args.reader})

        scripts.data.transforms.LoadImaged = load_with_reader

    from scripts.inference.inferer import TaskSlidingWindowInferer

    original_call = TaskSlidingWindowInferer.__call__

    def timed_call(self, *a, **k):  # marks the sliding-window phase (stitching + network)
        phase["name"] = "inference"
        try:
            return original_call(self, *a, **k)
        finally:
            phase["name"] = "post"

    TaskSlidingWindowInferer.__call__ = timed_call

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.time()
    summary = segment(
        args.image,
        str(Path(args.workdir) / "out"),
        device=args.device,
        ckpt=str(ckpt),
        progress=False,
        overlap=args.overlap,
        stitch_dtype=args.stitch_dtype,
        precision=args.precision,
        compile_head=args.compile_head,
        compile_network=args.compile_network,
        sw_batch_size=args.sw_batch_size,
        body_crop=not args.no_body_crop,
        **overrides,
    )
    stop.set()
    thread.join()
    seconds = time.time() - start
    report = json.loads((Path(args.workdir) / "out" / f"{Path(args.image).name.split('.')[0]}_report.json").read_text())
    peaks["phases_s"] = {k: round(v, 1) for k, v in report["seconds"].items()}
    peaks["body_crop_fraction"] = round(report["body_crop"]["fraction"], 3)
    peaks["pipeline"] = report.get("pipeline", {})  # device, GPU-resident or not, the case's peak GPU memory
    from scripts.networks.acceleration import autocast, input_to_channels_last, resolve_precision, to_channels_last

    net = DoDNet(**tiny).to(args.device).eval()  # one window on the same path, for the whole-CT/window ratio
    window = torch.zeros(1, 1, 192, 192, 64, device=args.device)
    if not args.contiguous:
        net, window = to_channels_last(net), input_to_channels_last(window)
    precision = resolve_precision(args.precision, args.device)
    with torch.inference_mode(), autocast(args.device, precision):
        net(window)  # warm-up
        t0 = time.time()
        net(window)
        if torch.device(args.device).type == "cuda":
            torch.cuda.synchronize()
        window_s = time.time() - t0
    peaks["window_forward_s"] = round(window_s, 3)
    peaks["ratio_to_window"] = round(seconds / window_s, 1)
    peaks["resolved_precision"] = precision
    peaks.update(
        {
            "sampled_peak_mb": phase["peak"],
            "sampled_inference_phase_peak_mb": phase["inference"],
            "seconds": round(seconds, 1),
            "failed": summary["failed"],
            "threads": torch.get_num_threads(),
        }
    )
    if torch.device(args.device).type == "cuda":
        peaks["peak_gpu_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        peaks["peak_gpu_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    print("RESULT " + json.dumps(peaks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stitch_dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--network", default="full", choices=["full", "tiny"])
    parser.add_argument("--mode", default="pipeline", choices=["pipeline", "window"])
    parser.add_argument("--budget_mb", type=float, default=6 * 1024)
    parser.add_argument(
        "--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="network precision"
    )
    parser.add_argument("--no_body_crop", action="store_true", help="windows over the whole grid (no body crop)")
    parser.add_argument("--compile_head", action="store_true", help="torch.compile-fused dynamic heads")
    parser.add_argument("--compile_network", action="store_true", help="torch.compile the whole network")
    parser.add_argument("--contiguous", action="store_true", help="network in contiguous layout (not channels-last)")
    parser.add_argument("--sw_batch_size", type=int, default=1, help="windows per network call")
    parser.add_argument(
        "--reader",
        default="ITKReader",
        help="image reader (the config's ITKReader; NibabelReader where ITK is missing)",
    )
    parser.add_argument(
        "--gpu_pipeline",
        default="auto",
        choices=["auto", "on", "off"],
        help="GPU-resident pipeline (auto: on with a CUDA device; off: CPU preprocessing and post-processing)",
    )
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--device", default="cpu", help="device of the network (stitching: the config's default)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "abdomen_512x512x300.nii"
        if args.mode == "pipeline":
            write_phantom(image)
        cmd = [sys.executable, __file__, "--child", "--image", str(image), "--workdir", tmp, "--mode", args.mode]
        cmd += ["--stitch_dtype", args.stitch_dtype, "--overlap", str(args.overlap), "--threads", str(args.threads)]
        cmd += ["--network", args.network, "--precision", args.precision, "--device", args.device]
        cmd += [
            "--sw_batch_size",
            str(args.sw_batch_size),
            "--reader",
            args.reader,
            "--gpu_pipeline",
            args.gpu_pipeline,
        ]
        cmd += ["--compile_head"] if args.compile_head else []
        cmd += ["--compile_network"] if args.compile_network else []
        cmd += ["--contiguous"] if args.contiguous else []
        cmd += ["--no_body_crop"] if args.no_body_crop else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"benchmark child failed with exit code {proc.returncode}")
        result = json.loads(lines[-1][len("RESULT ") :])
    result.update(
        {
            "mode": args.mode,
            "network": "full (published size)" if args.mode == "window" else args.network,
            "image": (
                "512x512x300 int16 at 0.7x0.7x1.0 mm -> 448x448x200 at 0.8x0.8x1.5 mm"
                if args.mode == "pipeline"
                else "one 192x192x64 window"
            ),
            "tasks": 7,
            "stitch_dtype": args.stitch_dtype,
            "precision": args.precision,
            "compile_head": args.compile_head,
            "compile_network": args.compile_network,
            "channels_last": not args.contiguous,
            "sw_batch_size": args.sw_batch_size,
            "reader": args.reader,
            "overlap": args.overlap,
            "body_crop": not args.no_body_crop,
            "peak_rss_mb": round(peak_mb, 1),
            "budget_mb": args.budget_mb,
            "within_budget": peak_mb <= args.budget_mb,
            "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs".strip(),
        }
    )
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
