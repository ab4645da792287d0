"""DoDNet's encoder-decoder as a plain multi-class segmenter, for transfer to a multi-class task."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .backbone import DoDNetBackbone

__all__ = ["DoDNetSegmenter"]


class DoDNetSegmenter(nn.Module):
    """DoDNet's encoder-decoder with a plain multi-class output, for transfer to a multi-class task.

    The backbone is ``DoDNetBackbone`` with the same module names as in DoDNet (so a DoDNet checkpoint's
    ``backbone.*`` weights load into it); its last 1x1x1 pre-segmentation conv is replaced by one with
    ``out_channels`` outputs. No controller, no dynamic head, no task input.

    Args:
        in_channels: image channels (1).
        out_channels: classes including background (14 for BCV: 13 organs + background).
        base_channels, blocks, norm_groups, weight_std: as ``DoDNet`` (must match the checkpoint).

    Forward: image (B, in_channels, H, W, D), sizes divisible by 16 -> logits (B, out_channels, H, W, D).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 14,
        base_channels: int = 32,
        blocks: Sequence[int] = (1, 2, 2, 2, 2),
        norm_groups: int = 16,
        weight_std: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = DoDNetBackbone(in_channels, base_channels, blocks, 8, norm_groups, weight_std)
        self.backbone.precls_conv[2] = nn.Conv3d(base_channels, out_channels, kernel_size=1)
        self.out_channels = out_channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone(image)[0]
