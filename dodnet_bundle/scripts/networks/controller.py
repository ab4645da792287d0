"""The controller: generates the dynamic head's parameters from image features and the task."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TaskController", "CONDITIONING_MODES"]

CONDITIONING_MODES = ("dodnet", "task", "image")


class TaskController(nn.Module):
    """Maps (pooled image features, one-hot task) to the parameters of one dynamic head per task.

    Conditioning modes (the paper's Table 5):
        - ``"dodnet"``: image features and task encoding (the published model);
        - ``"task"``: task encoding only;
        - ``"image"``: image features only ("Cond-NO": every task gets the same head).

    The authors implement the controller as a 1x1x1 Conv3d on a 1x1x1 map; it is the same affine
    map as the ``fc`` layer here (a converter reshapes the kernel).

    Args:
        num_tasks: length of the one-hot task encoding.
        feature_channels: length of the pooled image features.
        num_params: number of dynamic parameters per task (see ``DynamicHead.num_params``).
        mode: one of ``CONDITIONING_MODES``.

    Forward: features (B, feature_channels), task_id (B, K) int64 -> params (B, K, num_params).
    """

    def __init__(self, num_tasks: int, feature_channels: int, num_params: int, mode: str = "dodnet") -> None:
        super().__init__()
        if mode not in CONDITIONING_MODES:
            raise ValueError(f"conditioning mode must be one of {CONDITIONING_MODES}, got {mode!r}")
        self.num_tasks = num_tasks
        self.use_image = mode in ("dodnet", "image")
        self.use_task = mode in ("dodnet", "task")
        in_features = (feature_channels if self.use_image else 0) + (num_tasks if self.use_task else 0)
        self.fc = nn.Linear(in_features, num_params)

    def forward(self, features: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        num_requested = task_id.shape[1]
        if not self.use_task:
            return self.fc(features).unsqueeze(1).expand(-1, num_requested, -1)
        one_hot = F.one_hot(task_id, self.num_tasks).to(features.dtype)
        if not self.use_image:
            return self.fc(one_hot)
        expanded = features.unsqueeze(1).expand(-1, num_requested, -1)
        return self.fc(torch.cat([expanded, one_hot], dim=2))
