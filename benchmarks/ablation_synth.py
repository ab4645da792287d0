"""Ablation on MOTS-synth: DoDNet vs task-only vs Cond-NO vs one network per task, same budget.

The paper's Tables 5 and 6 in miniature. Every variant is the same reduced-width encoder-decoder
trained with the bundle's own pieces (``ct_preprocessing``, ``MapTaskLabelsd``,
``PartialLabelDiceBCELoss``) for the same number of training iterations (batch ``batch_size``) on the
same MOTS-synth training split, then scored on its test split (Dice per task and structure, each
case for its own task):

- ``dodnet``: image features + task one-hot condition the dynamic head (the published model);
- ``task_only``: the task one-hot alone generates the head (no image conditioning);
- ``cond_no``: image features alone (no task prior; "Cond-NO"): every task gets the same head, so
  it must fail on structures that are foreground in one task's volumes and background in another's;
- ``multi_nets``: seven single-task networks, each trained on its own task's volumes for 1/7 of the
  iterations (the same total budget).

Run (2-core CPU, a few minutes per variant with the defaults)::

    python benchmarks/ablation_synth.py --iterations 300
    python benchmarks/ablation_synth.py --iterations 600 --variants dodnet,cond_no --json ablation.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dodnet_bundle"))

from monai.data import CacheDataset, DataLoader, load_decathlon_datalist  # noqa: E402
from monai.metrics import compute_dice  # noqa: E402
from monai.transforms import Compose, SpatialPadd  # noqa: E402
from monai.utils import set_determinism  # noqa: E402

from scripts.data.label_mapping import MapTaskLabelsd  # noqa: E402
from scripts.data.synth import ensure_mots_synth  # noqa: E402
from scripts.data.transforms import ct_preprocessing  # noqa: E402
from scripts.networks import DoDNet  # noqa: E402
from scripts.tasks import TASKS  # noqa: E402
from scripts.training.losses import PartialLabelDiceBCELoss  # noqa: E402

VARIANTS = ("dodnet", "task_only", "cond_no", "multi_nets")
CONDITIONING = {"dodnet": "dodnet", "task_only": "task", "cond_no": "image", "multi_nets": "dodnet"}


def _datasets(datalist: Path, patch: Sequence[int]) -> Tuple[CacheDataset, CacheDataset]:
    steps = ct_preprocessing(label_keys=["label"]) + [
        SpatialPadd(["image", "label"], spatial_size=list(patch)),
        MapTaskLabelsd(),
    ]
    train = load_decathlon_datalist(str(datalist), True, "training")
    test = load_decathlon_datalist(str(datalist), True, "test")
    kwargs = dict(transform=Compose(steps), num_workers=0, progress=False)
    return CacheDataset(train, **kwargs), CacheDataset(test, **kwargs)


def _train(
    net: DoDNet,
    data: torch.utils.data.Dataset,
    iterations: int,
    batch_size: int,
    lr: float,
    fixed_task: Optional[int],
    bce_weight: float = 1.0,
) -> float:
    """Train ``net`` for ``iterations`` steps (Adam); ``fixed_task`` feeds task id 0 (single-task nets)."""
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=len(data) > batch_size)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=max(1, iterations), power=0.9)
    loss_fn = PartialLabelDiceBCELoss(bce_weight=bce_weight)
    net.train()
    step, start = 0, time.time()
    while step < iterations:
        for batch in loader:
            task = torch.zeros_like(batch["task_id"]) if fixed_task is not None else batch["task_id"]
            loss = loss_fn(net(batch["image"], task), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step >= iterations:
                break
    return time.time() - start


@torch.no_grad()
def _score(nets: Dict[int, DoDNet], data: CacheDataset, single_task: bool) -> Dict[Tuple[str, int], List[float]]:
    """Dice per (task, channel) on the test cases; each case segmented for its own task."""
    scores: Dict[Tuple[str, int], List[float]] = {}
    for item in data:
        task = int(item["task_id"])
        net = nets[task] if single_task else nets[-1]
        net.eval()
        logits = net(item["image"][None], torch.tensor([0 if single_task else task]))[0]
        pred = (logits > 0).float()
        for channel in range(2):
            ref = item["label"][channel]
            if bool((ref < 0).all()):
                continue
            dice = compute_dice(pred[None, channel : channel + 1], ref[None, None], ignore_empty=False)
            scores.setdefault((TASKS[task].name, channel), []).append(float(dice))
    return scores


def run_ablation(
    variants: Sequence[str] = VARIANTS,
    iterations: int = 300,
    num_per_task: int = 12,
    base_channels: int = 8,
    batch_size: int = 2,
    lr: float = 3e-3,
    cache_dir: str = ".cache/ablation_synth",
    seed: int = 0,
    patch: Sequence[int] = (64, 64, 32),
    preseg_channels: int = 16,
    head_width: int = 16,
    controller_init: str = "default",
    bce_weight: float = 1.0,
    norm_groups: int = 16,
    num_test_per_task: int = 2,
) -> Dict[str, Dict[str, object]]:
    """Train and score each variant; returns ``{variant: {"dice": {(task, channel): mean}, "seconds": s}}``."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {VARIANTS}")
    datalist = ensure_mots_synth(cache_dir, num_per_task=num_per_task, seed=seed, num_test_per_task=num_test_per_task)
    train_data, test_data = _datasets(datalist, patch)
    results: Dict[str, Dict[str, object]] = {}
    for variant in variants:
        set_determinism(seed)
        kwargs = dict(
            base_channels=base_channels,
            conditioning=CONDITIONING[variant],
            preseg_channels=preseg_channels,
            head_width=head_width,
            norm_groups=norm_groups,
            controller_init="default" if variant == "cond_no" else controller_init,
        )
        seconds = 0.0
        if variant == "multi_nets":
            nets = {}
            for spec in TASKS:
                subset = [d for d in train_data if int(d["task_id"]) == spec.id]
                nets[spec.id] = DoDNet(num_tasks=1, **kwargs)
                seconds += _train(nets[spec.id], subset, iterations // len(TASKS), batch_size, lr, 0, bce_weight)
            scores = _score(nets, test_data, single_task=True)
        else:
            net = DoDNet(num_tasks=len(TASKS), **kwargs)
            seconds = _train(net, train_data, iterations, batch_size, lr, None, bce_weight)
            scores = _score({-1: net}, test_data, single_task=False)
        results[variant] = {"dice": {k: float(np.mean(v)) for k, v in scores.items()}, "seconds": seconds}
        print(f"{variant}: trained in {seconds:.0f} s", flush=True)
    return results


def format_results(results: Dict[str, Dict[str, object]]) -> str:
    """Rows: tasks' labeled structures; columns: variants; last rows: organ mean and all-structure mean."""
    variants = list(results)
    rows = [f"{'structure':<24}" + "".join(f"{v:>12}" for v in variants)]
    keys = [(s.name, c) for s in TASKS for c, rule in ((0, s.organ_rule), (1, s.tumor_rule)) if rule is not None]
    for name, channel in keys:
        label = name.replace("_", " ") + ("" if channel == 0 else " tumor")
        cells = [results[v]["dice"].get((name, channel)) for v in variants]
        rows.append(f"{label:<24}" + "".join(f"{'n/a' if c is None else f'{c:.3f}':>12}" for c in cells))
    for title, subset in (("organ mean", [k for k in keys if k[1] == 0]), ("mean (11 classes)", keys)):
        cells = [np.mean([results[v]["dice"][k] for k in subset if k in results[v]["dice"]]) for v in variants]
        rows.append(f"{title:<24}" + "".join(f"{c:>12.3f}" for c in cells))
    rows.append(f"{'train seconds':<24}" + "".join(f"{results[v]['seconds']:>12.0f}" for v in variants))
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--iterations", type=int, default=300, help="training iterations per variant (total)")
    parser.add_argument("--num_per_task", type=int, default=12, help="MOTS-synth training volumes per task")
    parser.add_argument("--base_channels", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--preseg_channels", type=int, default=16, help="dynamic head input width (as the demo)")
    parser.add_argument("--head_width", type=int, default=16, help="dynamic head hidden width (as the demo)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--controller_init", default="default", help="'default' or 'task_heads' (not for cond_no)")
    parser.add_argument("--norm_groups", type=int, default=16, help="GroupNorm groups (capped at the width; demo: 4)")
    parser.add_argument("--bce_weight", type=float, default=1.0, help="weight of the BCE term of the loss")
    parser.add_argument("--num_test_per_task", type=int, default=2, help="MOTS-synth test volumes per task")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cache_dir", default=".cache/ablation_synth")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_ablation(
        [v.strip() for v in args.variants.split(",") if v.strip()],
        args.iterations,
        args.num_per_task,
        args.base_channels,
        args.batch_size,
        args.lr,
        args.cache_dir,
        preseg_channels=args.preseg_channels,
        head_width=args.head_width,
        controller_init=args.controller_init,
        bce_weight=args.bce_weight,
        norm_groups=args.norm_groups,
        num_test_per_task=args.num_test_per_task,
    )
    print(f"\nMOTS-synth ablation: {args.iterations} iterations of batch {args.batch_size} per variant, test Dice")
    print(format_results(results))
    if args.json:
        serial = {v: {"dice": {f"{k[0]}:{'organ' if k[1] == 0 else 'tumor'}": d for k, d in r["dice"].items()},
                      "seconds": r["seconds"]} for v, r in results.items()}  # fmt: skip
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": serial}, indent=2))


if __name__ == "__main__":
    main()
