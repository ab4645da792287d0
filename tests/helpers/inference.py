"""Shared helpers of the inference tests: a network stub with known output, tiny checkpoints, synthetic CT files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import nibabel as nib
import numpy as np
import torch
from helpers.paths import BUNDLE_ROOT
from torch import nn

from scripts.networks import DoDNet

TINY_NET = {"network_def#base_channels": 8, "network_def#norm_groups": 8, "network_def#blocks": [1, 1, 1, 1, 1]}


class IntensityNet(nn.Module):
    """A DoDNet stand-in whose logits follow the image: the thresholded output is a known mask.

    Task t's organ logit is ``gain * (x - levels[t, 0])`` and its tumor logit ``gain * (x - levels[t, 1])``
    (x = preprocessed intensity in [-1, 1]), so the organ mask is ``x >= levels[t, 0]``. Takes
    ``(image (B, 1, H, W, D), task_id (1, K) or None)`` like DoDNet and returns (B, 2K, H, W, D).
    """

    def __init__(self, num_tasks: int = 7, organ_level: float = 0.3, tumor_level: float = 0.8, gain: float = 40.0):
        super().__init__()
        self.levels = nn.Parameter(torch.tensor([[organ_level, tumor_level]] * num_tasks))
        self.gain = gain
        self.calls = 0

    def forward(self, image: torch.Tensor, task_id: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.calls += 1
        ids = torch.arange(self.levels.shape[0]) if task_id is None else task_id.reshape(task_id.shape[0], -1)[0]
        levels = self.levels[ids.cpu()].reshape(1, -1, 1, 1, 1).to(image)
        return self.gain * (image - levels)


def tiny_dodnet(seed: int = 0) -> DoDNet:
    torch.manual_seed(seed)
    return DoDNet(base_channels=8, norm_groups=8, blocks=(1, 1, 1, 1, 1)).eval()


def save_checkpoint(network: nn.Module, path: Path, wrap: bool = True) -> Path:
    state = network.state_dict()
    torch.save({"model": state} if wrap else state, path)
    return path


def affine_for(
    spacing: Sequence[float], kind: str = "ras", origin: Sequence[float] = (-20.0, 15.0, 40.0)
) -> np.ndarray:
    """4x4 affine: "ras" (diagonal), "lps" (x and y flipped, as DICOM-derived NIfTI) or "oblique" (rotated)."""
    direction = np.eye(3)
    if kind == "lps":
        direction = np.diag([-1.0, -1.0, 1.0])
    elif kind == "oblique":
        a, b = math.radians(20), math.radians(10)
        rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
        direction = rz @ rx
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def phantom(shape: Sequence[int] = (40, 36, 20)) -> np.ndarray:
    """HU volume: air -1000, a body of 40 HU, an asymmetric 'organ' box of 200 HU holding a 320 HU 'tumor' box."""
    hu = np.full(shape, -1000.0, dtype=np.float32)
    h, w, d = shape
    hu[2 : h - 2, 2 : w - 2, 1 : d - 1] = 40.0
    hu[5 : int(h * 0.7), 6 : int(w * 0.6), 3 : d - 4] = 200.0
    hu[8:16, 9:15, 5:11] = 320.0
    return hu


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype: Any = np.int16) -> Path:
    nib.save(nib.Nifti1Image(data.astype(dtype), affine), str(path))
    return path


def run_workflow(inputs: Any, output_dir: Path, ckpt: Path, **overrides: Any) -> Dict[str, Any]:
    """Run the bundle's inference.json with overrides (as ``monai.bundle run`` would) and return its summary."""
    from monai.bundle import ConfigWorkflow

    settings = {
        "bundle_root": str(BUNDLE_ROOT),
        "input": inputs,
        "output_dir": str(output_dir),
        "ckpt_path": str(ckpt),
        "device": "$torch.device('cpu')",
        "progress": False,
        "fail_on_error": False,
    }
    settings.update(overrides)
    workflow = ConfigWorkflow(
        config_file=str(BUNDLE_ROOT / "configs" / "inference.json"), workflow_type="infer", **settings
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    return workflow.run()[-1]  # the runner's summary (the last run step)


def expected_liver_labels(hu: np.ndarray, organ_hu: float = 97.5, tumor_hu: float = 260.0) -> np.ndarray:
    """Merged ids the IntensityNet produces for the liver task (organ >= 0.3 x 325 HU, tumor >= 0.8 x 325 HU)."""
    return np.where(hu >= tumor_hu, 2, np.where(hu >= organ_hu, 1, 0)).astype(np.uint8)
