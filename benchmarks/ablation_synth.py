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

DoDNet's options ``--image_to_head``, ``--contrast_to_head`` and ``--deep_supervision`` apply to every variant.
The demo's recipe knobs (``--controller_init``, ``--lr``, ``--bce_weight``, ``--pos_weight``, ``--loss_average``,
``--warmup``, ``--clip``, ``--beta2``, ``--ema``, ``--controller_lr_scale``, ``--crop``, ``--train_seed``) and
``--post_rules demo`` (score after demo.json's post-processing as well as raw) make it the loop for comparing demo
recipes over several seeds at a fixed budget; ``--eval_at`` scores the test split during training (a learning curve
from one run) and ``--logit_stats`` adds each structure's mean logit on its foreground and background voxels there;
``--thresholds`` scores the trained network at other logit thresholds than 0 (is a structure ranked above its
background but not yet above 0, or not separated from it?).

Run (2-core CPU, a few minutes per variant with the defaults)::

    python benchmarks/ablation_synth.py --iterations 300
    python benchmarks/ablation_synth.py --iterations 600 --variants dodnet,cond_no --json ablation.json
    python benchmarks/ablation_synth.py --variants dodnet --iterations 700 --controller_init task_heads \
        --norm_groups 4 --lr 0.0015 --bce_weight 0.3 --num_test_per_task 8 --post_rules demo --train_seed 1
    python benchmarks/ablation_synth.py --variants dodnet --iterations 700 --controller_init task_heads \
        --norm_groups 4 --lr 0.0015 --bce_weight 0.3 --num_test_per_task 8 --post_rules demo --eval_at 350,700
    python benchmarks/ablation_synth.py --variants dodnet --iterations 700 --controller_init task_heads \
        --norm_groups 4 --lr 0.0015 --bce_weight 0.3 --num_test_per_task 8 --post_rules demo --image_to_head \
        --deep_supervision 2 --train_seed 1
    python benchmarks/ablation_synth.py --variants dodnet --iterations 700 --controller_init task_heads \
        --norm_groups 4 --lr 0.0015 --bce_weight 0.3 --num_test_per_task 8 --post_rules demo --image_to_head \
        --contrast_to_head 3,7 --deep_supervision 2 --pos_weight 20 --train_seed 1
    python benchmarks/ablation_synth.py --variants dodnet --iterations 840 --controller_init task_heads \
        --norm_groups 4 --lr 0.0015 --bce_weight 0.3 --num_test_per_task 8 --post_rules demo --image_to_head \
        --contrast_to_head 3,7 --deep_supervision 2 --pos_weight 20 --loss_average structures --crop 48,48,32 \
        --train_seed 1   # the demo's recipe (demo.json)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dodnet_bundle"))

from monai.data import CacheDataset, DataLoader, load_decathlon_datalist  # noqa: E402
from monai.losses import DeepSupervisionLoss  # noqa: E402
from monai.metrics import compute_dice  # noqa: E402
from monai.optimizers import generate_param_groups  # noqa: E402
from monai.transforms import Compose, SpatialPadd  # noqa: E402
from monai.utils import set_determinism  # noqa: E402

from scripts.data.label_mapping import MapTaskLabelsd  # noqa: E402
from scripts.data.synth import ensure_mots_synth  # noqa: E402
from scripts.data.transforms import ct_preprocessing  # noqa: E402
from scripts.inference.postprocessing import TaskPostProcessd  # noqa: E402
from scripts.networks import DoDNet, contrast_kernels, stage_blocks  # noqa: E402
from scripts.tasks import TASKS  # noqa: E402
from scripts.training.losses import AVERAGES, MaxPoolDeepSupervisionLoss, PartialLabelDiceBCELoss  # noqa: E402

VARIANTS = ("dodnet", "task_only", "cond_no", "multi_nets")
PATCH = (64, 64, 32)
"""The whole MOTS-synth volume at 0.8 x 0.8 x 1.5 mm: the test window, and the training patch without ``--crop``."""
CONDITIONING = {"dodnet": "dodnet", "task_only": "task", "cond_no": "image", "multi_nets": "dodnet"}


@dataclass
class Recipe:
    """Optional training knobs on top of Adam with poly(0.9) decay; the defaults change nothing.

    Args:
        warmup: iterations of linear learning-rate warm-up (0: none).
        clip: maximum gradient norm (0: no clipping).
        beta2: Adam's second-moment decay.
        ema: decay of an exponential moving average of the weights that is scored instead of the
            trained weights (0: none); the decay ramps up as ``min(ema, (1 + step) / (10 + step))``.
        pos_weight: BCE weight of the foreground voxels (``PartialLabelDiceBCELoss``; 0: none).
        loss_average: ``PartialLabelDiceBCELoss``'s ``average``: "channels" or "structures".
        controller_lr_scale: learning rate of the controller relative to the rest of the network.
        crop: train on random crops of this (H, W, D) size (one offset per batch) instead of whole volumes.
        ds_targets: with deep supervision, how the label reaches the lower levels: "nearest" (MONAI's
            ``DeepSupervisionLoss``) or "max" (``MaxPoolDeepSupervisionLoss``).
    """

    warmup: int = 0
    clip: float = 0.0
    beta2: float = 0.999
    ema: float = 0.0
    pos_weight: float = 0.0
    loss_average: str = "channels"
    controller_lr_scale: float = 1.0
    crop: Tuple[int, ...] = ()
    ds_targets: str = "nearest"
    ema_net: Optional[torch.nn.Module] = None

    @torch.no_grad()
    def update_ema(self, net: torch.nn.Module, step: int) -> None:
        """Move ``ema_net``'s parameters towards ``net``'s; copy its buffers."""
        decay = min(self.ema, (1.0 + step) / (10.0 + step))
        for ema_p, p in zip(self.ema_net.parameters(), net.parameters()):
            ema_p.lerp_(p, 1.0 - decay)
        for ema_b, b in zip(self.ema_net.buffers(), net.buffers()):
            ema_b.copy_(b)


def _network(num_tasks: int, kwargs: Dict[str, Any]) -> DoDNet:
    """A DoDNet in the channels-last memory format that train.json trains in (its ``channels_last``), so that the
    loop's seconds are those of the bundle's training step."""
    return DoDNet(num_tasks=num_tasks, **kwargs).to(memory_format=torch.channels_last_3d)


def volume_transform(patch: Sequence[int]) -> Compose:
    """The loop's preprocessing of a datalist item: the bundle's CT chain, padded to ``patch``, labels mapped to
    (organ, tumor) channels with -1 where the item's task does not label them."""
    steps = ct_preprocessing(label_keys=["label"]) + [
        SpatialPadd(["image", "label"], spatial_size=list(patch)),
        MapTaskLabelsd(),
    ]
    return Compose(steps)


def _datasets(datalist: Path, patch: Sequence[int]) -> Tuple[CacheDataset, CacheDataset]:
    train = load_decathlon_datalist(str(datalist), True, "training")
    test = load_decathlon_datalist(str(datalist), True, "test")
    kwargs = dict(transform=volume_transform(patch), num_workers=0, progress=False)
    return CacheDataset(train, **kwargs), CacheDataset(test, **kwargs)


def _train(
    net: DoDNet,
    data: torch.utils.data.Dataset,
    iterations: int,
    batch_size: int,
    lr: float,
    fixed_task: Optional[int],
    bce_weight: float = 1.0,
    recipe: Optional["Recipe"] = None,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> float:
    """Train ``net`` for ``iterations`` steps (Adam, poly 0.9 decay); ``fixed_task`` feeds task id 0 (single-task nets).

    ``recipe`` adds a linear warm-up, gradient-norm clipping, Adam's beta2, an EMA copy of the weights
    (``recipe.ema_net``, updated after every step), a BCE foreground weight, the controller's learning rate and
    random crops. ``on_step(step, train_seconds)`` runs after every step (its own time is not counted).
    """
    recipe = recipe or Recipe()
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=len(data) > batch_size)
    params = generate_param_groups(
        net, [lambda m: m.controller], ["select"], [lr * recipe.controller_lr_scale], include_others=True
    )
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, recipe.beta2))
    total = max(1, iterations)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / recipe.warmup) if recipe.warmup else 1.0
        return warm * (1.0 - min(step, total) / total) ** 0.9

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    loss_fn = PartialLabelDiceBCELoss(
        bce_weight=bce_weight, pos_weight=recipe.pos_weight or None, average=recipe.loss_average
    )
    if net.backbone.deep_supervision:  # as train.json's train#deep_supervision_loss
        wrapper = MaxPoolDeepSupervisionLoss if recipe.ds_targets == "max" else DeepSupervisionLoss
        loss_fn = wrapper(loss_fn, weight_mode="exp")
    if recipe.ema:
        recipe.ema_net = copy.deepcopy(net)
    net.train()
    step, start, paused, elapsed = 0, time.time(), 0.0, 0.0
    while step < iterations:
        for batch in loader:
            task = torch.zeros_like(batch["task_id"]) if fixed_task is not None else batch["task_id"]
            image, label = batch["image"], batch["label"]
            if recipe.crop:
                offsets = [int(np.random.randint(0, n - c + 1)) for n, c in zip(image.shape[2:], recipe.crop)]
                window = (slice(None), slice(None)) + tuple(slice(o, o + c) for o, c in zip(offsets, recipe.crop))
                image, label = image[window], label[window]
            loss = loss_fn(net(image, task), label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), recipe.clip)
            optimizer.step()
            scheduler.step()
            step += 1
            if recipe.ema_net is not None:
                recipe.update_ema(net, step)
            elapsed = time.time() - start - paused  # the loop's wall time, data included, callbacks excluded
            if on_step is not None:
                on_step(step, elapsed)
                paused = time.time() - start - elapsed
            if step >= iterations:
                break
    return elapsed


