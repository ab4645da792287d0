"""Post-processing of DoDNet's per-task masks and merging into one label map.

Input of this stage: binary masks (2K, H, W, D) of the K requested tasks (channel ``2k`` organ,
``2k + 1`` tumor of the k-th task) from thresholding the inferer's probabilities at 0.5.

- ``TaskPostProcessd`` applies each task's published rule (``TaskSpec.post`` in ``scripts/tasks.py``)
  on the masks' own device (``scripts.inference.components``: scikit-image / MONAI on the CPU, cuCIM or a
  torch labelling on a GPU): keep the largest organ component(s), keep tumor voxels only inside the
  (post-processed) organ, drop tumor components of ``tumor_min_voxels`` voxels or fewer, keep the largest
  tumor component(s). Switchable (``enabled``).
- ``MergeTaskLabelsd`` paints the structures into one uint8 label map with the merged ids of
  ``metadata.json``'s ``channel_def`` (``tasks.merged_label_names()``). Where structures overlap the
  later one in ``tasks.MERGE_PRECEDENCE`` wins: liver, spleen, kidney, pancreas, hepatic vessel,
  then the tumors (hepatic vessel tumor, liver tumor, pancreas tumor, kidney tumor, colon tumor,
  lung tumor); so vessels stay visible inside the liver and tumors on top of organs. The per-task
  masks are kept under ``masks_key`` so overlaps survive for per-structure outputs.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Hashable, Mapping, Optional, Sequence, Union

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.inference.components import keep_largest, remove_up_to, resolve_backend
from scripts.tasks import PostRule, TaskSpec, merge_precedence, resolve_task, resolve_tasks
from scripts.utils import as_bool

__all__ = ["apply_post_rule", "TaskPostProcessd", "merge_task_masks", "MergeTaskLabelsd"]

TaskSelection = Union[None, str, int, Sequence[Union[str, int]]]


def apply_post_rule(
    organ: torch.Tensor, tumor: torch.Tensor, rule: PostRule, connectivity: int = 3, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply one task's published post-processing to its binary organ and tumor masks.

    Args:
        organ: binary mask (1, H, W, D) of the organ channel.
        tumor: binary mask (1, H, W, D) of the tumor channel.
        rule: the task's ``PostRule``.
        connectivity: neighbourhood of connected components (1: faces ... 3: faces, edges, corners).
        backend: the connected-component labelling (``scripts.inference.components.BACKENDS``).

    Returns:
        the post-processed (organ, tumor) masks, same shapes, dtypes and device as the inputs. Dropping
        components of ``tumor_min_voxels`` or fewer counts voxels itself: MONAI's ``RemoveSmallObjects`` passes
        ``min_size`` to scikit-image, whose meaning changed from "smaller than" to "up to" in 0.26.
    """
    if rule.organ_components > 0 and organ.any():
        organ = keep_largest(organ, rule.organ_components, connectivity, backend)
    if tumor.any():
        if rule.tumor_inside_organ:
            tumor = tumor * (organ > 0).to(tumor.dtype)
        if rule.tumor_min_voxels > 0 and tumor.any():
            tumor = remove_up_to(tumor, rule.tumor_min_voxels, connectivity, backend)
        if rule.tumor_components > 0 and tumor.any():
            tumor = keep_largest(tumor, rule.tumor_components, connectivity, backend)
    return organ, tumor


