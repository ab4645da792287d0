"""The pre-activation residual block of DoDNet's encoder-decoder ("NoBottleneck" in the authors' code)."""

from __future__ import annotations

import torch
from torch import nn

from .ws_conv import make_conv3d

__all__ = ["PreActResBlock", "group_norm", "add_into"]


def add_into(out: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``out + other``, written into ``out`` when that gives the same result (same dtype and shape).

    For the fresh outputs of a convolution or an upsampling, whose backward does not read them, the
    in-place sum saves one full-size allocation per residual/skip connection (about 5% of a bf16 CPU
    forward); mixed dtypes keep PyTorch's type promotion.
    """
    if out.dtype == other.dtype and out.shape == other.shape:
        return out.add_(other)
    return out + other


def group_norm(channels: int, norm_groups: int) -> nn.GroupNorm:
    """GroupNorm(norm_groups, channels), the groups capped at ``channels`` for narrow networks."""
    return nn.GroupNorm(min(norm_groups, channels), channels)


class PreActResBlock(nn.Module):
    """GN-ReLU-conv3(stride) -> GN-ReLU-conv3, plus a shortcut; the output is the plain sum.

    The shortcut is the identity, or GN-ReLU-conv1x1(stride) when the stride or the width changes.
    Parameter names follow the authors' checkpoint (``gn1``, ``conv1``, ``gn2``, ``conv2``,
    ``downsample.0`` / ``downsample.2``).

    Input (B, C_in, H, W, D) -> output (B, C_out, H/stride, W/stride, D/stride).
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, norm_groups: int = 16, weight_std: bool = True
    ) -> None:
        super().__init__()
        self.gn1 = group_norm(in_channels, norm_groups)
        self.conv1 = make_conv3d(in_channels, out_channels, 3, stride, weight_std)
        self.gn2 = group_norm(out_channels, norm_groups)
        self.conv2 = make_conv3d(out_channels, out_channels, 3, 1, weight_std)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != out_channels:
            self.downsample: nn.Module = nn.Sequential(
                group_norm(in_channels, norm_groups),
                nn.ReLU(inplace=True),
                make_conv3d(in_channels, out_channels, 1, stride, weight_std),
            )
        else:
            self.downsample = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.gn1(x)))
        out = self.conv2(self.relu(self.gn2(out)))
        return add_into(out, self.downsample(x))
