"""Fine-tuning a trained DoDNet: add a new task, or transfer the encoder-decoder to a multi-class task.

Two scenarios (the paper's Sec. 4.4 and beyond), each used by a config merged on ``configs/train.json``:

- ``configs/finetune_new_task.json``: the controller's task input grows by one. Its ``fc`` layer maps
  ``cat(pooled features (F), one-hot (K))`` to the dynamic head's parameters, so the new task's one-hot
  position is a new LAST input column. ``expand_task_checkpoint`` appends that column (zeros, or a copy
  of an existing task's column); for every existing task the new one-hot entry is 0, so their outputs
  are exactly those of the trained network until training changes the weights.
  ``NewTaskLabelsd`` and ``load_new_task_datalist`` let items of the new task (a name that is not in
  ``scripts.tasks.TASKS``) flow through the usual label mapping and datalist checks.
- ``configs/finetune_multiclass.json``: ``DoDNetSegmenter`` keeps DoDNet's encoder-decoder (same module
  names under ``backbone.``) and replaces the 8-channel pre-segmentation conv by a 1x1x1 conv to
  ``out_channels`` classes (BCV: 13 organs + background, softmax Dice-CE); ``load_backbone_weights``
  initialises it from a DoDNet checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from scripts.data.label_mapping import MapTaskLabelsd
from scripts.networks.weights import read_state_dict
from scripts.tasks import NUM_TASKS, TASKS, LabelRule, PostRule, TaskSpec, resolve_task

__all__ = [
    "controller_task_columns",
    "expand_task_checkpoint",
    "load_pretrained_dodnet",
    "new_task_spec",
    "NewTaskLabelsd",
    "load_new_task_datalist",
    "load_backbone_weights",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
CONTROLLER_KEY = "controller.fc"
FEATURES_KEY = "backbone.GAP.0.weight"


def controller_task_columns(state: Mapping[str, torch.Tensor]) -> Tuple[int, int]:
    """``(first one-hot column, number of tasks)`` of the controller in a DoDNet state dict.

    The controller input is ``cat(features, one_hot)`` ("dodnet") or ``one_hot`` alone ("task");
    a Cond-NO ("image") controller has no task input and cannot grow.
    """
    weight = state.get(f"{CONTROLLER_KEY}.weight")
    if weight is None or FEATURES_KEY not in state:
        raise ValueError(f"not a DoDNet state dict: no {CONTROLLER_KEY}.weight or {FEATURES_KEY}")
    in_features, feature_width = int(weight.shape[1]), int(state[FEATURES_KEY].shape[0])
    if in_features == feature_width:
        raise ValueError("the checkpoint's controller has no task input (conditioning='image', Cond-NO)")
    if in_features > feature_width:
        return feature_width, in_features - feature_width
    return 0, in_features


def expand_task_checkpoint(
    checkpoint: Union[PathLike, Mapping[str, Any]],
    num_new_tasks: int = 1,
    init_like: Union[None, str, int] = None,
) -> Dict[str, torch.Tensor]:
    """A DoDNet state dict whose controller accepts ``num_new_tasks`` more tasks.

    The controller weight (P, F + K) gets ``num_new_tasks`` new last columns: zeros (the new task starts
    from the image-conditioned mean head), or copies of task ``init_like``'s column (the new task starts
    as that task). Existing tasks' outputs are unchanged, since their one-hot is 0 at the new positions.

    Args:
        checkpoint: a checkpoint path or state dict of a DoDNet with K tasks.
        num_new_tasks: how many tasks to add (>= 1).
        init_like: an existing task (name or id) whose column initialises the new ones; None: zeros.

    Returns:
        the state dict for ``DoDNet(num_tasks=K + num_new_tasks, ...)``.
    """
    if int(num_new_tasks) != num_new_tasks or num_new_tasks < 1:
        raise ValueError(f"num_new_tasks must be a positive integer, got {num_new_tasks!r}")
    state = dict(read_state_dict(checkpoint))
    first, num_tasks = controller_task_columns(state)
    weight = state[f"{CONTROLLER_KEY}.weight"]
    if init_like is None:
        extra = weight.new_zeros(weight.shape[0], int(num_new_tasks))
    else:
        index = resolve_task(init_like).id
        if index >= num_tasks:
            raise ValueError(f"init_like task id {index} is not one of the checkpoint's {num_tasks} tasks")
        extra = weight[:, first + index : first + index + 1].repeat(1, int(num_new_tasks))
    state[f"{CONTROLLER_KEY}.weight"] = torch.cat([weight, extra], dim=1)
    return state


def load_pretrained_dodnet(
    network: nn.Module, ckpt_path: PathLike, init_like: Union[None, str, int] = None, freeze_backbone: bool = False
) -> nn.Module:
    """Load a trained DoDNet checkpoint into ``network``, expanding the controller if it has more tasks.

    Args:
        network: a ``DoDNet`` with ``num_tasks`` >= the checkpoint's task count (same widths).
        ckpt_path: the trained checkpoint (e.g. ``models/model.pt``).
        init_like: see ``expand_task_checkpoint``.
        freeze_backbone: keep the encoder-decoder fixed (only the controller and head train).

    Returns:
        ``network`` with the weights loaded (strictly: any other mismatch is an error).
    """
    state = read_state_dict(ckpt_path)
    _, old_tasks = controller_task_columns(state)
    grow = int(network.num_tasks) - old_tasks
    if grow < 0:
        raise ValueError(f"{ckpt_path}: the checkpoint has {old_tasks} tasks, the network only {network.num_tasks}")
    if grow:
        state = expand_task_checkpoint(state, grow, init_like)
        logger.info("%s: controller expanded from %d to %d tasks", ckpt_path, old_tasks, network.num_tasks)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{ckpt_path}: does not fit the network definition ({err})") from None
    if freeze_backbone:
        for p in network.backbone.parameters():
            p.requires_grad_(False)
    return network


def new_task_spec(
    name: str,
    labels_organ: bool = True,
    labels_tumor: bool = True,
    task_id: Optional[int] = None,
    display: Optional[str] = None,
) -> TaskSpec:
    """A task outside the seven MOTS tasks, with the common convention 0 background, 1 organ, 2 tumor.

    Args:
        name: the task's name (used as the ``task`` of its datalist items); must not be a MOTS task.
        labels_organ / labels_tumor: which channels its labels annotate (organ ``>= 1``, tumor ``== 2``;
            organ only: ``== 1``; tumor only: ``== 1``).
        task_id: its one-hot position (default: right after the seven MOTS tasks).
    """
    key = name.strip().lower().replace(" ", "_")
    if any(t.name == key for t in TASKS):
        raise ValueError(f"{name!r} is already a MOTS task; pick a new name")
    if not (labels_organ or labels_tumor):
        raise ValueError("a task must label its organ, its tumor or both")
    if labels_organ and labels_tumor:
        organ, tumor, values = LabelRule(min_value=1), LabelRule(equals=2), (0, 1, 2)
    else:
        organ = LabelRule(equals=1) if labels_organ else None
        tumor = LabelRule(equals=1) if labels_tumor else None
        values = (0, 1)
    return TaskSpec(
        NUM_TASKS if task_id is None else int(task_id), key, display or name, "fine-tuning data", values,
        organ, tumor, None, None, None, None, PostRule(), 0, 0,
    )  # fmt: skip


def _resolve(task: Any, new_task: TaskSpec) -> TaskSpec:
    if str(task).strip().lower().replace(" ", "_") in (new_task.name, str(new_task.id)) or task == new_task.id:
        return new_task
    return resolve_task(task)


class NewTaskLabelsd(MapTaskLabelsd):
    """``MapTaskLabelsd`` that also knows one new task (a ``new_task_spec``); MOTS tasks map as before."""

    def __init__(self, new_task: TaskSpec, label_key: str = "label", task_key: str = "task", **kwargs: Any) -> None:
        super().__init__(label_key=label_key, task_key=task_key, **kwargs)
        self.new_task = new_task

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        if self.task_key not in d:
            return super().__call__(d)
        spec = _resolve(d[self.task_key], self.new_task)
        d[self.task_id_key] = spec.id
        for key in self.key_iterator(d):
            d[key] = self.map_label(d[key], spec)
        return d


def load_new_task_datalist(
    datalist: PathLike,
    new_task: TaskSpec,
    dataset_dir: Optional[PathLike] = None,
    split: str = "training",
) -> List[Dict[str, Any]]:
    """One split of a fine-tuning datalist whose items may use ``new_task``'s name as their task.

    Paths are relative to ``dataset_dir`` (or, when it is empty, to the datalist's folder). Every item
    is checked (image and label files exist, the task is the new task or a MOTS task) and all problems
    are reported in one ``ValueError`` before training starts.

    Returns:
        items with absolute ``image``/``label`` paths and the canonical task name.
    """
    path = Path(datalist)
    if not path.is_file():
        raise ValueError(f"datalist {path} does not exist")
    try:
        items = json.loads(path.read_text())[split]
    except (ValueError, KeyError) as err:
        raise ValueError(f"{path}: not a JSON datalist with a {split!r} list ({err})") from None
    base = Path(dataset_dir) if dataset_dir not in (None, "") else path.parent
    out, problems = [], []
    for i, item in enumerate(items):
        where = f"{path} [{split}][{i}]"
        try:
            spec = _resolve(item["task"], new_task)
        except (KeyError, ValueError) as err:
            problems.append(f"{where}: bad or missing task ({err})")
            continue
        resolved = dict(item, task=spec.name)
        for key in ("image", "label"):
            file = Path(item.get(key, ""))
            file = file if file.is_absolute() else base / file
            if not item.get(key) or not file.is_file():
                problems.append(f"{where}: {key} file {file} does not exist")
            resolved[key] = str(file)
        out.append(resolved)
    if not items:
        problems.append(f"{path}: the {split!r} list is empty")
    if problems:
        raise ValueError("bad fine-tuning datalist:\n" + "\n".join(problems))
    return out


def load_backbone_weights(
    network: nn.Module, ckpt_path: PathLike, skip: Sequence[str] = ("backbone.precls_conv.2.",)
) -> nn.Module:
    """Copy a DoDNet checkpoint's encoder-decoder (``backbone.*``) into ``network`` (e.g. ``DoDNetSegmenter``).

    Every ``backbone.*`` tensor of ``network`` except those under ``skip`` (the new output conv) must be in
    the checkpoint with the same shape; the checkpoint's controller and head are ignored.

    Returns:
        ``network`` with the backbone weights loaded.
    """
    state = read_state_dict(ckpt_path)
    own = network.state_dict()
    wanted = [k for k in own if k.startswith("backbone.") and not any(k.startswith(s) for s in skip)]
    missing = [k for k in wanted if k not in state]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in wanted
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or mismatched:
        raise ValueError(
            f"{ckpt_path}: encoder-decoder weights do not fit the network (different widths/blocks?): "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, shape mismatch {mismatched[:5]}"
        )
    network.load_state_dict({k: state[k] for k in wanted}, strict=False)
    logger.info("%s: loaded %d encoder-decoder tensors", ckpt_path, len(wanted))
    return network
