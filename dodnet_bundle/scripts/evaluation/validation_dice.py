"""Validation Dice per structure for DoDNet's task-conditioned 2-channel outputs.

During validation every case is segmented for its own task only, so each case scores at most the
two structures (organ, tumor) of its task, and only those its source labels. ``TaskDiceMetric``
places each case's scores among the 11 organ/tumor structures of the merged label map
(``scripts.tasks.merged_structures``, the classes of the paper's Table 6) and averages them per
structure and then over structures. ``TaskDiceHandler`` is its Ignite handler; it reads the task
ids from the evaluator's batch (where ``PrepareBatchExtraInput`` found them).
"""

from __future__ import annotations

from typing import Any, Callable, List, Sequence

import torch
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import CumulativeIterationMetric, compute_dice

from scripts.data.label_mapping import UNLABELED
from scripts.tasks import merged_structures

__all__ = ["TaskDiceMetric", "TaskDiceHandler", "structure_metric_names"]


def structure_metric_names(prefix: str = "val_dice") -> List[str]:
    """Metric names of the 11 structures in merged-id order, e.g. ``val_dice_liver_tumor``."""
    return [f"{prefix}_{name.replace(' ', '_')}" for _, name, _, _, _ in merged_structures()]


class TaskDiceMetric(CumulativeIterationMetric):
    """Dice of binarized 2-channel predictions, scattered into the 11 merged structures.

    Scoring follows the project's evaluator: MONAI's ``compute_dice`` per structure; a structure
    empty in both prediction and reference is left out (NaN), one empty on one side only scores 0.

    Call with ``y_pred`` (B, 2, H, W, D) binary (organ, tumor) predictions, ``y`` (B, 2, H, W, D)
    targets with ``UNLABELED`` (-1) filling channels the source does not label, and ``task_id`` (B,).
    Each call buffers a (B, 11) tensor (NaN where a structure is not scored).
    """

    def __init__(self) -> None:
        super().__init__()
        self.structures = merged_structures()

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, task_id: Any = None) -> torch.Tensor:
        if task_id is None:
            raise ValueError("TaskDiceMetric needs the task_id of every sample")
        if y_pred.shape != y.shape or y_pred.dim() < 3 or y_pred.shape[1] != 2:
            raise ValueError(
                f"expected y_pred and y of shape (B, 2, ...), got {tuple(y_pred.shape)} and {tuple(y.shape)}"
            )
        task_id = torch.as_tensor(task_id).reshape(-1)
        if task_id.numel() != y_pred.shape[0]:
            raise ValueError(f"{task_id.numel()} task ids for a batch of {y_pred.shape[0]}")
        scores = torch.full((y_pred.shape[0], len(self.structures)), float("nan"))
        for b in range(y_pred.shape[0]):
            for s, (_, _, spec, channel, _) in enumerate(self.structures):
                if spec.id != int(task_id[b]):
                    continue
                ref = y[b : b + 1, channel : channel + 1]
                if bool((ref <= UNLABELED).all()):
                    continue
                pred = (y_pred[b : b + 1, channel : channel + 1] > 0.5).float()
                ref = (ref > 0.5).float()
                if not bool(pred.any()) and not bool(ref.any()):
                    continue
                scores[b, s] = compute_dice(pred, ref, include_background=True, ignore_empty=False).reshape(())
        return scores

    def per_structure(self) -> torch.Tensor:
        """(11,) mean Dice of each structure over the buffered cases (NaN: never scored)."""
        buffer = self.get_buffer()
        if not isinstance(buffer, torch.Tensor) or buffer.numel() == 0:
            return torch.full((len(self.structures),), float("nan"))
        return torch.nanmean(buffer.float().reshape(-1, len(self.structures)), dim=0)

    def aggregate(self) -> torch.Tensor:
        """Mean over the scored structures of their mean Dice (NaN when nothing was scored)."""
        per = self.per_structure()
        scored = per[~torch.isnan(per)]
        return scored.mean() if scored.numel() else torch.tensor(float("nan"))


class TaskDiceHandler(IgniteMetricHandler):
    """Ignite handler of ``TaskDiceMetric``: the mean over structures under its attach name (the key metric),
    and the mean of each scored structure under ``<prefix>_<structure>`` in ``engine.state.metrics``.

    Args:
        output_transform: engine output -> (y_pred, y) lists or batches (default ``pred``, ``label``).
        task_id_key: key of the task ids in the engine's batch.
        prefix: prefix of the per-structure metric names.
        save_details: store the (cases, 11) scores in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        output_transform: Callable = from_engine(["pred", "label"]),
        task_id_key: str = "task_id",
        prefix: str = "val_dice",
        save_details: bool = True,
    ) -> None:
        super().__init__(metric_fn=TaskDiceMetric(), output_transform=output_transform, save_details=save_details)
        self.task_id_key = task_id_key
        self.names = structure_metric_names(prefix)

    def _task_ids(self, batch: Any) -> List[int]:
        if isinstance(batch, dict):
            return [int(t) for t in torch.as_tensor(batch[self.task_id_key]).reshape(-1)]
        if isinstance(batch, Sequence):
            return [int(torch.as_tensor(item[self.task_id_key]).reshape(())) for item in batch]
        raise ValueError(f"cannot read {self.task_id_key!r} from a batch of type {type(batch).__name__}")

    def iteration_completed(self, engine: Any) -> None:
        y_pred, y = self._output_transform(engine.state.output)
        self.update((y_pred, y, self._task_ids(engine.state.batch)))

    def update(self, output: Sequence[Any]) -> None:
        """``output``: (y_pred, y, task ids) with y_pred/y a (B, 2, ...) batch or lists of (2, ...) tensors."""
        y_pred, y, task_ids = output
        for pred, ref, task in zip(y_pred, y, task_ids):
            self.metric_fn(pred.unsqueeze(0), ref.unsqueeze(0), task_id=torch.tensor([task]))
        self._is_reduced = False

    def completed(self, engine: Any, name: str) -> None:
        super().completed(engine, name)
        for metric_name, value in zip(self.names, self.metric_fn.per_structure().tolist()):  # type: ignore
            if value == value:  # structures without a scored case (NaN) are not reported
                engine.state.metrics[metric_name] = value
