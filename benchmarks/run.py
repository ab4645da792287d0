"""One benchmark command for DoDNet's speed and memory, side by side with what users would run instead.

    python benchmarks/run.py                         # CPU, [192, 192, 64] patch (several minutes on 2 cores)
    python benchmarks/run.py --device cuda           # GPU (see benchmarks/gpu.sh)
    python benchmarks/run.py --patch 96,96,32 --skip volume,train   # a quick look

Sections (``--skip`` takes a comma-separated list of their names):
- ``patch``: forward on one patch: DoDNet with 1 task, all 7 tasks in one pass (eager dynamic head,
  and the ``torch.compile``-fused head of ``compile_head`` unless ``--no-compile-head``), 7 backbone
  passes ("Multi-Nets"), a shared encoder with 7 decoders ("Multi-Head"), and MONAI's DynUNet (nnU-Net
  3d_fullres), the wholeBody bundle's SegResNet and SwinUNETR (feature size 48); ratios to 1 task.
- ``efficiency``: achieved GFLOP/s of the DoDNet forward (``torch.utils.flop_counter``) for the plain
  eager path and the fast paths, against a same-run large fp32 matmul; bf16 speed-up.
- ``volume``: whole-volume end-to-end inference on a synthetic 512 x 512 x 300 CT at 0.7 x 0.7 x 1.0 mm
  through the bundle's inference config (in a child process): seconds and peak RSS (and GPU memory).
- ``sliding``: the sliding-window stage alone over a preprocessed 448 x 448 x 200 volume (the phantom's size
  after resampling; 96 windows at overlap 0.5), all 7 tasks, for each ``--sliding-batches`` sw_batch_size,
  stitched on the GPU (and on the CPU at the first batch size): seconds and peak GPU memory. GPU only by
  default (on the CPU the ``volume`` section covers it and each run takes minutes).
- ``train``: training iterations per second at batch 2 (full patch on GPU, ``--train-patch`` on CPU).

Random weights throughout: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

BENCH_DIR = Path(__file__).resolve().parent
BUNDLE_ROOT = BENCH_DIR.parent / "dodnet_bundle"
sys.path.insert(0, str(BUNDLE_ROOT))
sys.path.insert(0, str(BENCH_DIR))

from competitors import MultiHeadDoDNet, dynunet_3d_fullres, segresnet_wholebody, swinunetr_universal  # noqa: E402

from scripts.networks import DoDNet  # noqa: E402
from scripts.networks.acceleration import (  # noqa: E402
    autocast,
    compile_dynamic_heads,
    compile_network,
    cpu_name,
    input_to_channels_last,
    to_channels_last,
)
from scripts.networks.fused_head import fused_head_status  # noqa: E402


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = cpu_name()
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def paired_times(
    first: Callable[[], object], second: Callable[[], object], device: torch.device, rounds: int
) -> Tuple[float, float, float]:
    """Best time of ``first`` and of ``second``, run back to back for ``rounds`` rounds (one warm-up each),
    and the median over rounds of ``second / first``: drifts of the machine's speed (frequency, other
    processes) hit both runs of a round alike, so the paired median is the robust ratio."""
    first(), second()
    times: List[Tuple[float, float]] = []
    for _ in range(rounds):
        pair = []
        for fn in (first, second):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            pair.append(time.perf_counter() - start)
        times.append((pair[0], pair[1]))
    ratio = statistics.median(b / a for a, b in times)
    return min(a for a, _ in times), min(b for _, b in times), ratio


def matmul_rate(device: torch.device, size: int = 4096) -> float:
    """Same-run fp32 matmul GFLOP/s: the yardstick for the forward's efficiency."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    return 2 * size**3 / best_of(lambda: a @ b, device, repeats=5, warmup=2) / 1e9