class TaskPostProcessd(MapTransform):
    """Apply the published per-task post-processing to (2K, H, W, D) binary masks.

    Args:
        keys: keys of the masks (channel ``2k`` organ, ``2k + 1`` tumor of the k-th selected task).
        tasks: the task selection the masks were inferred for (same order as the inferer's).
        enabled: False passes the masks through unchanged (switch for the published rules).
        connectivity: neighbourhood of connected components (3 = full 26-neighbourhood).
        task_id_key: if given, each item's masks are (2, H, W, D) for the item's own task, whose id is
            read from this key (as ``MapTaskLabelsd`` writes it); ``tasks`` is then ignored.
        rules: ``{task name: {PostRule field: value}}`` replacing fields of those tasks' published rules (e.g.
            ``{"liver": {"tumor_min_voxels": 5}}`` for small synthetic tumors); unlisted tasks keep theirs.
        backend: connected-component labelling, ``"auto"`` (on the masks' device: scikit-image on the CPU, cuCIM
            or torch on a GPU), ``"skimage"``, ``"cucim"`` or ``"torch"`` (``scripts.inference.components``).
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        tasks: TaskSelection = "all",
        enabled: Union[bool, str] = True,
        connectivity: int = 3,
        task_id_key: Optional[str] = None,
        allow_missing_keys: bool = False,
        rules: Optional[Mapping[str, Mapping[str, object]]] = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        resolve_backend(backend, torch.device("cpu"))  # an unknown name fails here, not at the first case
        self.backend = backend
        self.tasks = resolve_tasks(tasks)
        self.enabled = as_bool(enabled)
        self.connectivity = connectivity
        self.task_id_key = task_id_key
        self.rules: Dict[int, PostRule] = {}
        for name, fields in (rules or {}).items():
            spec = resolve_task(name)
            self.rules[spec.id] = dataclasses.replace(spec.post, **dict(fields))

    def rule(self, task_id: int) -> PostRule:
        """The rule applied to the masks of task ``task_id`` (published unless ``rules`` replaced fields)."""
        return self.rules.get(int(task_id), resolve_task(int(task_id)).post)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> Dict[Hashable, torch.Tensor]:
        d = dict(data)
        if not self.enabled:
            return d
        tasks = self.tasks
        if self.task_id_key is not None:
            tasks = (resolve_task(int(torch.as_tensor(d[self.task_id_key]).reshape(-1)[0])),)
        for key in self.key_iterator(d):
            masks = d[key]
            _check_channels(masks, tasks, key)
            for k, spec in enumerate(tasks):
                organ, tumor = apply_post_rule(
                    masks[2 * k : 2 * k + 1],
                    masks[2 * k + 1 : 2 * k + 2],
                    self.rule(spec.id),
                    self.connectivity,
                    self.backend,
                )
                masks[2 * k : 2 * k + 1] = organ
                masks[2 * k + 1 : 2 * k + 2] = tumor
            d[key] = masks
        return d


def merge_task_masks(masks: torch.Tensor, tasks: Sequence[TaskSpec]) -> torch.Tensor:
    """Paint binary per-task masks into one uint8 label map with the merged ids.

    Args:
        masks: (2K, H, W, D) binary masks of ``tasks`` (organ, tumor per task).
        tasks: the K tasks in channel order.

    Returns:
        (1, H, W, D) uint8 label map; overlaps resolved by ``tasks.MERGE_PRECEDENCE`` (later wins);
        channels a task does not produce (e.g. the colon's organ) are ignored.
    """
    _check_channels(masks, tasks, "masks")
    channel_of = {mid: 2 * k + ch for k, spec in enumerate(tasks) for _, ch, mid, _ in spec.structures()}
    label = torch.zeros((1, *masks.shape[1:]), dtype=torch.uint8, device=masks.device)
    for mid in merge_precedence():
        if mid in channel_of:
            label[masks[channel_of[mid] : channel_of[mid] + 1] > 0] = mid
    return label


class MergeTaskLabelsd(MapTransform):
    """Replace (2K, H, W, D) per-task masks by the merged (1, H, W, D) uint8 label map.

    Args:
        keys: keys of the masks; each is replaced by the label map (metadata kept).
        tasks: the task selection the masks were inferred for.
        masks_key: where the per-task masks are kept ("{key}_{masks_key}" for several keys; None drops them).
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        tasks: TaskSelection = "all",
        masks_key: Optional[str] = "masks",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.tasks = resolve_tasks(tasks)
        self.masks_key = masks_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> Dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        for key in keys:
            masks = d[key]
            label = merge_task_masks(masks, self.tasks)
            if isinstance(masks, MetaTensor):
                label = MetaTensor(label, meta=masks.meta, applied_operations=masks.applied_operations)
            if self.masks_key:
                d[self.masks_key if len(keys) == 1 else f"{key}_{self.masks_key}"] = masks
            d[key] = label
        return d


def _check_channels(masks: torch.Tensor, tasks: Sequence[TaskSpec], key: Hashable) -> None:
    if masks.dim() != 4 or masks.shape[0] != 2 * len(tasks):
        raise ValueError(
            f"{key!s}: expected (2K, H, W, D) masks with 2K = {2 * len(tasks)} channels for tasks "
            f"{[t.name for t in tasks]}, got shape {tuple(masks.shape)}"
        )
