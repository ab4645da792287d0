"""DoDNet's shared residual encoder-decoder with its global-average-pooling (GAP) branch."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from scripts.cli_errors import UsageError

from .blocks import PreActResBlock, add_into, group_norm
from .ws_conv import make_conv3d

__all__ = ["DoDNetBackbone", "stage_blocks"]

_WIDTH_MULTIPLIERS = (1, 2, 4, 8, 8)


def stage_blocks(blocks: Sequence[int]) -> List[int]:
    """``blocks`` checked as DoDNet's 5 encoder stage depths: >= 0 for the first (full resolution), >= 1 for the
    others. Raises ``UsageError`` (a ``ValueError``) naming the value otherwise."""
    try:
        depths = [int(b) for b in blocks]
    except (TypeError, ValueError):
        depths = []
    if len(depths) != 5 or depths[0] < 0 or min(depths[1:]) < 1:
        raise UsageError(f"blocks must list 5 stage depths, >= 0 for the first and >= 1 for the others, got {blocks!r}")
    return depths


class DoDNetBackbone(nn.Module):
    """Residual 3-D encoder-decoder shared by all tasks.

    Encoder: a 3x3x3 stem, then five stages of pre-activation residual blocks of widths
    ``base * (1, 2, 4, 8, 8)`` (32-64-128-256-256 by default); stages 1-4 start with a stride-2
    block, so the input must be divisible by 16 on every spatial axis. Decoder: four steps of
    trilinear x2 upsampling, summing the skip of the matching encoder stage, then one residual
    block; a GN-ReLU-conv1x1 (with bias) makes the pre-segmentation map. The GAP branch pools the
    bottleneck features to one vector per image, which conditions the dynamic head.

    Module names follow the authors' checkpoint layout (``conv1``, ``layer0``...``layer4``,
    ``fusionConv``, ``x8_resb``...``x1_resb``, ``precls_conv``, ``GAP``).

    Deep supervision (not in the paper; nnU-Net's): with ``deep_supervision`` = n > 0, each of the first n
    decoder outputs below full resolution (``x2_resb`` at 1/2, ``x4_resb`` at 1/4, ``x8_resb`` at 1/8) gets its own
    GN-ReLU-conv1x1 to a pre-segmentation map (``ds_precls``), returned by ``forward_levels`` for the training
    loss. ``forward`` and every map it returns are the same as without them.

    Args:
        in_channels: image channels (1 for CT).
        base_channels: width of the first stage (32 in the paper).
        blocks: residual blocks per encoder stage (``[1, 2, 2, 2, 2]`` in the paper); the first stage (full
            resolution, stride 1) may have 0, which leaves the stem's output as its skip and saves the costliest
            convolutions of a training step.
        preseg_channels: channels of the pre-segmentation map (8 in the paper).
        norm_groups: GroupNorm groups (16 in the paper; capped at the width).
        weight_std: weight-standardized convolutions (True in the paper).
        deep_supervision: decoder levels below full resolution with their own pre-segmentation map (0-3; 0).

    Forward: image (B, in_channels, H, W, D) -> (pre-segmentation map (B, preseg_channels, H, W, D),
    pooled features (B, 8 * base_channels)).
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 32,
        blocks: Sequence[int] = (1, 2, 2, 2, 2),
        preseg_channels: int = 8,
        norm_groups: int = 16,
        weight_std: bool = True,
        deep_supervision: int = 0,
    ) -> None:
        super().__init__()
        blocks = stage_blocks(blocks)
        if not 0 <= deep_supervision <= 3:
            raise UsageError(f"deep_supervision must be 0-3 decoder levels (1/2, 1/4, 1/8), got {deep_supervision}")
        widths = [base_channels * m for m in _WIDTH_MULTIPLIERS]
        self.feature_channels = widths[4]
        self.preseg_channels = preseg_channels

        def stage(c_in: int, c_out: int, depth: int, stride: int) -> nn.Sequential:
            """``depth`` residual blocks, the first with ``stride``; depth 0 (c_in == c_out, stride 1): identity."""
            if depth == 0:
                return nn.Sequential()
            layers = [PreActResBlock(c_in, c_out, stride, norm_groups, weight_std)]
            layers += [PreActResBlock(c_out, c_out, 1, norm_groups, weight_std) for _ in range(depth - 1)]
            return nn.Sequential(*layers)

        self.conv1 = make_conv3d(in_channels, widths[0], 3, 1, weight_std)
        self.layer0 = stage(widths[0], widths[0], blocks[0], 1)
        self.layer1 = stage(widths[0], widths[1], blocks[1], 2)
        self.layer2 = stage(widths[1], widths[2], blocks[2], 2)
        self.layer3 = stage(widths[2], widths[3], blocks[3], 2)
        self.layer4 = stage(widths[3], widths[4], blocks[4], 2)
        self.fusionConv = nn.Sequential(
            group_norm(widths[4], norm_groups),
            nn.ReLU(inplace=True),
            make_conv3d(widths[4], widths[4], 1, 1, weight_std),
        )
        self.x8_resb = stage(widths[3], widths[2], 1, 1)
        self.x4_resb = stage(widths[2], widths[1], 1, 1)
        self.x2_resb = stage(widths[1], widths[0], 1, 1)
        self.x1_resb = stage(widths[0], widths[0], 1, 1)
        self.precls_conv = nn.Sequential(
            group_norm(widths[0], norm_groups),
            nn.ReLU(inplace=True),
            nn.Conv3d(widths[0], preseg_channels, kernel_size=1),
        )
        self.GAP = nn.Sequential(group_norm(widths[4], norm_groups), nn.ReLU(inplace=True), nn.AdaptiveAvgPool3d(1))
        self.deep_supervision = deep_supervision
        self.ds_precls = nn.ModuleList(
            nn.Sequential(
                group_norm(width, norm_groups),
                nn.ReLU(inplace=True),
                nn.Conv3d(width, preseg_channels, kernel_size=1),
            )
            for width in widths[:deep_supervision]  # decoder outputs at 1/2, 1/4, 1/8: widths 0, 1, 2
        )

    @staticmethod
    def _up_add(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return add_into(F.interpolate(x, scale_factor=2.0, mode="trilinear", align_corners=False), skip)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        preseg, pooled, _ = self.forward_levels(x, deep_supervision=False)
        return preseg, pooled

    def forward_levels(
        self, x: torch.Tensor, deep_supervision: bool = True
    ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """``forward``'s (pre-segmentation map, pooled features), plus the deep-supervision maps: (B, preseg_channels,
        H / 2^l, W / 2^l, D / 2^l) for l = 1..``self.deep_supervision`` (none when ``deep_supervision`` is False)."""
        skips: List[torch.Tensor] = []
        x = self.layer0(self.conv1(x))
        skips.append(x)
        x = self.layer1(x)
        skips.append(x)
        x = self.layer2(x)
        skips.append(x)
        x = self.layer3(x)
        skips.append(x)
        x = self.fusionConv(self.layer4(x))
        pooled = self.GAP(x).flatten(1)
        decoded: List[torch.Tensor] = []  # kept only for deep supervision: 1/8, 1/4, 1/2
        x = self.x8_resb(self._up_add(x, skips[3]))
        if deep_supervision:
            decoded.append(x)
        x = self.x4_resb(self._up_add(x, skips[2]))
        if deep_supervision:
            decoded.append(x)
        x = self.x2_resb(self._up_add(x, skips[1]))
        if deep_supervision:
            decoded.append(x)
        x = self.x1_resb(self._up_add(x, skips[0]))
        levels: List[torch.Tensor] = []  # 1/2, 1/4, 1/8: the decoded maps in reverse
        if deep_supervision:
            for i, precls in enumerate(self.ds_precls):
                levels.append(precls(decoded[len(decoded) - 1 - i]))
        return self.precls_conv(x), pooled, levels
