"""Where the DoDNet forward's time goes: each precision x memory layout (x ``torch.compile``) variant of the
all-7-task forward on one patch, timed, and the operators that take most of the time in the eager ones.

    python benchmarks/profile_forward.py --device cuda
    python benchmarks/profile_forward.py --patch 96,96,32 --variants fp32,bf16-cl --top 8

Variant names: ``fp32`` / ``bf16`` / ``fp16`` (autocast), ``-cl`` for channels-last 3-D weights and input,
``-compiled`` for ``torch.compile`` of the whole network (compile time printed separately). Random weights.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List

import torch
from torch.profiler import ProfilerActivity, profile

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "dodnet_bundle"))
sys.path.insert(0, str(BENCH_DIR))

from run import best_of, machine_name  # noqa: E402

from scripts.networks import DoDNet  # noqa: E402
from scripts.networks.acceleration import autocast, input_to_channels_last, to_channels_last  # noqa: E402


def variant_forward(name: str, device: torch.device, x: torch.Tensor):
    """(forward callable, seconds spent compiling) of variant ``name`` of a fresh DoDNet."""
    precision = name.split("-")[0]
    torch.manual_seed(0)
    net = DoDNet().to(device).eval()
    if "-cl" in name:
        to_channels_last(net)
        x = input_to_channels_last(x)
    model = torch.compile(net, dynamic=False) if name.endswith("-compiled") else net

    def forward() -> torch.Tensor:
        with autocast(device, precision):
            return model(x)

    start = time.perf_counter()
    with torch.inference_mode():
        forward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    compile_s = time.perf_counter() - start if name.endswith("-compiled") else 0.0
    return forward, compile_s


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patch", default="192,192,64")
    parser.add_argument("--variants", default=None, help="comma-separated (default: all eager ones and bf16-compiled)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=12, help="operators listed per profiled variant (0: none)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    half = ["bf16", "fp16"] if device.type == "cuda" else ["bf16"]
    eager = [f"{p}{layout}" for p in ["fp32", *half] for layout in ("", "-cl")]
    variants = args.variants.split(",") if args.variants else eager + ["bf16-compiled"]
    x = torch.randn(1, 1, *[int(v) for v in args.patch.split(",")], device=device)
    print(f"machine: {machine_name(device)}; device: {device}; patch {args.patch}; all 7 tasks", flush=True)
    rows = []
    for name in variants:
        forward, compile_s = variant_forward(name, device, x)
        with torch.inference_mode():
            seconds = best_of(forward, device, args.repeats)
            rows.append((name, seconds, compile_s))
            print(f"{name}: {seconds:.4f} s" + (f" (compiling {compile_s:.0f} s)" if compile_s else ""), flush=True)
            if args.top and not name.endswith("-compiled"):
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
                with profile(activities=activities) as prof:
                    forward()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
                print(prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=60), flush=True)
    print("\n| variant | seconds | compiling (s) |\n|---|---|---|")
    for name, seconds, compile_s in rows:
        print(f"| {name} | {seconds:.4f} | {compile_s:.0f} |")


if __name__ == "__main__":
    main()
