"""Which training items an epoch visits: proportional (plain shuffling) or task-balanced, any epoch length, DDP-aware.

``TaskSampler`` is a ``DistributedSampler`` (so MONAI's trainers call ``set_epoch`` each epoch) that also works
without a process group. Every rank draws the same global sequence from ``seed + epoch`` and keeps every
``num_replicas``-th index from its ``rank``, so the ranks see disjoint parts of one epoch.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

__all__ = ["SAMPLING_MODES", "TaskSampler", "task_weights"]

SAMPLING_MODES = ("proportional", "task_balanced")


def task_weights(tasks: Sequence[Any]) -> torch.Tensor:
    """Per-item weights giving every task the same total weight: ``1 / (number of tasks * items of its task)``."""
    counts: Dict[Any, int] = {}
    for task in tasks:
        counts[task] = counts.get(task, 0) + 1
    return torch.tensor([1.0 / (len(counts) * counts[t]) for t in tasks], dtype=torch.float64)


class TaskSampler(DistributedSampler):
    """Indices of the training items for one epoch of one rank.

    ``sampling="proportional"`` (default, the authors' way): tasks in proportion to their numbers of items,
    i.e. plain shuffling; each pass over the data is a fresh permutation, concatenated when an epoch is longer
    than the data. ``"task_balanced"``: items drawn with replacement with weights ``task_weights``, so each task
    is drawn equally often whatever its size.

    Args:
        data: the training items (dicts with ``task_key``), e.g. the dataset's datalist.
        sampling: ``"proportional"`` or ``"task_balanced"``.
        num_samples: indices per rank and epoch; None: one pass over the data split over the ranks
            (``ceil(len(data) / num_replicas)``, the last ranks padded with wrapped-around indices).
        task_key: key of an item's task.
        seed: base seed; epoch ``e`` uses ``seed + e`` on every rank.
        num_replicas: number of ranks (default: the process group's size, 1 without one).
        rank: this rank (default: the process group's rank, 0 without one).
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        sampling: str = "proportional",
        num_samples: Optional[int] = None,
        task_key: str = "task",
        seed: int = 0,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
    ) -> None:
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {list(SAMPLING_MODES)}, got {sampling!r}")
        if not data:
            raise ValueError("TaskSampler: no training items")
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        super().__init__(data, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        if num_samples is not None and int(num_samples) < 1:
            raise ValueError(f"num_samples (iterations_per_epoch x batch_size) must be >= 1, got {num_samples}")
        self.sampling = sampling
        self.tasks = [item.get(task_key) for item in data]  # items without a task form one group
        self.num_samples = int(num_samples) if num_samples is not None else math.ceil(len(data) / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def _global_indices(self) -> List[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        n = len(self.tasks)
        if self.sampling == "task_balanced":
            draws = torch.multinomial(task_weights(self.tasks), self.total_size, replacement=True, generator=generator)
            return draws.tolist()
        indices: List[int] = []
        while len(indices) < self.total_size:
            indices += torch.randperm(n, generator=generator).tolist()
        return indices[: self.total_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._global_indices()[self.rank : self.total_size : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples
