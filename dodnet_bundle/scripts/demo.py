"""The main job on the embedded default: MOTS-synth -> train a reduced-width DoDNet -> evaluate -> infer.

``bash dev.sh demo`` (console script ``dodnet-demo``) runs, through the bundle's own configs:

1. ``scripts.data.synth.ensure_mots_synth``: the synthetic partially labeled data set (generated once, by
   ``synth_workers`` processes);
2. ``configs/train.json`` + ``configs/demo.json``: a DoDNet of width 8 (GroupNorm groups scaled to the
   width, the controller's ``task_heads`` initialization) trained at 0.8 x 0.8 x 1.5 mm on random 48 x 48 x 32
   patches of the 64 x 64 x 32 volumes with Adam and Dice + 0.3 BCE, without spatial augmentation (left-right
   flips would swap the liver and spleen sides of the phantom; the published augmentations stay in
   train.json);
3. ``configs/train.json`` + ``configs/evaluate.json`` + ``configs/demo.json``: Dice per task and
   structure on the held-out test split (``summary.json``, ``metrics.csv``);
4. ``configs/inference.json`` with demo.json's network, window and voxel spacing: all seven tasks on one
   held-out volume, written as a merged label map and per-structure masks in the input's geometry, the
   masks scored against that volume's own-task label;

and prints the per-task Dice table with the time of each step. Evaluation and inference use demo.json's
``post_rules`` (``RuleTaskPostProcessd``): the published 50-voxel minimum tumor size is meant for real CT
and would remove most of MOTS-synth's small tumors. Everything goes to ``output_dir``; the console shows
one progress bar per step and the validation lines, the full log is ``output_dir/demo.log``.

The training step is the bundle run (from ``dodnet_bundle/``)::

    python -m monai.bundle run --config_file "['configs/train.json','configs/demo.json']" \\
        --synth_dir demo_output/data --ckpt_dir demo_output/models --output_dir demo_output/train_logs

and the command line flags override demo.json's values, e.g. ``dodnet-demo --epochs 10 --threads 1``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from scripts import ignore_library_noise
from scripts.cli_errors import UsageError, fire_call, run_cli
from scripts.data.synth import SYNTH_VERSION, ensure_mots_synth
from scripts.inference.postprocessing import TaskPostProcessd
from scripts.networks.acceleration import cpu_name
from scripts.networks.dodnet import contrast_kernels
from scripts.tasks import TASKS, resolve_task
from scripts.utils import BUNDLE_ROOT, as_bool, write_json_atomic

__all__ = [
    "DEMO_CONFIG",
    "DEMO_DEFAULTS",
    "FLAG_IDS",
    "DemoFlagError",
    "INFERENCE_ARGS",
    "RuleTaskPostProcessd",
    "demo_inference_overrides",
    "demo_overrides",
    "demo_settings",
    "finished_run",
    "run_demo",
    "format_table",
    "organ_mean_dice",
    "tumor_mean_dice",
    "score_structure_masks",
    "main",
]

logger = logging.getLogger("dodnet.demo")

DEMO_CONFIG: Path = BUNDLE_ROOT / "configs" / "demo.json"
"""The demo's training recipe, merged on ``configs/train.json``."""

FLAG_IDS: Dict[str, str] = {
    "num_per_task": "synth_options#num_per_task",
    "num_val_per_task": "synth_options#num_val_per_task",
    "num_test_per_task": "synth_options#num_test_per_task",
    "seed": "synth_options#seed",
    "synth_workers": "synth_options#workers",
    "epochs": "epochs",
    "val_interval": "val_interval",
    "base_channels": "network_def#base_channels",
    "patch_size": "patch_size",
    "pixdim": "pixdim",
    "batch_size": "batch_size",
    "learning_rate": "learning_rate",
    "weight_std": "network_def#weight_std",
    "preseg_channels": "network_def#preseg_channels",
    "head_width": "network_def#head_width",
    "norm_groups": "network_def#norm_groups",
    "image_to_head": "network_def#image_to_head",
    "contrast_to_head": "network_def#contrast_to_head",
    "deep_supervision": "deep_supervision",
}
"""``dodnet-demo`` flag -> the config id of train.json + demo.json it overrides."""