@torch.no_grad()
def _threshold_kind(threshold: float) -> str:
    """The key of the scores at a logit ``threshold`` in ``_score``'s result."""
    return f"logit > {threshold:g}"


def _score(
    nets: Dict[int, DoDNet],
    data: CacheDataset,
    single_task: bool,
    post_rules: Optional[Dict[str, Any]] = None,
    logit_means: Optional[Dict[Tuple[str, int], List[Tuple[float, float]]]] = None,
    thresholds: Sequence[float] = (),
) -> Dict[str, Dict[Tuple[str, int], List[float]]]:
    """Dice per (task, channel) on the test cases, each case segmented for its own task.

    Returns ``{"raw": scores}``, plus ``{"post": scores}`` after the task post-processing with ``post_rules``
    (rule overrides per task name, as demo.json's) when it is given, and ``{"logit > t": scores}`` (no
    post-processing) for every logit threshold ``t`` in ``thresholds``. ``logit_means``, when given, receives per
    (task, channel) each case's mean logit on its foreground and on its background voxels (cases that label the
    channel and have foreground in it), from the same forward pass.
    """
    post = None if post_rules is None else TaskPostProcessd(keys="pred", task_id_key="task_id", rules=post_rules)
    scores: Dict[str, Dict[Tuple[str, int], List[float]]] = {"raw": {}} if post is None else {"raw": {}, "post": {}}
    scores.update({_threshold_kind(t): {} for t in thresholds})
    for item in data:
        task = int(item["task_id"])
        net = nets[task] if single_task else nets[-1]
        net.eval()
        logits = net(item["image"][None], torch.tensor([0 if single_task else task]))[0]
        if logit_means is not None:
            for channel in range(2):
                ref = item["label"][channel].as_subclass(torch.Tensor)
                if bool((ref >= 0).all()) and bool((ref > 0).any()):
                    x = logits[channel]
                    logit_means.setdefault((TASKS[task].name, channel), []).append(
                        (float(x[ref > 0].mean()), float(x[ref == 0].mean()))
                    )
        preds = {"raw": (logits > 0).float()}
        preds.update({_threshold_kind(t): (logits > t).float() for t in thresholds})
        if post is not None:
            preds["post"] = torch.as_tensor(post({"pred": preds["raw"].clone(), "task_id": task})["pred"]).float()
        for kind, pred in preds.items():
            for channel in range(2):
                ref = item["label"][channel]
                if bool((ref < 0).all()):
                    continue
                dice = compute_dice(pred[None, channel : channel + 1], ref[None, None], ignore_empty=False)
                scores[kind].setdefault((TASKS[task].name, channel), []).append(float(dice))
    return scores


