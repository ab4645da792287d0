"""A stand-in for a trained DoDNet on tiny_mots volumes, importable by configs (``eval_oracle.IntensityOracle``)."""

from __future__ import annotations

from typing import Optional

import torch


class IntensityOracle(torch.nn.Module):
    """Stands in for a trained DoDNet on tiny_mots volumes: organ = organ or tumor intensity, tumor = tumor
    intensity dilated by one voxel (26-neighbourhood). Refuses to run without the per-case ``task_id``."""

    def __init__(self) -> None:
        super().__init__()
        self.logit = torch.nn.Parameter(torch.tensor(10.0))  # a weight for the strict checkpoint load

    def forward(self, image: torch.Tensor, task_id: Optional[torch.Tensor] = None) -> torch.Tensor:
        if task_id is None or task_id.shape != (image.shape[0],):
            raise ValueError(f"the evaluator must pass one task id per sample, got {task_id}")
        tumor = ((image > -0.6) & (image < -0.02)).float()
        organ = ((image > 0.3).float() + tumor).clamp(max=1)
        tumor = torch.nn.functional.max_pool3d(tumor, 3, stride=1, padding=1)
        return torch.cat([organ, tumor], dim=1) * 2 * self.logit - self.logit
