"""Patch forward cost of DoDNet: one task, all seven tasks in one pass, and seven backbone passes.

Prints one table with the machine and device named, ratios to the 1-task time, and the achieved
GFLOP/s of the forward against a same-run fp32 matmul rate.

    python benchmarks/bench_network.py                     # CPU, [192, 192, 64]
    python benchmarks/bench_network.py --device cuda
    python benchmarks/bench_network.py --patch 96,96,32 --repeats 3

Target (issue 2): all-7-tasks / 1-task <= 1.03.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, List

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dodnet_bundle"))

from scripts.networks import DoDNet  # noqa: E402
from scripts.networks.acceleration import cpu_name  # noqa: E402


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = cpu_name()
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_gflops(device: torch.device, size: int, repeats: int) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    seconds = best_time(lambda: a @ b, device, repeats, warmup=2)
    return 2 * size**3 / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patch", default="192,192,64", help="H,W,D of the patch")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--base-channels", type=int, default=32)
    parser.add_argument("--matmul-size", type=int, default=4096)
    args = parser.parse_args()

    device = torch.device(args.device)
    patch = [int(v) for v in args.patch.split(",")]
    torch.manual_seed(0)
    net = DoDNet(base_channels=args.base_channels).to(device).eval()
    x = torch.randn(args.batch, 1, *patch, device=device)
    one = torch.tensor([0], device=device)
    singles = [torch.tensor([k], device=device) for k in range(net.num_tasks)]

    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            net(x)
        flops = counter.get_total_flops()
        t_one = best_time(lambda: net(x, one), device, args.repeats, args.warmup)
        t_all = best_time(lambda: net(x), device, args.repeats, args.warmup)
        t_multi = best_time(lambda: [net(x, k) for k in singles], device, max(1, args.repeats // 2), 0)
    rate = matmul_gflops(device, args.matmul_size, repeats=5)
    achieved = flops / t_all / 1e9

    print(f"DoDNet patch forward, patch {patch}, batch {args.batch}, base width {args.base_channels}")
    print(f"machine: {describe_machine(device)}")
    print(f"{'case':<34}{'seconds':>10}{'ratio to 1 task':>18}")
    print(f"{'1 task':<34}{t_one:>10.3f}{1.0:>18.3f}")
    print(f"{'all 7 tasks, one pass (DoDNet)':<34}{t_all:>10.3f}{t_all / t_one:>18.3f}")
    print(f"{'7 backbone passes (Multi-Nets)':<34}{t_multi:>10.3f}{t_multi / t_one:>18.3f}")
    print(f"forward FLOPs (all tasks): {flops / 1e9:.1f} GFLOP -> {achieved:.1f} GFLOP/s")
    print(f"same-run fp32 matmul ({args.matmul_size}^2): {rate:.1f} GFLOP/s -> forward at {achieved / rate:.0%}")
    verdict = "met" if t_all / t_one <= 1.03 else "NOT met"
    print(f"target all-7 / 1-task <= 1.03: {t_all / t_one:.3f} ({verdict})")


if __name__ == "__main__":
    main()
