"""Seconds per training step of the demo's network, and which convolution kernels PyTorch picks.

The network, loss and optimizer come from ``configs/train.json`` + ``configs/demo.json`` (so the step is the
demo's); the input is random (speed does not depend on it). For each batch size and patch the script times
``--repeats`` forward + backward + optimizer steps after ``--warmup`` untimed ones and counts, with the torch
profiler, the 3D convolutions that ran through oneDNN (``mkldnn_convolution``) and through PyTorch's own
``slow_conv3d``: on the CPU small batch-1 convolutions take the slow kernel, which makes a batch-1 step
slower than a batch-2 one on this network.

Run (2-core CPU, about a minute)::

    python benchmarks/train_step.py
    python benchmarks/train_step.py --batch_sizes 1,2,4 --patch 64,64,32 --overrides '{"network_def#base_channels": 12}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dodnet_bundle"))

from monai.bundle import ConfigParser  # noqa: E402

from scripts.tasks import TASKS  # noqa: E402
from scripts.utils import BUNDLE_ROOT  # noqa: E402

CONV_KERNELS = {"aten::mkldnn_convolution": "onednn", "aten::slow_conv3d_forward": "slow_conv3d"}


def _demo_parts(overrides: Mapping[str, Any]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / name) for name in ("train.json", "demo.json")])
    parser.update(dict(overrides))
    return parser


def time_step(
    batch_size: int,
    patch: Sequence[int],
    repeats: int = 5,
    warmup: int = 2,
    overrides: Optional[Mapping[str, Any]] = None,
    channels_last: bool = True,
) -> Dict[str, Any]:
    """Best and median seconds of one training step of batch ``batch_size`` and (H, W, D) ``patch``.

    Returns ``{"batch_size", "patch", "best_s", "median_s", "per_sample_s", "convs": {kernel: count}}``; the
    kernel counts are of one forward.
    """
    parser = _demo_parts(overrides or {})
    net = parser.get_parsed_content("network_def", instantiate=True)
    # as the trainer's loss_function: the deep-supervision wrapper when the network returns lower levels too
    loss_fn = parser.get_parsed_content("train#deep_supervision_loss") or parser.get_parsed_content("loss")
    optimizer = torch.optim.Adam(net.parameters(), lr=float(parser.get_parsed_content("learning_rate")))
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format).train()
    image = torch.randn(batch_size, 1, *patch).to(memory_format=memory_format)
    label = (torch.rand(batch_size, 2, *patch) > 0.9).float()
    task = torch.arange(batch_size) % len(TASKS)

    def step() -> None:
        loss = loss_fn(net(image, task), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.no_grad():
            net(image, task)
    convs = {label_: 0 for label_ in CONV_KERNELS.values()}
    for event in prof.key_averages():
        if event.key in CONV_KERNELS:
            convs[CONV_KERNELS[event.key]] += int(event.count)
    times.sort()
    best, median = times[0], times[len(times) // 2]
    return {
        "batch_size": batch_size,
        "patch": list(patch),
        "best_s": round(best, 4),
        "median_s": round(median, 4),
        "per_sample_s": round(median / batch_size, 4),
        "convs": convs,
    }


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_sizes", default="1,2", help="comma-separated batch sizes")
    parser.add_argument("--patch", default="64,64,32", help="H,W,D of the input (the demo's volume)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--overrides", default="{}", help="JSON dict of config-id overrides, e.g. network widths")
    parser.add_argument("--contiguous", action="store_true", help="contiguous tensors instead of channels-last")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    patch = [int(p) for p in args.patch.split(",")]
    overrides = json.loads(args.overrides)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, patch {patch}, overrides {overrides}")
    print(f"{'batch':>5} {'best s':>8} {'median s':>9} {'s/sample':>9} {'oneDNN convs':>13} {'slow_conv3d':>12}")
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        row = time_step(batch_size, patch, args.repeats, args.warmup, overrides, not args.contiguous)
        convs = row["convs"]
        print(
            f"{batch_size:>5} {row['best_s']:>8.3f} {row['median_s']:>9.3f} {row['per_sample_s']:>9.3f}"
            f" {convs['onednn']:>13} {convs['slow_conv3d']:>12}",
            flush=True,
        )


if __name__ == "__main__":
    main()