def _logit_stats(net: DoDNet, data: CacheDataset) -> Dict[Tuple[str, int], Tuple[float, float]]:
    """Mean logit on the foreground and on the background voxels per (task, channel), over the cases that
    label the channel and have foreground in it (whether a structure is learned but not yet above 0)."""
    values: Dict[Tuple[str, int], List[Tuple[float, float]]] = {}
    _score({-1: net}, data, False, logit_means=values)
    return _mean_pairs(values)


def _mean_pairs(values: Dict[Tuple[str, int], List[Tuple[float, float]]]) -> Dict[Tuple[str, int], Tuple[float, float]]:
    return {k: (float(np.mean([v[0] for v in vs])), float(np.mean([v[1] for v in vs]))) for k, vs in values.items()}


def _label(key: Tuple[str, int]) -> str:
    return f"{key[0]}:{'organ' if key[1] == 0 else 'tumor'}"


def _curve_point(
    variant: str,
    net: DoDNet,
    data: CacheDataset,
    step: int,
    seconds: float,
    post_rules: Optional[Dict[str, Any]],
    logit_stats: bool,
) -> Dict[str, object]:
    """Score ``net`` on ``data`` during training (after post-processing when ``post_rules`` is given), print one
    line (and the logit means with ``logit_stats``) and return ``{"seconds", "organ", "tumor", "dice"}``."""
    means: Optional[Dict[Tuple[str, int], List[Tuple[float, float]]]] = {} if logit_stats else None
    scores = _score({-1: net}, data, False, post_rules, means)
    kind = "post" if "post" in scores else "raw"
    dice = {k: float(np.mean(v)) for k, v in scores[kind].items()}
    organ = float(np.mean([d for k, d in dice.items() if k[1] == 0]))
    tumor = float(np.mean([d for k, d in dice.items() if k[1] == 1]))
    print(
        f"{variant} at {step} iterations ({seconds:.0f} s of training): organ {organ:.3f}, tumor {tumor:.3f} ({kind}); "
        + ", ".join(f"{_label(k)} {d:.2f}" for k, d in sorted(dice.items())),
        flush=True,
    )
    if means is not None:
        stats = _mean_pairs(means)
        print(
            "  mean logit, foreground / background: "
            + ", ".join(f"{_label(k)} {fg:.1f} / {bg:.1f}" for k, (fg, bg) in sorted(stats.items())),
            flush=True,
        )
    net.train()
    return {"seconds": seconds, "organ": organ, "tumor": tumor, "dice": {_label(k): d for k, d in dice.items()}}


