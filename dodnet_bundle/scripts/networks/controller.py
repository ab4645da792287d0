"""The controller: generates the dynamic head's parameters from image features and the task."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TaskController", "CONDITIONING_MODES", "CONTROLLER_INITS"]

CONDITIONING_MODES = ("dodnet", "task", "image")

CONTROLLER_INITS = ("default", "task_heads")
"""``"default"``: PyTorch's ``nn.Linear`` initialization (as the authors' 1x1x1 Conv3d); ``"task_heads"``: see
``TaskController.init_task_heads``."""


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

    @torch.no_grad()
    def init_task_heads(self, fan_in: torch.Tensor, gain: float = 2.0) -> None:
        """Start every task from its own He-initialized head, generated from the task code alone.

        The task code's weight column of parameter ``j`` is drawn from ``N(0, gain**2 * 2 / fan_in[j])``
        (kernel entries; ``fan_in[j] == 0`` marks a bias, whose column is zero), the image-feature columns
        and the bias are zeroed. At the start the k-th task's head is then a fixed random head of He scale
        that differs from every other task's, and the image conditioning is learned from there. With
        PyTorch's default initialization the image features (64 or more inputs) outweigh the one-hot
        code (one input) in every generated weight, so all tasks start with nearly the same head and
        training first has to pull them apart: on MOTS-synth the demo's network reached a higher Dice in
        the same number of iterations with this initialization (docs/performance.md, "Demo").

        Args:
            fan_in: (num_params,) input channels of the head layer each parameter belongs to, 0 for biases
                (``DynamicHead.param_fan_in``).
            gain: multiplier on the He standard deviation ``sqrt(2 / fan_in)``.

        Raises:
            ValueError: a controller without the task encoding (``"image"`` conditioning), or ``fan_in`` of
                another length than the controller's output.
        """
        if not self.use_task:
            raise ValueError(
                "the 'task_heads' initialization needs the task encoding ('dodnet' or 'task' conditioning)"
            )
        fan_in = torch.as_tensor(fan_in, dtype=torch.float32)
        if fan_in.shape != (self.fc.out_features,):
            raise ValueError(f"fan_in must have {self.fc.out_features} entries, got shape {list(fan_in.shape)}")
        std = torch.where(fan_in > 0, gain * torch.sqrt(2.0 / fan_in.clamp(min=1.0)), torch.zeros_like(fan_in))
        self.fc.weight.zero_()
        self.fc.bias.zero_()
        task_columns = self.fc.weight[:, -self.num_tasks :]
        task_columns.copy_(torch.randn(task_columns.shape) * std[:, None])