NETWORK_IDS = ("patch_size", "pixdim") + tuple(i for i in FLAG_IDS.values() if i.startswith("network_def#"))
"""The ids inference.json needs from demo.json: the window, the voxel spacing of training, the network."""
INFERENCE_ARGS = "demo_inference.json"
"""Written into the output folder after training: inference.json's overrides for the trained network, its weights
and the demo's post-processing (``dodnet-segment --args_file``, ``monai.bundle run --args_file``)."""


def _demo_json() -> Dict[str, Any]:
    return json.loads(DEMO_CONFIG.read_text())


def _raw_value(config: Mapping[str, Any], config_id: str) -> Any:
    """demo.json's literal value of ``config_id`` (a ``#``-key of its own or a path into a nested dict)."""
    if config_id in config:
        return config[config_id]
    value: Any = config
    for part in config_id.split("#"):
        value = value[part]
    return value


DEMO_DEFAULTS: Dict[str, Any] = {flag: _raw_value(_demo_json(), cid) for flag, cid in FLAG_IDS.items()}
"""The demo's settings as demo.json gives them, by ``dodnet-demo`` flag."""


class DemoFlagError(UsageError):
    """A ``dodnet-demo`` flag with a value the demo cannot use (``main`` prints it as one line)."""


def _three_positive(flag: str, value: Any, cast: Callable[[Any], Any]) -> List[Any]:
    """``value`` as a list of three positive ``cast`` numbers (a voxel size or a window), else ``DemoFlagError``."""
    try:
        out = [cast(v) for v in value]
    except (TypeError, ValueError):
        out = []
    if len(out) != 3 or min(out) <= 0:
        raise DemoFlagError(f"--{flag} {value!r}: expected three positive numbers, e.g. {DEMO_DEFAULTS[flag]}")
    return out


def demo_overrides(**flags: Any) -> Dict[str, Any]:
    """Config overrides (id -> value) of the given ``dodnet-demo`` flags; None values are left out."""
    unknown = sorted(set(flags) - set(FLAG_IDS))
    if unknown:
        raise TypeError(f"unknown demo settings {unknown}; known: {sorted(FLAG_IDS)}")
    out: Dict[str, Any] = {}
    for flag, value in flags.items():
        if value is None:
            continue
        if flag in ("patch_size", "pixdim"):
            value = _three_positive(flag, value, int if flag == "patch_size" else float)
        elif flag == "learning_rate":
            value = float(value)
        elif flag == "contrast_to_head":
            try:
                value = contrast_kernels(value)  # fire passes "--contrast_to_head 3,7" as a tuple, "[]" as a list
            except ValueError:
                raise DemoFlagError(f"--contrast_to_head {value!r}: expected odd box sizes >= 3, e.g. 3,7") from None
        elif flag in ("weight_std", "image_to_head"):
            try:
                value = as_bool(value)  # fire passes --image_to_head false as the string "false"
            except ValueError:
                raise DemoFlagError(f"--{flag} {value!r}: expected true or false") from None
        else:
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise DemoFlagError(f"--{flag} {value!r}: expected an integer") from None
            if flag == "deep_supervision" and not 0 <= value <= 3:
                raise DemoFlagError(f"--deep_supervision {value}: expected 0-3 decoder levels (1/2, 1/4, 1/8)")
        out[FLAG_IDS[flag]] = value
    return out


def _parser(config_files: Sequence[str], overrides: Mapping[str, Any]) -> Any:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / f) for f in config_files])
    parser.update(dict(overrides))
    return parser


