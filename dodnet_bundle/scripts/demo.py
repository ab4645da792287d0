"""The main job on the embedded default: MOTS-synth -> train a reduced-width DoDNet -> evaluate -> infer.

``bash dev.sh demo`` (console script ``dodnet-demo``) runs, through the bundle's own configs:

1. ``scripts.data.synth.ensure_mots_synth``: the synthetic partially labeled data set (generated once);
2. ``configs/train.json`` with overrides for a laptop CPU (DoDNet of width 8 with GroupNorm groups scaled
   to the width, whole-volume patches of 64 x 64 x 32 voxels, Adam, about 1,850 iterations, no spatial
   augmentation: left-right flips would swap the liver and spleen sides of the phantom; the published
   augmentations stay in train.json);
3. ``configs/train.json`` + ``configs/evaluate.json``: Dice per task and structure on the held-out
   test split (``summary.json``, ``metrics.csv``);
4. ``configs/inference.json``: all seven tasks on one held-out volume, written as a merged label map
   and per-structure masks in the input's geometry, the masks scored against that volume's own-task label;

and prints the per-task Dice table with the time of each step. Everything goes to ``output_dir``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from scripts.data.synth import ensure_mots_synth
from scripts.tasks import TASKS, resolve_task
from scripts.utils import BUNDLE_ROOT, write_json_atomic

__all__ = ["DEMO_DEFAULTS", "run_demo", "format_table", "main"]

logger = logging.getLogger("dodnet.demo")

DEMO_DEFAULTS: Dict[str, Any] = {
    "num_per_task": 12,
    "num_val_per_task": 2,
    "num_test_per_task": 4,
    "epochs": 44,
    "base_channels": 8,
    "patch_size": (64, 64, 32),
    "batch_size": 2,
    "learning_rate": 3e-3,
    "weight_std": True,
    "preseg_channels": 16,
    "head_width": 16,
    "norm_groups": 4,
}
"""Settings of the default demo: 44 epochs x 42 = 1,848 iterations of batch 2 on 84 training volumes,
about 8 minutes on 2 CPU cores."""


def _workflow(config_files: Sequence[str], workflow_type: Optional[str], overrides: Dict[str, Any]) -> Any:
    """Build, run and finalize a ``monai.bundle.ConfigWorkflow`` of the bundle's configs."""
    from monai.bundle import ConfigWorkflow

    configs = BUNDLE_ROOT / "configs"
    workflow = ConfigWorkflow(
        config_file=[str(configs / f) for f in config_files],
        meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"),
        workflow_type=workflow_type,
        **overrides,
    )
    workflow.initialize()
    if workflow_type is not None:
        missing = workflow.check_properties()
        if missing:
            raise RuntimeError(f"{config_files}: missing workflow properties {missing}")
    workflow.run()
    workflow.finalize()
    return workflow


def _network_overrides(
    base_channels: int,
    patch_size: Sequence[int],
    weight_std: bool,
    preseg_channels: int,
    head_width: int,
    norm_groups: int = 16,
) -> Dict[str, Any]:
    return {
        "bundle_root": str(BUNDLE_ROOT),
        "network_def#base_channels": int(base_channels),
        "network_def#weight_std": bool(weight_std),
        "network_def#preseg_channels": int(preseg_channels),
        "network_def#head_width": int(head_width),
        "network_def#norm_groups": int(norm_groups),
        "patch_size": [int(p) for p in patch_size],
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    }


def _dice(pred: np.ndarray, ref: np.ndarray) -> Optional[float]:
    total = int(pred.sum()) + int(ref.sum())
    return None if total == 0 else 2.0 * float(np.logical_and(pred, ref).sum()) / total


