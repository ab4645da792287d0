"""Networks users would pick instead of DoDNet, built for speed comparisons (random weights).

- ``MultiHeadDoDNet``: the paper's "Multi-Head" competitor: DoDNet's encoder shared by seven
  task-specific decoders built from the same blocks (each ending in a 2-channel 1x1x1 conv).
- ``dynunet_3d_fullres``: MONAI's DynUNet in nnU-Net's 3d_fullres layout for a [192, 192, 64]
  patch at 0.8 x 0.8 x 1.5 mm, one network with 14 output channels.
- ``segresnet_wholebody``: the SegResNet of the Model Zoo's wholeBody_ct_segmentation bundle.
- ``swinunetr_universal``: SwinUNETR with feature size 48, the CLIP-driven universal model's backbone.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F
from monai.networks.nets import DynUNet, SegResNet, SwinUNETR
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dodnet_bundle"))

from scripts.networks import DoDNetBackbone  # noqa: E402

__all__ = ["MultiHeadDoDNet", "dynunet_3d_fullres", "segresnet_wholebody", "swinunetr_universal"]


class MultiHeadDoDNet(nn.Module):
    """Shared DoDNet encoder, one decoder (x8..x1 residual blocks + pre-classifier) per task.

    Input (B, 1, H, W, D) -> logits (B, 2 * num_tasks, H, W, D).
    """

    def __init__(self, num_tasks: int = 7, base_channels: int = 32) -> None:
        super().__init__()
        self.encoder = DoDNetBackbone(base_channels=base_channels)
        self.decoders = nn.ModuleList()
        for _ in range(num_tasks):
            ref = DoDNetBackbone(base_channels=base_channels)
            self.decoders.append(
                nn.ModuleDict(
                    {
                        "x8": ref.x8_resb,
                        "x4": ref.x4_resb,
                        "x2": ref.x2_resb,
                        "x1": ref.x1_resb,
                        "cls": nn.Sequential(ref.precls_conv, nn.ReLU(), nn.Conv3d(8, 2, 1)),
                    }
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        skips: List[torch.Tensor] = []
        x = enc.layer0(enc.conv1(x))
        skips.append(x)
        for layer in (enc.layer1, enc.layer2, enc.layer3):
            x = layer(x)
            skips.append(x)
        bottleneck = enc.fusionConv(enc.layer4(x))
        outputs = []
        for dec in self.decoders:
            y = bottleneck
            for name, skip in zip(("x8", "x4", "x2", "x1"), reversed(skips)):
                y = dec[name](F.interpolate(y, scale_factor=2.0, mode="trilinear", align_corners=False) + skip)
            outputs.append(dec["cls"](y))
        return torch.cat(outputs, dim=1)


def dynunet_3d_fullres(out_channels: int = 14) -> DynUNet:
    """nnU-Net 3d_fullres plan for [192, 192, 64] at 0.8 x 0.8 x 1.5 mm (spacing ratio < 2: 3x3x3 kernels)."""
    strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
    return DynUNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=out_channels,
        kernel_size=[[3, 3, 3]] * len(strides),
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=[32, 64, 128, 256, 320, 320],
        norm_name="instance",
        deep_supervision=False,
        res_block=False,
    )


def segresnet_wholebody(out_channels: int = 105) -> SegResNet:
    """The wholeBody_ct_segmentation bundle's SegResNet (104 structures + background)."""
    return SegResNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=out_channels,
        init_filters=32,
        blocks_down=[1, 2, 2, 4],
        blocks_up=[1, 1, 1],
        dropout_prob=0.2,
    )


def swinunetr_universal(out_channels: int = 32) -> SwinUNETR:
    """SwinUNETR with feature size 48 (the CLIP-driven universal model's backbone; 32 classes)."""
    return SwinUNETR(in_channels=1, out_channels=out_channels, feature_size=48, spatial_dims=3)