class Table:
    def __init__(self, title: str, columns: List[str]) -> None:
        self.title, self.columns, self.rows = title, columns, []

    def add(self, *cells: object) -> None:
        self.rows.append([c if isinstance(c, str) else f"{c:.3f}" for c in cells])
        print("  " + " | ".join(self.rows[-1]), flush=True)

    def render(self) -> str:
        widths = [max(len(r[i]) for r in [self.columns] + self.rows) for i in range(len(self.columns))]
        line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
        out = [f"\n{self.title}", line(self.columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        return "\n".join(out + [line(r) for r in self.rows])


def fast(
    net: torch.nn.Module, device: torch.device, precision: str, channels_last: bool = True
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network on its fast path: inference mode, autocast and (``channels_last``) channels-last weights and
    input, as the inference config runs it."""
    if channels_last:
        to_channels_last(net)
    layout = input_to_channels_last if channels_last else (lambda x: x)

    def run(x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return net(layout(x), *args)

    return run


def layout_name(args) -> str:
    return "channels-last" if args.channels_last else "contiguous"


def patch_section(args, device: torch.device, patch: List[int]) -> List[Table]:
    x = torch.randn(1, 1, *patch, device=device)
    precision = args.precision
    table = Table(
        f"Patch forward {patch}, batch 1, random weights, {precision} {layout_name(args)}, inference mode",
        ["network", "seconds", "ratio to DoDNet 1 task"],
    )
    note = (
        "(all-7 rows: median ratio to the 1-task row above over rounds of back-to-back forwards; "
        "seconds: best of the rounds)"
    )
    table.title += "\n" + note
    print(table.title, flush=True)
    torch.manual_seed(0)
    dodnet = DoDNet().to(device).eval()
    run = fast(dodnet, device, precision, args.channels_last)
    one, singles = torch.tensor([0], device=device), [torch.tensor([k], device=device) for k in range(7)]
    with torch.inference_mode():
        t_one, t_all, ratio_eager = paired_times(lambda: run(x, one), lambda: run(x), device, 3 * args.repeats)
        table.add("DoDNet, 1 task", t_one, 1.0)
        table.add("DoDNet, all 7 tasks in one pass", t_all, ratio_eager)
        t_all_c = ratio_compiled = None
        if args.compile_head:
            compile_dynamic_heads(dodnet)
            start = time.perf_counter()
            run(x, one), run(x)  # compiles the fused head for K = 1 (used once per task for K = 7)
            compile_s = time.perf_counter() - start
            status = fused_head_status()
            if status == "compiled":
                t_one_c, t_all_c, ratio_compiled = paired_times(
                    lambda: run(x, one), lambda: run(x), device, 3 * args.repeats
                )
                table.add(f"DoDNet, 1 task, compiled head (compiling {compile_s:.0f} s)", t_one_c, 1.0)
                table.add("DoDNet, all 7 tasks, compiled head", t_all_c, ratio_compiled)
            else:
                print(f"compiled head skipped: {status}", flush=True)
            compile_dynamic_heads(dodnet, enabled=False)
        t_all_n = ratio_network = None
        if args.compile_network:
            compiled = compile_network(dodnet)
            compiled_run = fast(compiled, device, precision, args.channels_last)
            start = time.perf_counter()
            compiled_run(x, one), compiled_run(x)
            sync(device)
            compile_s = time.perf_counter() - start
            t_one_n, t_all_n, ratio_network = paired_times(
                lambda: compiled_run(x, one), lambda: compiled_run(x), device, 3 * args.repeats
            )
            table.add(f"DoDNet, 1 task, compiled network (compiling {compile_s:.0f} s)", t_one_n, 1.0)
            table.add("DoDNet, all 7 tasks, compiled network", t_all_n, ratio_network)
        t_multi = best_of(lambda: [run(x, k) for k in singles], device, max(1, args.repeats // 2), 0)
        table.add("Multi-Nets (7 backbone passes)", t_multi, t_multi / t_one)
        results = {"one": t_one, "all": t_all, "multi_nets": t_multi}
        competitors = {
            "Multi-Head (shared encoder, 7 decoders)": MultiHeadDoDNet,
            "DynUNet nnU-Net 3d_fullres (14 ch)": dynunet_3d_fullres,
            "SegResNet (wholeBody bundle)": segresnet_wholebody,
            "SwinUNETR feature 48 (universal model)": swinunetr_universal,
        }
        for name, make in competitors.items():
            runner = fast(make().to(device).eval(), device, precision, args.channels_last)
            seconds = best_of(lambda: runner(x), device, args.repeats)
            table.add(name, seconds, seconds / t_one)
            results[name] = seconds
    fastest_other = min(v for k, v in results.items() if k not in ("one", "all", "multi_nets"))
    summary = Table("Targets (patch)", ["target", "measured", "met"])
    summary.rows.append(["all 7 / 1 task <= 1.03, eager head", f"{ratio_eager:.3f}", str(ratio_eager <= 1.03)])
    if ratio_compiled is not None:
        summary.rows.append(
            ["all 7 / 1 task <= 1.03, compiled head", f"{ratio_compiled:.3f}", str(ratio_compiled <= 1.03)]
        )
    if ratio_network is not None:
        summary.rows.append(
            ["all 7 / 1 task <= 1.03, compiled network", f"{ratio_network:.3f}", str(ratio_network <= 1.03)]
        )
    t_best = min(t for t in (t_all, t_all_c, t_all_n) if t is not None)
    summary.rows.append(["Multi-Nets / all 7 >= 6.5", f"{t_multi / t_all:.2f}", str(t_multi / t_all >= 6.5)])
    summary.rows.append(
        [
            "all-7 DoDNet fastest of the alternatives",
            f"{t_best:.3f} vs {fastest_other:.3f}",
            str(t_best < fastest_other),
        ]
    )
    return [table, summary]


def efficiency_section(args, device: torch.device, patch: List[int]) -> List[Table]:
    x = torch.randn(1, 1, *patch, device=device)
    torch.manual_seed(0)
    net = DoDNet().to(device).eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(x)
    gflop = counter.get_total_flops() / 1e9
    rate = matmul_rate(device)
    table = Table(
        f"Forward efficiency, all 7 tasks, patch {patch}: {gflop:.0f} GFLOP; same-run fp32 matmul {rate:.0f} GFLOP/s",
        ["path", "seconds", "GFLOP/s", "of fp32 matmul rate", "speed-up vs fp32 eager"],
    )
    print(table.title, flush=True)
    with torch.inference_mode():
        eager = best_of(lambda: net(x), device, args.repeats)
        table.add("fp32 eager (contiguous)", eager, gflop / eager, f"{gflop / eager / rate:.0%}", 1.0)
        paths = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
        for precision in paths:
            run = fast(net, device, precision, args.channels_last)
            seconds = best_of(lambda: run(x), device, args.repeats)
            table.add(
                f"{precision} {layout_name(args)}",
                seconds,
                gflop / seconds,
                f"{gflop / seconds / rate:.0%}",
                eager / seconds,
            )
            net = net.to(memory_format=torch.contiguous_format)
    return [table]


def volume_section(args, device: torch.device) -> List[Table]:
    """Runs benchmarks/bench_inference_memory.py in a child process so its peak RSS is its own."""
    script = BENCH_DIR / "bench_inference_memory.py"
    table = Table("Whole-volume inference, synthetic 512 x 512 x 300 CT at 0.7 x 0.7 x 1.0 mm, all 7 tasks", [])
    if not script.is_file():
        print(f"volume: {script.name} not found, section skipped")
        return []
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "volume.json"
        cmd = [sys.executable, str(script), "--json", str(report), "--precision", args.volume_precision]
        cmd += ["--overlap", str(args.volume_overlap), "--device", str(device)]
        cmd += ["--sw_batch_size", str(args.volume_sw_batch_size), "--reader", args.volume_reader]
        cmd += ["--compile_head"] if args.volume_compile_head else []
        cmd += ["--compile_network"] if args.volume_compile_network else []
        cmd += [] if args.channels_last else ["--contiguous"]
        subprocess.run(cmd, check=True)
        result: Dict[str, object] = json.loads(report.read_text())
    table.columns = list(result)
    table.rows.append([str(v) for v in result.values()])
    return [table]


def sliding_section(args, device: torch.device, patch: List[int]) -> List[Table]:
    from scripts.inference.inferer import TaskSlidingWindowInferer

    shape = tuple(int(v) for v in args.sliding_shape.split(","))
    torch.manual_seed(0)
    image = torch.rand(1, 1, *shape) * 2 - 1  # on the CPU, as the inference config hands it to the inferer
    net = DoDNet().to(device).eval()
    table = Table(
        f"Sliding window over a preprocessed {list(shape)} volume, window {patch}, overlap 0.5, all 7 tasks, "
        f"{args.precision} {layout_name(args)}, float16 stitching "
        "(best of 2 after a warm-up)",
        ["sw_batch_size", "stitching on", "seconds", "peak GPU memory (MB)"],
    )
    print(table.title, flush=True)
    gpu = device.type == "cuda"
    batches = [int(b) for b in args.sliding_batches.split(",")]
    # (sw_batch_size, stitching, compiled network): CPU stitching copies each window's 2K channels to the host
    # whatever the batch, and the compiled network compiles per batch size: the first batch size shows each
    runs = [(b, "gpu (adaptive)" if gpu else "cpu", False) for b in batches]
    runs += [(batches[0], "cpu", False)] if gpu and args.sliding_cpu_stitching else []
    runs += [(batches[0], "gpu (adaptive)" if gpu else "cpu", True)] if args.sliding_compiled else []
    for batch, stitching, compiled in runs:
        inferer = TaskSlidingWindowInferer(
            roi_size=patch,
            sw_batch_size=batch,
            overlap=0.5,
            precision=args.precision,
            channels_last=args.channels_last,
            compile_network=compiled,
            sw_device=device,
            device="cpu" if stitching == "cpu" else None,
        )
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            seconds = best_of(lambda: inferer(image, net), device, repeats=2)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if gpu else float("nan")
        table.add(str(batch), stitching + (", compiled network" if compiled else ""), seconds, f"{peak:.0f}")
    return [table]


def train_section(args, device: torch.device) -> List[Table]:
    from scripts.training.losses import PartialLabelDiceBCELoss

    patch = [192, 192, 64] if device.type == "cuda" else [int(v) for v in args.train_patch.split(",")]
    torch.manual_seed(0)
    net = to_channels_last(DoDNet().to(device).train())  # as configs/train.json (channels_last: true)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    loss_fn = PartialLabelDiceBCELoss()
    x = torch.randn(2, 1, *patch, device=device)
    target = (torch.rand(2, 2, *patch, device=device) > 0.9).float()
    task = torch.tensor([0, 3], device=device)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(enabled=amp)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = loss_fn(net(x, task), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    seconds = best_of(step, device, args.repeats, warmup=1)
    table = Table(
        "Training (configs/train.json's step: channels-last, SGD)",
        ["patch", "batch", "precision", "seconds per iteration", "iterations per second"],
    )
    table.add(str(patch), "2", "fp16 AMP" if amp else "fp32", seconds, 1.0 / seconds)
    return [table]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patch", default="192,192,64", help="H,W,D of the forward patch")
    parser.add_argument("--train-patch", default="96,96,32", help="H,W,D of the CPU training patch")
    parser.add_argument("--precision", default=None, help="fast-path precision (default: bf16 on CPU and GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-compile-head", dest="compile_head", action="store_false", help="skip the compiled-head rows"
    )
    parser.add_argument(
        "--compile-network", action="store_true", help="also time the torch.compile'd network (patch, sliding)"
    )
    parser.add_argument(
        "--layout",
        choices=["channels-last", "contiguous"],
        default=None,
        help="memory layout of the inference rows (default: as configs/inference.json, channels-last on the CPU only)",
    )
    parser.add_argument(
        "--sliding-compiled",
        action="store_true",
        help="a sliding-window row with the compiled network (compiles again)",
    )
    parser.add_argument(
        "--no-sliding-cpu", dest="sliding_cpu_stitching", action="store_false", help="no CPU-stitching sliding row"
    )
    parser.add_argument("--volume-precision", default="fp32", help="network precision of the whole-volume run")
    parser.add_argument("--volume-overlap", type=float, default=0.5, help="window overlap of the whole-volume run")
    parser.add_argument(
        "--volume-compile-head", action="store_true", help="whole-volume run with the compiled dynamic heads"
    )
    parser.add_argument(
        "--volume-sw-batch-size", type=int, default=1, help="windows per network call in the whole-volume run"
    )
    parser.add_argument(
        "--volume-compile-network", action="store_true", help="whole-volume run with the compiled network"
    )
    parser.add_argument("--volume-reader", default="ITKReader", help="image reader of the whole-volume run")
    parser.add_argument("--sliding-batches", default="1,2,4", help="sw_batch_size values of the sliding section")
    parser.add_argument("--sliding-shape", default="448,448,200", help="H,W,D of the sliding section's volume")
    parser.add_argument(
        "--skip",
        default=None,
        help="sections to skip: patch,efficiency,sliding,volume,train (default: sliding on the CPU, none on a GPU)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.precision = args.precision or "bf16"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    patch = [int(v) for v in args.patch.split(",")]
    args.channels_last = (args.layout or ("channels-last" if device.type == "cpu" else "contiguous")) == "channels-last"
    if args.skip is None:
        args.skip = "" if device.type == "cuda" else "sliding"
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    print(f"machine: {machine_name(device)}; device: {device}", flush=True)
    tables: List[Table] = []
    sections = {
        "patch": lambda: patch_section(args, device, patch),
        "efficiency": lambda: efficiency_section(args, device, patch),
        "train": lambda: train_section(args, device),
        "sliding": lambda: sliding_section(args, device, patch),
        "volume": lambda: volume_section(args, device),
    }
    for name, section in sections.items():
        if name not in skip:
            tables += section()
    print(f"\nDoDNet benchmark — machine: {machine_name(device)}; device: {device}")
    for table in tables:
        print(table.render())


if __name__ == "__main__":
    main()