def score_structure_masks(output_dir: Path, case: str, label_path: Path, task: str) -> Dict[str, Optional[float]]:
    """Dice of the inference's per-structure masks (``<case>_<structure>_mask.nii.gz``, written with
    ``save_masks``) against the case's own-task source label.

    The per-structure masks keep overlaps the merged label map resolves by precedence (hepatic vessels
    painted over the liver, which LiTS counts as liver), so each structure is scored as its source
    annotates it: the organ channel of "liver" (label >= 1) is the predicted liver mask, which the
    liver-task head predicts including its tumors and vessels. Masks and label share the input's grid.

    Returns:
        ``{structure name: Dice}`` for the structures the task's source labels (None: both empty).
    """
    import nibabel as nib
    import torch

    from scripts.data.label_mapping import apply_rule

    spec = resolve_task(task)
    label = np.asarray(nib.load(str(label_path)).dataobj)
    scores: Dict[str, Optional[float]] = {}
    for name, channel, _, _ in spec.structures():
        rule = spec.organ_rule if channel == 0 else spec.tumor_rule
        if rule is None:
            continue
        mask_path = Path(output_dir) / f"{case}_{name.replace(' ', '_')}_mask.nii.gz"
        if not mask_path.is_file():
            raise FileNotFoundError(f"{mask_path}: no {name} mask (run the inference with save_masks true)")
        pred = np.asarray(nib.load(str(mask_path)).dataobj) > 0
        if pred.shape != label.shape:
            raise ValueError(f"{mask_path}: shape {pred.shape} differs from the label {label_path} {label.shape}")
        scores[name] = _dice(pred, apply_rule(rule, torch.as_tensor(label)).numpy() > 0)
    return scores


def format_table(summary: Dict[str, Any], held_out: Optional[Dict[str, Any]] = None) -> str:
    """The per-task Dice table (mean over the test cases) and the organ mean the demo is judged by."""
    structures = summary.get("structures", {})
    lines = [f"{'task':<16}{'organ Dice':>12}{'tumor Dice':>12}{'cases':>7}"]
    organ_means: List[float] = []
    for spec in TASKS:
        cells, cases = [], 0
        for labeled, name in ((spec.labels_organ, spec.organ_name), (spec.labels_tumor, spec.tumor_name)):
            entry = structures.get(name) if labeled else None
            value = None if entry is None else entry.get("dice_mean")
            cases = max(cases, 0 if entry is None else int(entry.get("cases", 0)))
            cells.append("unlabeled" if not labeled else ("n/a" if value is None else f"{value:.3f}"))
            if labeled and name == spec.organ_name and value is not None:
                organ_means.append(float(value))
        lines.append(f"{spec.display:<16}{cells[0]:>12}{cells[1]:>12}{cases:>7}")
    organ = float(np.mean(organ_means)) if organ_means else float("nan")
    t6 = summary.get("table6_average", {}).get("dice")
    lines.append(f"organ Dice averaged over the {len(organ_means)} tasks with organ labels: {organ:.3f}")
    if t6 is not None:
        classes = summary["table6_average"].get("dice_classes")
        lines.append(f"mean Dice over the {classes} organ/tumor classes (Table 6 style): {t6:.3f}")
    if held_out and "dice" in held_out:
        scores = ", ".join(f"{k} {('n/a' if v is None else f'{v:.3f}')}" for k, v in held_out["dice"].items())
        lines.append(f"held-out inference ({held_out['case']}, task {held_out['task']}, all 7 tasks run): {scores}")
    elif held_out:
        lines.append(f"held-out inference ({held_out['case']}) FAILED: {held_out.get('error')}")
    return "\n".join(lines)


def organ_mean_dice(summary: Dict[str, Any]) -> float:
    """Organ Dice averaged over the tasks whose source labels the organ (liver, kidney, hepatic vessel,
    pancreas, spleen)."""
    values = [
        summary["structures"][s.organ_name]["dice_mean"]
        for s in TASKS
        if s.labels_organ and summary.get("structures", {}).get(s.organ_name, {}).get("dice_mean") is not None
    ]
    return float(np.mean(values)) if values else float("nan")