def demo_settings(overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The demo's settings (by flag name) from train.json + demo.json with ``overrides`` (config ids)."""
    parser = _parser(["train.json", "demo.json"], overrides or {})
    settings = {flag: parser.get_parsed_content(cid) for flag, cid in FLAG_IDS.items()}
    settings["patch_size"] = [int(p) for p in settings["patch_size"]]
    settings["steps_per_epoch"] = int(np.ceil(len(TASKS) * settings["num_per_task"] / settings["batch_size"]))
    settings["optimizer"] = parser.get("optimizer#_target_")
    settings["augmentations"] = len(parser.get("train#augmentations"))
    settings["post_rules"] = parser.get("post_rules", {})
    return settings


class RuleTaskPostProcessd(TaskPostProcessd):
    """``scripts.inference.TaskPostProcessd`` with the demo's ``post_rules`` (its ``rules`` argument): the name
    the demo's evaluation and inference overrides point at, so a reader of the overrides sees the demo's rules.

    Args:
        rules: ``{task name: {PostRule field: value}}`` (e.g. ``{"liver": {"tumor_min_voxels": 5}}``);
            tasks not listed keep their published rule (``scripts/tasks.py``).
        kwargs: ``TaskPostProcessd``'s other arguments (``keys``, ``tasks``, ``enabled``, ``task_id_key`` ...).
    """


def demo_inference_overrides(
    ckpt_path: Union[str, os.PathLike], overrides: Optional[Mapping[str, Any]] = None
) -> Dict[str, Any]:
    """Overrides of ``configs/inference.json`` that run the demo's network (``ckpt_path``) with its post_rules.

    ``overrides`` are the demo's own (config ids of train.json + demo.json, ``demo_overrides``); the caller adds
    ``input`` and ``output_dir``.
    """
    train_parser = _parser(["train.json", "demo.json"], overrides or {})
    return {
        **{cid: train_parser.get_parsed_content(cid) for cid in NETWORK_IDS},
        **_post_rule_overrides("inference.json", train_parser.get("post_rules", {})),
        "bundle_root": str(BUNDLE_ROOT),
        "ckpt_path": str(ckpt_path),
    }


def finished_run(output_dir: Union[str, os.PathLike]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """A finished demo run's ``demo_result.json`` and the overrides of the flags it ran with (``demo_overrides``, so
    that train.json + demo.json rebuild its network and recipe, and ``demo_inference_overrides`` its inference).

    Raises:
        FileNotFoundError: (one line) ``output_dir`` has no ``demo_result.json`` or no ``models/model.pt``.
    """
    out = Path(output_dir)
    if not (out / "demo_result.json").is_file() or not (out / "models" / "model.pt").is_file():
        raise FileNotFoundError(
            f"{out}: no finished demo run (demo_result.json and models/model.pt); run `bash dev.sh demo`"
        )
    result = json.loads((out / "demo_result.json").read_text())
    return result, demo_overrides(**{flag: v for flag, v in result["settings"].items() if flag in FLAG_IDS})


def _post_rule_overrides(config_file: str, rules: Mapping[str, Any]) -> Dict[str, Any]:
    """Overrides that make ``config_file``'s ``TaskPostProcessd`` components apply ``rules``."""
    config = json.loads((BUNDLE_ROOT / "configs" / config_file).read_text())
    out: Dict[str, Any] = {}

    def visit(node: Any, path: List[str]) -> None:
        if isinstance(node, dict):
            if node.get("_target_") == "scripts.inference.TaskPostProcessd":
                out["#".join(path + ["_target_"])] = "scripts.demo.RuleTaskPostProcessd"
                out["#".join(path + ["rules"])] = dict(rules)
            for k, v in node.items():
                visit(v, path + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                visit(v, path + [str(i)])

    visit(config, [])
    if not out:
        raise RuntimeError(f"configs/{config_file} has no scripts.inference.TaskPostProcessd to apply post_rules to")
    return out


# ----------------------------------------------------------------------------------------------
# console: logs to a file, one progress bar per step
# ----------------------------------------------------------------------------------------------


_SELF_PRINTING_LOGGERS = ("monai.handlers.StatsHandler",)
"""Loggers MONAI creates with their own stdout handler (``monai.apps.get_logger``) when first used."""


@contextmanager
def _log_to_file(path: Path) -> Iterator[None]:
    """Send every log record (root and the MONAI loggers that print themselves) and warnings to ``path``."""
    import ignite.engine  # noqa: F401 - their loggers exist before they are redirected
    import monai.bundle  # noqa: F401

    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    root.handlers, root.level = [handler], logging.INFO
    for name in _SELF_PRINTING_LOGGERS:  # created now, MONAI's get_logger adds no stdout handler later
        logging.getLogger(name)
    saved: List[tuple] = []
    for obj in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(obj, logging.Logger) and (obj.handlers or obj.name in _SELF_PRINTING_LOGGERS):
            saved.append((obj, obj.handlers[:], obj.propagate))
            obj.handlers, obj.propagate = [handler], False  # get_logger resets propagate: own handler
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            ignore_library_noise()  # after "default", which would let ITK's and nvImageCodec's warnings through
            yield
    finally:
        logging.captureWarnings(False)
        for obj, handlers, propagate in saved:
            obj.handlers, obj.propagate = handlers, propagate
        root.handlers, root.level = saved_root
        handler.close()


def _bar(total: int, desc: str, unit: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True, file=sys.stderr)


def _last_loss(output: Any) -> Optional[float]:
    item = output[0] if isinstance(output, (list, tuple)) and output else output
    if isinstance(item, Mapping) and "loss" in item:
        return float(item["loss"])
    return None


def _attach_train_progress(workflow: Any, settings: Mapping[str, Any]) -> Callable[[], None]:
    """One bar over all training iterations (loss, ETA) and a line per validation; returns its closer."""
    from ignite.engine import Events

    trainer = workflow.parser.get_parsed_content("train#trainer")
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    bar = _bar(int(settings["epochs"]) * int(settings["steps_per_epoch"]), "train", "it")

    def started(engine: Any) -> None:
        bar.reset(total=int(engine.state.max_epochs) * int(engine.state.epoch_length))
        bar.update(int(engine.state.iteration))

    def iteration(engine: Any) -> None:
        bar.update(1)
        loss = _last_loss(engine.state.output)
        if loss is not None:
            bar.set_postfix(epoch=f"{engine.state.epoch}/{engine.state.max_epochs}", loss=f"{loss:.3f}")

    def validated(engine: Any) -> None:
        metrics = engine.state.metrics
        organ = [metrics.get(f"val_dice_{s.organ_name.replace(' ', '_')}") for s in TASKS if s.labels_organ]
        tumor = [metrics.get(f"val_dice_{s.tumor_name.replace(' ', '_')}") for s in TASKS if s.labels_tumor]
        organ = [v for v in organ if v is not None]
        tumor = [v for v in tumor if v is not None]
        mean = float(metrics.get("val_mean_dice", float("nan")))
        parts = [f"epoch {trainer.state.epoch}/{trainer.state.max_epochs}: validation Dice {mean:.3f}"]
        if organ:
            parts.append(f"organs {np.mean(organ):.3f}")
        if tumor:
            parts.append(f"tumors {np.mean(tumor):.3f}")
        best = getattr(engine.state, "best_metric", None)
        if best is not None and best > -1:
            parts.append(f"best {best:.3f} (epoch {engine.state.best_metric_epoch})")
        bar.write(", ".join(parts), file=sys.stdout)

    trainer.add_event_handler(Events.STARTED, started)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, iteration)
    evaluator.add_event_handler(Events.COMPLETED, validated)
    return bar.close


def _attach_eval_progress(workflow: Any) -> Callable[[], None]:
    """One bar over the evaluated test cases; returns its closer."""
    from ignite.engine import Events

    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    bar = _bar(len(evaluator.data_loader), "evaluate", "case")
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: bar.update(1))
    return bar.close


def _workflow(
    config_files: Sequence[str],
    workflow_type: Optional[str],
    overrides: Dict[str, Any],
    progress: Optional[Callable[[Any], Callable[[], None]]] = None,
) -> Any:
    """Build, run and finalize a ``monai.bundle.ConfigWorkflow`` of the bundle's configs.

    ``progress(workflow)`` attaches the step's console output after initialization and returns its closer.
    """
    from monai.bundle import ConfigWorkflow

    configs = BUNDLE_ROOT / "configs"
    workflow = ConfigWorkflow(
        config_file=[str(configs / f) for f in config_files],
        meta_file=str(configs / "metadata.json"),
        logging_file=False,  # run_demo has routed the logs to demo.log
        workflow_type=workflow_type,
        **overrides,
    )
    workflow.initialize()
    if workflow_type is not None:
        missing = workflow.check_properties()
        if missing:
            raise RuntimeError(f"{config_files}: missing workflow properties {missing}")
    close = progress(workflow) if progress is not None else None
    try:
        workflow.run()
    finally:
        if close is not None:
            close()
    workflow.finalize()
    return workflow


def _generate(cache_dir: Path, synth_options: Mapping[str, Any]) -> Path:
    """``ensure_mots_synth`` with a progress bar over the volumes written (a reused data set is instant)."""
    counts = [int(synth_options.get(k, 0)) for k in ("num_per_task", "num_val_per_task", "num_test_per_task")]
    folder = f"mots_synth_v{SYNTH_VERSION}_seed{int(synth_options.get('seed', 0))}_{'-'.join(map(str, counts))}"
    labels = Path(cache_dir) / folder / "labels"
    total = len(TASKS) * sum(counts)
    result: Dict[str, Any] = {}

    def target() -> None:
        try:
            result["datalist"] = ensure_mots_synth(cache_dir, **dict(synth_options))
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = err

    thread = threading.Thread(target=target, name="mots-synth", daemon=True)
    bar = _bar(total, "generate", "vol")
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
        done = len(list(labels.glob("*.nii.gz"))) if labels.is_dir() else 0
        bar.update(max(0, min(done, total) - bar.n))
    bar.update(total - bar.n)
    bar.close()
    if "error" in result:
        raise result["error"]
    return Path(result["datalist"])


# ----------------------------------------------------------------------------------------------
# scores and table
# ----------------------------------------------------------------------------------------------


def score_structure_masks(output_dir: Path, case: str, label_path: Path, task: str) -> Dict[str, Optional[float]]:
    """Dice of the inference's per-structure masks (``<case>_<structure>_mask.nii.gz``, written with
    ``save_masks``) against the case's own-task source label, with ``scripts.evaluation.metrics``.

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
    from scripts.evaluation.metrics import spacing_from_affine, structure_metrics

    spec = resolve_task(task)
    label_image = nib.load(str(label_path))
    label = np.asarray(label_image.dataobj)
    spacing = spacing_from_affine(label_image.affine)
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
        ref = apply_rule(rule, torch.as_tensor(label)).numpy() > 0
        metrics = structure_metrics(pred, ref, spacing)
        scores[name] = None if metrics["status"] == "both_empty" else float(metrics["dice"])
    return scores


def _structure_mean(summary: Mapping[str, Any], names: Sequence[str]) -> float:
    structures = summary.get("structures", {})
    values = [structures[n]["dice_mean"] for n in names if structures.get(n, {}).get("dice_mean") is not None]
    return float(np.mean(values)) if values else float("nan")


def organ_mean_dice(summary: Mapping[str, Any]) -> float:
    """Organ Dice averaged over the tasks whose source labels the organ (liver, kidney, hepatic vessel,
    pancreas, spleen)."""
    return _structure_mean(summary, [s.organ_name for s in TASKS if s.labels_organ])


def tumor_mean_dice(summary: Mapping[str, Any]) -> float:
    """Tumor Dice averaged over the six tumor classes (liver, kidney, hepatic vessel, pancreas, colon, lung)."""
    return _structure_mean(summary, [s.tumor_name for s in TASKS if s.labels_tumor])


def format_table(summary: Dict[str, Any], held_out: Optional[Dict[str, Any]] = None) -> str:
    """The per-task Dice table (mean over the test cases) with the organ and tumor means the demo is judged by."""
    structures = summary.get("structures", {})
    lines = [f"{'task':<16}{'organ Dice':>12}{'tumor Dice':>12}{'cases':>7}"]
    organs, tumors = 0, 0
    for spec in TASKS:
        cells, cases = [], 0
        for labeled, name in ((spec.labels_organ, spec.organ_name), (spec.labels_tumor, spec.tumor_name)):
            entry = structures.get(name) if labeled else None
            value = None if entry is None else entry.get("dice_mean")
            cases = max(cases, 0 if entry is None else int(entry.get("cases", 0)))
            cells.append("unlabeled" if not labeled else ("n/a" if value is None else f"{value:.3f}"))
            if labeled and value is not None:
                organs, tumors = (organs + 1, tumors) if name == spec.organ_name else (organs, tumors + 1)
        lines.append(f"{spec.display:<16}{cells[0]:>12}{cells[1]:>12}{cases:>7}")
    lines.append(f"organ Dice averaged over the {organs} tasks with organ labels: {organ_mean_dice(summary):.3f}")
    lines.append(f"tumor Dice averaged over the {tumors} tumor classes: {tumor_mean_dice(summary):.3f}")
    t6 = summary.get("table6_average", {}).get("dice")
    if t6 is not None:
        classes = summary["table6_average"].get("dice_classes")
        lines.append(f"mean Dice over the {classes} organ/tumor classes (Table 6 style): {t6:.3f}")
    if held_out and "dice" in held_out:
        scores = ", ".join(f"{k} {('n/a' if v is None else f'{v:.3f}')}" for k, v in held_out["dice"].items())
        lines.append(f"held-out inference ({held_out['case']}, task {held_out['task']}, all 7 tasks run): {scores}")
    elif held_out:
        lines.append(f"held-out inference ({held_out['case']}) FAILED: {held_out.get('error')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the demo
# ----------------------------------------------------------------------------------------------


_QUIET_TRAIN = {
    "train#trainer#train_handlers": (
        "$[h for h in @train#handlers if h is not None and not isinstance(h, ignite.handlers.ProgressBar)]"
    ),
    "train#dataset#progress": False,  # CacheDataset's "Loading dataset" bars: caching is part of the train step
    "validate#dataset#progress": False,
}
_QUIET_EVAL = {
    "validate#evaluator#val_handlers": (
        "$[h for h in @validate#handlers if h is not None and not isinstance(h, ignite.handlers.ProgressBar)]"
    ),
}
"""The demo's own console: its bars replace Ignite's (the configs keep theirs for other users)."""


def run_demo(
    output_dir: str = "demo_output",
    num_per_task: Optional[int] = None,
    num_val_per_task: Optional[int] = None,
    num_test_per_task: Optional[int] = None,
    epochs: Optional[int] = None,
    base_channels: Optional[int] = None,
    patch_size: Optional[Sequence[int]] = None,
    pixdim: Optional[Sequence[float]] = None,
    batch_size: Optional[int] = None,
    learning_rate: Optional[float] = None,
    weight_std: Optional[bool] = None,
    preseg_channels: Optional[int] = None,
    head_width: Optional[int] = None,
    norm_groups: Optional[int] = None,
    image_to_head: Optional[bool] = None,
    contrast_to_head: Optional[Sequence[int]] = None,
    deep_supervision: Optional[int] = None,
    threads: Optional[int] = None,
    seed: Optional[int] = None,
    synth_workers: Optional[int] = None,
    val_interval: Optional[int] = None,
    fresh: bool = True,
    infer: bool = True,
) -> Dict[str, Any]:
    """Run the whole demo and return its results (also written to ``output_dir/demo_result.json``).

    Settings left None take ``configs/demo.json``'s values (``DEMO_DEFAULTS``); given ones override them.

    Args:
        output_dir: working folder (data cache, checkpoints, evaluation, inference output, ``demo.log``).
        num_per_task, num_val_per_task, num_test_per_task: MOTS-synth training, validation (they pick
            the best checkpoint) and held-out test (the Dice table) volumes per task.
        epochs: training epochs (one pass over the 7 * num_per_task volumes each).
        base_channels: DoDNet width (32 in the paper).
        patch_size: training patch and sliding-window size, divisible by 16 (demo.json: 48 x 48 x 32).
        pixdim: voxel spacing (mm) of training, evaluation and inference (demo.json: the bundle's 0.8 x 0.8 x 1.5;
            1.05 x 1.05 x 1.5 with ``patch_size`` 48 x 48 x 32 trains faster, at a lower Dice: docs/performance.md).
        batch_size: training batch size.
        learning_rate: Adam learning rate (poly decay over ``epochs``, as train.json; demo.json: 0.0015).
        weight_std: weight-standardized convolutions (the paper's choice).
        preseg_channels, head_width: the dynamic head's input and hidden widths (8 and 8 in the paper);
            16 lets the short run separate the tasks' heads sooner (measured on MOTS-synth).
        norm_groups: GroupNorm groups (16 in the paper at width 32, i.e. 2 channels per group at the first
            level); 4 keeps that ratio at width 8 instead of normalizing every channel on its own.
        image_to_head: the dynamic heads also read the image (DoDNet's option; not in the paper).
        contrast_to_head: box sizes of the image's local-contrast channels the dynamic heads also read (DoDNet's
            option; not in the paper; demo.json: 3 and 7 voxels).
        deep_supervision: decoder levels below full resolution in the training loss (0-3; DoDNet's option).
        threads: torch CPU threads (default: torch's choice; 1 is faster when other jobs share the cores).
        seed: MOTS-synth seed.
        synth_workers: processes generating MOTS-synth (the volumes do not depend on it).
        val_interval: validate every N epochs and after the last one (demo.json: 6 of 11).
        fresh: start training from scratch (delete ``output_dir/models``); False resumes a killed run.
        infer: run configs/inference.json on one held-out volume.

    Returns:
        ``{"times_s", "summary", "organ_mean_dice", "tumor_mean_dice", "held_out", "datalist", "settings",
        "load_average", "log"}`` (``datalist``: the MOTS-synth datalist used, relative to ``output_dir``).
    """
    flags = dict(
        num_per_task=num_per_task,
        num_val_per_task=num_val_per_task,
        num_test_per_task=num_test_per_task,
        seed=seed,
        synth_workers=synth_workers,
        epochs=epochs,
        val_interval=val_interval,
        base_channels=base_channels,
        patch_size=patch_size,
        pixdim=pixdim,
        batch_size=batch_size,
        learning_rate=learning_rate,
        weight_std=weight_std,
        preseg_channels=preseg_channels,
        head_width=head_width,
        norm_groups=norm_groups,
        image_to_head=image_to_head,
        contrast_to_head=contrast_to_head,
        deep_supervision=deep_supervision,
    )
    overrides = demo_overrides(**flags)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    out = Path(output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir, eval_dir, infer_dir = out / "models", out / "eval", out / "inference"
    if fresh:
        for folder in (ckpt_dir, eval_dir, infer_dir):
            shutil.rmtree(folder, ignore_errors=True)
    log_path = out / "demo.log"
    with _log_to_file(log_path):
        result = _run(out, overrides, threads, fresh, infer)
    result["log"] = log_path.name
    write_json_atomic(result, out / "demo_result.json")
    print("\n" + format_table(result["summary"], result["held_out"]))
    print(f"segment a scan with this network: dodnet-segment CT OUTPUT_DIR --args_file {out / INFERENCE_ARGS}")
    times = result["times_s"]
    print(
        "time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
        + f"  ({result['cpu']}, {os.cpu_count()} CPU cores, load average at start {result['load_average']['start']}); "
        + f"full log: {log_path}",
        flush=True,
    )
    return result


def _run(out: Path, overrides: Dict[str, Any], threads: Optional[int], fresh: bool, infer: bool) -> Dict[str, Any]:
    settings = demo_settings(overrides)
    logger.info("demo settings: %s", settings)
    ckpt_dir, eval_dir, infer_dir = out / "models", out / "eval", out / "inference"
    times: Dict[str, float] = {}
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    start = time.time()
    synth_options = {k.split("#", 1)[1]: settings[f] for f, k in FLAG_IDS.items() if k.startswith("synth_options#")}
    print(
        f"[1/4] MOTS-synth: {settings['num_per_task']} training, {settings['num_val_per_task']} validation and "
        f"{settings['num_test_per_task']} test volumes per task",
        flush=True,
    )
    datalist = _generate(out / "data", synth_options)
    times["generate"] = time.time() - start

    print(
        f"[2/4] training DoDNet (width {settings['base_channels']}) for {settings['epochs']} epochs x "
        f"{settings['steps_per_epoch']} iterations with configs/train.json + configs/demo.json",
        flush=True,
    )
    t0 = time.time()
    common = {**overrides, "bundle_root": str(BUNDLE_ROOT), "synth_dir": str(out / "data"), "ckpt_dir": str(ckpt_dir)}
    train_overrides = {**common, **_QUIET_TRAIN, "output_dir": str(out / "train_logs"), "resume": not fresh}
    _workflow(
        ["train.json", "demo.json"],
        "train",
        train_overrides,
        lambda wf: _attach_train_progress(wf, settings),
    )
    times["train"] = time.time() - t0
    network_overrides = demo_inference_overrides(ckpt_dir / "model.pt", overrides)
    # the trained network for dodnet-segment --args_file and monai.bundle run --args_file (bundle_root: theirs)
    write_json_atomic({k: v for k, v in network_overrides.items() if k != "bundle_root"}, out / INFERENCE_ARGS)

    print("[3/4] evaluating the test split with configs/train.json + evaluate.json + demo.json", flush=True)
    t0 = time.time()
    eval_overrides = {
        **common,
        **_QUIET_EVAL,
        **_post_rule_overrides("evaluate.json", settings["post_rules"]),
        "output_dir": str(eval_dir),
    }
    _workflow(["train.json", "evaluate.json", "demo.json"], None, eval_overrides, _attach_eval_progress)
    summary = json.loads((eval_dir / "summary.json").read_text())
    times["evaluate"] = time.time() - t0

    held_out: Optional[Dict[str, Any]] = None
    if infer:
        item = json.loads(Path(datalist).read_text())["test"][0]
        image = Path(datalist).parent / item["image"]
        print(f"[4/4] inference with configs/inference.json on held-out {image.name} (all tasks)", flush=True)
        t0 = time.time()
        infer_overrides = {
            **network_overrides,
            "input": str(image),
            "output_dir": str(infer_dir),
            "progress": True,
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
    return {
        "times_s": {k: round(v, 1) for k, v in times.items()},
        "organ_mean_dice": organ_mean_dice(summary),
        "tumor_mean_dice": tumor_mean_dice(summary),
        "summary": summary,
        "held_out": held_out,
        "datalist": Path(datalist).resolve().relative_to(out.resolve()).as_posix(),
        "settings": {**settings, "threads": threads},
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average": {"start": load_start, "end": os.getloadavg() if hasattr(os, "getloadavg") else None},
    }


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point ``dodnet-demo``: ``run_demo``'s arguments as flags (``--output_dir``, ``--epochs`` ...).

    ``--help`` lists them; an unknown flag or a bad value ends in one line and exit 2 before any work starts.
    """
    run_cli("dodnet-demo", lambda args: fire_call("dodnet-demo", run_demo, args), argv)


if __name__ == "__main__":
    main()
