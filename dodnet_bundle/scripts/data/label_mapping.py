"""Map each source dataset's label values to DoDNet's 2-channel (organ, tumor) target.

Every MOTS source labels only its own organ and tumor, and some label only one of the two
(colon and lung: tumor only; spleen: organ only). ``MapTaskLabelsd`` reads the item's task,
applies the task's ``organ_rule`` / ``tumor_rule`` from ``scripts.tasks.TASKS`` and fills a
channel the source does not label with ``UNLABELED`` (-1), which ``PartialLabelDiceBCELoss`` and
the validation metric ignore.
"""

from __future__ import annotations

from typing import Any, Dict, Hashable, Mapping, Optional

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.tasks import LabelRule, TaskSpec, resolve_task

__all__ = ["UNLABELED", "MapTaskLabelsd", "apply_rule", "label_source_name"]

UNLABELED: float = -1.0
"""Value filling a target channel that the item's source dataset does not label."""


def apply_rule(rule: LabelRule, label: torch.Tensor) -> torch.Tensor:
    """Binary float mask of ``label`` (any shape) under ``rule`` (``label >= min_value`` or ``label == equals``)."""
    return rule.matches(label).to(torch.float32)


def label_source_name(label: Any, fallback: Optional[Any] = None) -> str:
    """The file a label came from (``meta["filename_or_obj"]`` of a MetaTensor), for error messages."""
    if isinstance(label, MetaTensor):
        name = label.meta.get("filename_or_obj")
        if name:
            return str(name)
    return str(fallback) if fallback is not None else "<in-memory label>"


class MapTaskLabelsd(MapTransform):
    """Turn a source label map (1, H, W, D) into the 2-channel float target (2, H, W, D) of its task.

    Channel 0 is the organ, channel 1 the tumor; each is 0/1 where the task's rule defines it and
    ``UNLABELED`` (-1) everywhere when the source does not label that channel. The task's integer id
    is written to ``task_id_key`` (the network's ``task_id`` input).

    Apply it after every crop, pad and spatial augmentation of the source label (those treat the
    source label as an ordinary label map; a -1 channel must not be padded or interpolated).

    Args:
        label_key: key of the source label map, (1, H, W, D), integer values of the task's source set.
        task_key: key of the task (a name such as ``"liver"`` or an id 0-6).
        task_id_key: key to write the task's integer id to.
        check_values: raise ``ValueError`` naming the file when a label value is not one of the task's
            ``source_values`` (e.g. a KiTS label given as spleen).
        allow_missing_keys: don't raise if ``label_key`` is absent (inference data without labels);
            the task id is still written.
        default_task: task (name or id) of items without ``task_key``, e.g. the image/label pairs that
            MONAI Label's training sends; None (default) requires every item to name its task.

    Raises:
        ValueError: unknown task, a label that is not single-channel, or values outside the task's set.
    """

    def __init__(
        self,
        label_key: str = "label",
        task_key: str = "task",
        task_id_key: str = "task_id",
        check_values: bool = True,
        allow_missing_keys: bool = False,
        default_task: Optional[Any] = None,
    ) -> None:
        keys: KeysCollection = [label_key]
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.task_key = task_key
        self.task_id_key = task_id_key
        self.check_values = check_values
        self.default_task = None if default_task in (None, "") else resolve_task(default_task)

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        label = d.get(self.label_key)
        if self.task_key not in d and self.default_task is None:
            raise ValueError(
                f"item of {label_source_name(label)} has no {self.task_key!r} key (the task name or id) "
                "and no default_task is configured"
            )
        try:
            spec = resolve_task(d[self.task_key]) if self.task_key in d else self.default_task
        except ValueError as err:
            raise ValueError(f"{label_source_name(label)}: {err}") from None
        d[self.task_id_key] = spec.id
        for key in self.key_iterator(d):
            d[key] = self.map_label(d[key], spec)
        return d

    def map_label(self, label: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
        """(1, H, W, D) source label -> (2, H, W, D) float32 target of ``spec`` (metadata kept)."""
        name = label_source_name(label)
        if not isinstance(label, torch.Tensor):
            label = MetaTensor(torch.as_tensor(label))
        if label.ndim < 2 or label.shape[0] != 1:
            raise ValueError(f"{name}: label must be single-channel (1, H, W, D), got shape {tuple(label.shape)}")
        if self.check_values:
            allowed = torch.tensor(spec.source_values, dtype=label.dtype, device=label.device)
            bad = ~torch.isin(label.as_tensor() if isinstance(label, MetaTensor) else label, allowed)
            if bool(bad.any()):
                found = sorted({float(v) for v in torch.unique(label[bad]).tolist()})
                shown = ", ".join(f"{v:g}" for v in found[:10]) + (" ..." if len(found) > 10 else "")
                raise ValueError(
                    f"{name}: label values {{{shown}}} are not in the {spec.name} task's source label set "
                    f"{set(spec.source_values)} ({spec.source}); check the item's task or the label file"
                )
        channels = []
        for rule in (spec.organ_rule, spec.tumor_rule):
            if rule is None:
                channels.append(torch.full_like(label, UNLABELED, dtype=torch.float32))
            else:
                channels.append(apply_rule(rule, label))
        return torch.cat(channels, dim=0)