def run_demo(
    output_dir: str = "demo_output",
    num_per_task: int = DEMO_DEFAULTS["num_per_task"],
    num_val_per_task: int = DEMO_DEFAULTS["num_val_per_task"],
    num_test_per_task: int = DEMO_DEFAULTS["num_test_per_task"],
    epochs: int = DEMO_DEFAULTS["epochs"],
    base_channels: int = DEMO_DEFAULTS["base_channels"],
    patch_size: Sequence[int] = DEMO_DEFAULTS["patch_size"],
    batch_size: int = DEMO_DEFAULTS["batch_size"],
    learning_rate: float = DEMO_DEFAULTS["learning_rate"],
    weight_std: bool = DEMO_DEFAULTS["weight_std"],
    preseg_channels: int = DEMO_DEFAULTS["preseg_channels"],
    head_width: int = DEMO_DEFAULTS["head_width"],
    norm_groups: int = DEMO_DEFAULTS["norm_groups"],
    threads: Optional[int] = None,
    seed: int = 0,
    val_interval: Optional[int] = None,
    fresh: bool = True,
    infer: bool = True,
) -> Dict[str, Any]:
    """Run the whole demo and return its results (also written to ``output_dir/demo_result.json``).

    Args:
        output_dir: working folder (data cache, checkpoints, evaluation, inference output).
        num_per_task: MOTS-synth training volumes per task.
        num_val_per_task: validation volumes per task (they pick the best checkpoint).
        num_test_per_task: held-out test volumes per task (the Dice table).
        epochs: training epochs (one pass over the 7 * num_per_task volumes each).
        base_channels: DoDNet width (32 in the paper; 8 here).
        patch_size: training patch (whole volume) and sliding-window size, divisible by 16.
        batch_size: training batch size.
        learning_rate: Adam learning rate (poly decay over ``epochs``, as train.json).
        weight_std: weight-standardized convolutions (the paper's choice).
        preseg_channels, head_width: the dynamic head's input and hidden widths (8 and 8 in the paper);
            16 lets the short run separate the tasks' heads sooner (measured on MOTS-synth).
        norm_groups: GroupNorm groups (16 in the paper at width 32, i.e. 2 channels per group at the first
            level); 4 keeps that ratio at width 8 instead of normalizing every channel on its own.
        threads: torch CPU threads (default: torch's choice; 1 is faster when other jobs share the cores).
        seed: MOTS-synth seed.
        val_interval: validate every N epochs (default: 4 times per run).
        fresh: start training from scratch (delete ``output_dir/models``); False resumes a killed run.
        infer: run configs/inference.json on one held-out volume.

    Returns:
        ``{"times_s", "summary", "organ_mean_dice", "held_out", "datalist", "settings", "load_average"}``
        (``datalist``: the MOTS-synth datalist used, relative to ``output_dir``).
    """
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    out = Path(output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir, eval_dir, infer_dir = out / "models", out / "eval", out / "inference"
    if fresh:
        for folder in (ckpt_dir, eval_dir, infer_dir):
            shutil.rmtree(folder, ignore_errors=True)
    times: Dict[str, float] = {}
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    start = time.time()

    print(
        f"[1/4] MOTS-synth: {num_per_task} training, {num_val_per_task} validation and {num_test_per_task} test "
        "volumes per task ...",
        flush=True,
    )
    datalist = ensure_mots_synth(
        out / "data",
        num_per_task=num_per_task,
        seed=seed,
        num_val_per_task=num_val_per_task,
        num_test_per_task=num_test_per_task,
    )
    times["generate"] = time.time() - start

    steps_per_epoch = int(np.ceil(7 * num_per_task / batch_size))
    print(
        f"[2/4] training DoDNet (width {base_channels}) for {epochs} epochs x {steps_per_epoch} iterations "
        "with configs/train.json ...",
        flush=True,
    )
    t0 = time.time()
    common = {
        **_network_overrides(base_channels, patch_size, weight_std, preseg_channels, head_width, norm_groups),
        "datalist": str(datalist),
        "dataset_dir": "",
    }
    train_overrides = {
        **common,
        "ckpt_dir": str(ckpt_dir),
        "output_dir": str(out / "train_logs"),
        "epochs": int(epochs),
        "val_interval": int(val_interval or max(1, epochs // 4)),
        "batch_size": int(batch_size),
        "num_workers": 0,
        "cache_rate": 1.0,
        "learning_rate": float(learning_rate),
        "amp": True,
        "resume": not fresh,
        "train#augmentations": [],
        "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": "@learning_rate"},
    }
    _workflow(["train.json"], "train", train_overrides)
    times["train"] = time.time() - t0

    print("[3/4] evaluating on the held-out test split with configs/evaluate.json ...", flush=True)
    t0 = time.time()
    eval_overrides = {
        **common,
        "ckpt_dir": str(ckpt_dir),
        "output_dir": str(eval_dir),
        "num_workers": 0,
        "amp": True,
    }
    _workflow(["train.json", "evaluate.json"], None, eval_overrides)
    summary = json.loads((eval_dir / "summary.json").read_text())
    times["evaluate"] = time.time() - t0

    held_out: Optional[Dict[str, Any]] = None
    if infer:
        test_items = json.loads(Path(datalist).read_text())["test"]
        item = test_items[0]
        image = Path(datalist).parent / item["image"]
        print(f"[4/4] inference with configs/inference.json on held-out {image.name} (all tasks) ...", flush=True)
        t0 = time.time()
        infer_overrides = {
            **_network_overrides(base_channels, patch_size, weight_std, preseg_channels, head_width, norm_groups),
            "input": str(image),
            "output_dir": str(infer_dir),
            "ckpt_path": str(ckpt_dir / "model.pt"),
            "progress": False,
            "save_masks": True,
        }
        held_out = {"case": image.name, "task": item["task"]}
        try:  # the evaluation results above are kept whatever happens here
            _workflow(["inference.json"], None, infer_overrides)
            segs = sorted(infer_dir.rglob("*_seg.nii.gz"))
            if not segs:
                raise RuntimeError(f"inference wrote no *_seg.nii.gz under {infer_dir}")
            held_out["label_map"] = str(segs[0])
            case = segs[0].name[: -len("_seg.nii.gz")]
            held_out["dice"] = score_structure_masks(
                infer_dir, case, Path(datalist).parent / item["label"], item["task"]
            )
        except Exception as err:  # noqa: BLE001 - reported, and the run's other results are still printed
            held_out["error"] = f"{type(err).__name__}: {err}"
            logger.error("inference on the held-out case failed: %s", held_out["error"])
        times["infer"] = time.time() - t0
    times["total"] = time.time() - start
    result = {
        "times_s": {k: round(v, 1) for k, v in times.items()},
        "organ_mean_dice": organ_mean_dice(summary),
        "summary": summary,
        "held_out": held_out,
        "datalist": Path(datalist).resolve().relative_to(out.resolve()).as_posix(),
        "settings": {
            "num_per_task": num_per_task,
            "num_val_per_task": num_val_per_task,
            "num_test_per_task": num_test_per_task,
            "epochs": epochs,
            "base_channels": base_channels,
            "patch_size": list(patch_size),
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "weight_std": weight_std,
            "preseg_channels": preseg_channels,
            "head_width": head_width,
            "norm_groups": norm_groups,
            "threads": threads,
            "seed": seed,
        },
        "cpu_count": os.cpu_count(),
        "load_average": {"start": load_start, "end": os.getloadavg() if hasattr(os, "getloadavg") else None},
    }
    write_json_atomic(result, out / "demo_result.json")
    print("\n" + format_table(summary, held_out))
    print(
        "time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
        + f"  ({os.cpu_count()} CPU cores, load average at start {load_start})"
    )
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point ``dodnet-demo`` (fire flags: ``--output_dir``, ``--epochs``, ``--num_per_task`` ...)."""
    import fire

    def demo(**kwargs: Any) -> None:
        run_demo(**kwargs)

    fire.Fire(demo, command=list(sys.argv[1:] if argv is None else argv), name="dodnet-demo")


if __name__ == "__main__":
    main()