def run_ablation(
    variants: Sequence[str] = VARIANTS,
    iterations: int = 300,
    num_per_task: int = 12,
    base_channels: int = 8,
    batch_size: int = 2,
    lr: float = 3e-3,
    cache_dir: str = ".cache/ablation_synth",
    seed: int = 0,
    patch: Sequence[int] = PATCH,
    preseg_channels: int = 16,
    head_width: int = 16,
    controller_init: str = "default",
    bce_weight: float = 1.0,
    norm_groups: int = 16,
    num_test_per_task: int = 2,
    train_seed: Optional[int] = None,
    recipe: Optional[Recipe] = None,
    post_rules: Optional[Dict[str, Any]] = None,
    score_train: bool = False,
    synth_workers: int = 1,
    eval_at: Sequence[int] = (),
    logit_stats: bool = False,
    thresholds: Sequence[float] = (),
    image_to_head: bool = False,
    contrast_to_head: Sequence[int] = (),
    deep_supervision: int = 0,
    blocks: Sequence[int] = (1, 2, 2, 2, 2),
) -> Dict[str, Dict[str, object]]:
    """Train and score each variant.

    ``image_to_head``, ``contrast_to_head``, ``deep_supervision`` and ``blocks`` are DoDNet's options of those names
    (for every variant).

    ``eval_at``: iterations at which the test split is also scored during training (not for ``multi_nets``),
    stored as ``"curve": {iteration: {"seconds", "organ", "tumor", "dice"}}``; ``logit_stats`` prints the mean
    foreground and background logits there too. ``thresholds``: the trained network's raw test Dice (no
    post-processing) when a voxel counts as foreground above each of these logits instead of 0, stored as
    ``"threshold_dice": {threshold: {(task, channel): mean}}`` (whether a structure is ranked above its background
    but not yet above 0, or not separated from it at all).

    ``seed`` makes the data, ``train_seed`` (default: ``seed``) the initialization and batch order.
    Returns ``{variant: {"dice": {(task, channel): mean}, "seconds": s}}``, plus ``"dice_post"`` with
    ``post_rules``, and ``"train_dice"`` (``"train_dice_post"``) on the training cases with ``score_train``
    (how well the cases were fitted, against how well the test cases generalize).
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {VARIANTS}")
    datalist = ensure_mots_synth(
        cache_dir, num_per_task=num_per_task, seed=seed, num_test_per_task=num_test_per_task, workers=synth_workers
    )
    train_data, test_data = _datasets(datalist, patch)
    results: Dict[str, Dict[str, object]] = {}
    for variant in variants:
        set_determinism(seed if train_seed is None else train_seed)
        recipe_v = copy.deepcopy(recipe) if recipe is not None else Recipe()
        kwargs = dict(
            base_channels=base_channels,
            conditioning=CONDITIONING[variant],
            preseg_channels=preseg_channels,
            head_width=head_width,
            norm_groups=norm_groups,
            controller_init="default" if variant == "cond_no" else controller_init,
            image_to_head=image_to_head,
            contrast_to_head=list(contrast_to_head),
            deep_supervision=deep_supervision,
            blocks=list(blocks),
        )
        seconds = 0.0
        if variant == "multi_nets":
            nets = {}
            for spec in TASKS:
                subset = [d for d in train_data if int(d["task_id"]) == spec.id]
                net, task_recipe = _network(1, kwargs), copy.deepcopy(recipe_v)
                seconds += _train(net, subset, iterations // len(TASKS), batch_size, lr, 0, bce_weight, task_recipe)
                nets[spec.id] = task_recipe.ema_net if task_recipe.ema_net is not None else net
            scored_nets, single_task = nets, True
        else:
            net = _network(len(TASKS), kwargs)
            curve: Dict[int, Dict[str, object]] = {}

            def on_step(step: int, train_seconds: float) -> None:
                if step in eval_at:
                    scored = recipe_v.ema_net if recipe_v.ema_net is not None else net
                    curve[step] = _curve_point(variant, scored, test_data, step, train_seconds, post_rules, logit_stats)

            seconds = _train(net, train_data, iterations, batch_size, lr, None, bce_weight, recipe_v, on_step)
            scored_nets, single_task = {-1: recipe_v.ema_net if recipe_v.ema_net is not None else net}, False
        results[variant] = {"seconds": seconds}
        if variant != "multi_nets" and eval_at:
            results[variant]["curve"] = curve
        for prefix, data in (("", test_data), ("train_", train_data))[: 2 if score_train else 1]:
            scores = _score(scored_nets, data, single_task, post_rules, thresholds=thresholds if not prefix else ())
            for kind, field in (("raw", "dice"), ("post", "dice_post")):
                if kind in scores:
                    results[variant][prefix + field] = {k: float(np.mean(v)) for k, v in scores[kind].items()}
            if thresholds and not prefix:
                results[variant]["threshold_dice"] = {
                    t: {k: float(np.mean(v)) for k, v in scores[_threshold_kind(t)].items()} for t in thresholds
                }
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
    means = [("organ mean", "dice", 0), ("tumor mean", "dice", 1), ("mean (11 classes)", "dice", None)]
    for field, suffix in (("dice_post", ", post"), ("train_dice", ", train"), ("train_dice_post", ", train post")):
        if all(field in results[v] for v in variants):
            means += [(f"organ mean{suffix}", field, 0), (f"tumor mean{suffix}", field, 1)]
    for title, field, channel in means:
        subset = [k for k in keys if channel is None or k[1] == channel]
        cells = [np.mean([results[v][field][k] for k in subset if k in results[v][field]]) for v in variants]
        rows.append(f"{title:<24}" + "".join(f"{c:>12.3f}" for c in cells))
    rows.append(f"{'train seconds':<24}" + "".join(f"{results[v]['seconds']:>12.0f}" for v in variants))
    for threshold in sorted({t for v in variants for t in results[v].get("threshold_dice", {})}):
        for title, channel in (("organ", 0), ("tumor", 1)):
            cells = []
            for v in variants:
                dice = results[v].get("threshold_dice", {}).get(threshold)
                cells.append(np.mean([d for k, d in dice.items() if k[1] == channel]) if dice else float("nan"))
            label = f"{title} mean, {_threshold_kind(threshold)}"
            rows.append(f"{label:<24}" + "".join(f"{c:>12.3f}" for c in cells))
    return "\n".join(rows)


def _comma_separated(text: str, cast: Callable[[str], Any], what: str) -> Tuple[Any, ...]:
    """``text`` split at commas and cast; an ``argparse.ArgumentTypeError`` naming ``what`` on a bad part."""
    try:
        return tuple(cast(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None


def _ints(text: str) -> Tuple[int, ...]:
    """``"48,48,32"`` -> ``(48, 48, 32)``; an empty string -> ``()`` (argparse ``type``: a bad value is one line)."""
    values = _comma_separated(text, int, "integers")
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _blocks(text: str) -> List[int]:
    """``"0,2,2,2,2"`` -> DoDNet's ``blocks`` (``stage_blocks``), checked before any data is made."""
    try:
        return stage_blocks(_comma_separated(text, int, "integers"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _floats(text: str) -> Tuple[float, ...]:
    """``"-5,0,2.5"`` -> ``(-5.0, 0.0, 2.5)`` (argparse ``type``: a bad value is one line)."""
    return _comma_separated(text, float, "numbers")


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
    parser.add_argument(
        "--image_to_head", action="store_true", help="DoDNet's image_to_head: heads also read the image"
    )
    parser.add_argument(
        "--contrast_to_head",
        type=contrast_kernels,
        default=[],
        help="DoDNet's contrast_to_head: box sizes of local-contrast channels the heads read (e.g. 3,7)",
    )
    parser.add_argument(
        "--deep_supervision", type=int, default=0, help="DoDNet's deep_supervision: decoder levels (0-3) in the loss"
    )
    parser.add_argument(
        "--blocks",
        type=_blocks,
        default=[1, 2, 2, 2, 2],
        help="DoDNet's blocks: residual blocks per encoder stage, e.g. 0,2,2,2,2 (default: the paper's 1,2,2,2,2)",
    )
    parser.add_argument(
        "--ds_targets", choices=("nearest", "max"), default="nearest", help="lower-level labels: sampled or max-pooled"
    )
    parser.add_argument("--norm_groups", type=int, default=16, help="GroupNorm groups (capped at the width; demo: 4)")
    parser.add_argument("--bce_weight", type=float, default=1.0, help="weight of the BCE term of the loss")
    parser.add_argument("--num_test_per_task", type=int, default=2, help="MOTS-synth test volumes per task")
    parser.add_argument("--warmup", type=int, default=0, help="iterations of linear learning-rate warm-up")
    parser.add_argument("--clip", type=float, default=0.0, help="maximum gradient norm (0: no clipping)")
    parser.add_argument("--beta2", type=float, default=0.999, help="Adam's beta2")
    parser.add_argument("--pos_weight", type=float, default=0.0, help="BCE weight of foreground voxels (0: none)")
    parser.add_argument(
        "--loss_average", choices=AVERAGES, default="channels", help="PartialLabelDiceBCELoss's average"
    )
    parser.add_argument("--controller_lr_scale", type=float, default=1.0, help="controller learning rate / lr")
    parser.add_argument(
        "--crop", type=_ints, default=(), help="train on random H,W,D crops of this size (default: whole volumes)"
    )
    parser.add_argument(
        "--eval_at", type=_ints, default=(), help="comma-separated iterations at which to score the test split"
    )
    parser.add_argument("--logit_stats", action="store_true", help="with --eval_at: mean foreground/background logits")
    parser.add_argument(
        "--thresholds",
        type=_floats,
        default=(),
        help="comma-separated logit thresholds at which the trained network's raw test Dice is also scored "
        "(write negative values as --thresholds=-5,0)",
    )
    parser.add_argument("--ema", type=float, default=0.0, help="score an EMA of the weights with this decay (0: off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the MOTS-synth data")
    parser.add_argument(
        "--train_seed", type=int, default=None, help="seed of initialization and batches (default: --seed)"
    )
    parser.add_argument(
        "--post_rules",
        choices=("none", "demo"),
        default="none",
        help="demo: also score after demo.json's post-processing",
    )
    parser.add_argument("--score_train", action="store_true", help="also score the training cases (fit vs test)")
    parser.add_argument("--synth_workers", type=int, default=1, help="processes generating MOTS-synth")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cache_dir", default=".cache/ablation_synth")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.crop and (len(args.crop) != 3 or any(c > p or c % 16 for c, p in zip(args.crop, PATCH))):
        parser.error(f"--crop must be three sizes divisible by 16 within the {PATCH} volumes, got {args.crop}")
    if args.threads:
        torch.set_num_threads(args.threads)
    post_rules = None
    if args.post_rules == "demo":
        from scripts.demo import demo_settings

        post_rules = demo_settings()["post_rules"]
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
        seed=args.seed,
        train_seed=args.train_seed,
        recipe=Recipe(
            warmup=args.warmup,
            clip=args.clip,
            beta2=args.beta2,
            ema=args.ema,
            pos_weight=args.pos_weight,
            loss_average=args.loss_average,
            controller_lr_scale=args.controller_lr_scale,
            crop=args.crop,
            ds_targets=args.ds_targets,
        ),
        post_rules=post_rules,
        score_train=args.score_train,
        synth_workers=args.synth_workers,
        eval_at=args.eval_at,
        logit_stats=args.logit_stats,
        thresholds=args.thresholds,
        image_to_head=args.image_to_head,
        contrast_to_head=args.contrast_to_head,
        deep_supervision=args.deep_supervision,
        blocks=args.blocks,
    )
    print(f"\nMOTS-synth ablation: {args.iterations} iterations of batch {args.batch_size} per variant, test Dice")
    print(format_results(results))
    if args.json:

        def named(dice: Dict[Tuple[str, int], float]) -> Dict[str, float]:
            return {_label(k): d for k, d in dice.items()}

        def serialize(field: str, value: Any) -> Any:
            if field == "threshold_dice":
                return {str(t): named(d) for t, d in value.items()}
            return value if field in ("seconds", "curve") else named(value)

        serial = {v: {field: serialize(field, value) for field, value in r.items()} for v, r in results.items()}
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": serial}, indent=2))


if __name__ == "__main__":
    main()
