"""DoDNet's loss for partially labeled data: sigmoid Dice + BCE on the labeled channels only, and its deep-supervision
wrapper."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss, DiceLoss
from torch.nn.modules.loss import _Loss

from scripts.cli_errors import UsageError

__all__ = ["PartialLabelDiceBCELoss", "MaxPoolDeepSupervisionLoss", "AVERAGES"]

AVERAGES = ("channels", "structures")
"""How ``PartialLabelDiceBCELoss`` averages over the labeled (sample, channel) pairs of a batch."""


class PartialLabelDiceBCELoss(_Loss):
    """Per-channel sigmoid Dice + BCE-with-logits that skips unlabeled (sample, channel) pairs.

    For every channel ``c`` (0 organ, 1 tumor) the samples whose target channel is labeled (no
    negative value) contribute ``dice_weight * Dice + bce_weight * BCE`` where, per sample,
    ``Dice = 1 - 2 * sum(p * g) / (sum(p) + sum(g) + 1)`` with ``p = sigmoid(logit)`` (MONAI's
    ``DiceLoss`` with ``smooth_nr=0, smooth_dr=1``) and BCE is averaged over the voxels (foreground voxels
    weighted by ``pos_weight`` when it is given); the channel
    loss is the mean over its labeled samples. Channels without any labeled sample in the batch are
    dropped and the result is the mean over the remaining channels (``average="channels"``); with
    ``average="structures"`` it is the mean over the labeled (sample, channel) pairs instead, so that every
    labeled structure in the batch weighs the same. Unlabeled entries are never read,
    so their logits get exactly zero gradient. The loss is computed in float32 (also under AMP).

    Args:
        dice_weight: weight of the Dice term (1).
        bce_weight: weight of the BCE term (1).
        unlabeled_below: a target channel is unlabeled when its values are below this (the ``-1`` fill).
        pos_weight: weight of the foreground voxels in the BCE term (PyTorch's ``pos_weight`` of
            ``binary_cross_entropy_with_logits``, the same for both channels); None or 1 weighs every voxel
            alike, as the published loss.
        average: ``"channels"`` (each channel's mean over its labeled samples, then the mean over the channels)
            or ``"structures"`` (the mean over all labeled (sample, channel) pairs). With one task per sample they
            differ when a sample labels one channel only: in a batch of a lung volume (tumor only) and a liver
            volume (organ and tumor), "channels" weighs the lung tumor 1/4 and the liver organ 1/2, "structures"
            each of the three 1/3.

    Forward:
        input: logits (B, C, H, W, D) (C = 2 for DoDNet called with one task per sample).
        target: (B, C, H, W, D) with 0/1 in labeled channels and -1 filling unlabeled ones.

    Returns:
        a scalar tensor.

    Raises:
        ValueError: shape mismatch; a channel mixing labeled and unlabeled voxels (a crop/pad or
            augmentation corrupted the -1 marker); a batch with no labeled channel at all.
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        unlabeled_below: float = 0.0,
        pos_weight: Optional[float] = None,
        average: str = "channels",
    ) -> None:
        super().__init__()
        if average not in AVERAGES:
            raise UsageError(f"average must be one of {AVERAGES}, got {average!r}")
        self.average = average
        if pos_weight is not None and not float(pos_weight) > 0:
            raise ValueError(f"pos_weight must be a positive number or None, got {pos_weight!r}")
        self.pos_weight = None if pos_weight is None or float(pos_weight) == 1.0 else float(pos_weight)
        self.dice_weight = float(dice_weight)
        self.bce_weight = float(bce_weight)
        self.unlabeled_below = float(unlabeled_below)
        self.dice = DiceLoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1.0, reduction="none")

    def labeled_mask(self, target: torch.Tensor) -> torch.Tensor:
        """(B, C) bool: which (sample, channel) pairs are labeled; raises on partly marked channels."""
        flat = target.reshape(target.shape[0], target.shape[1], -1)
        unlabeled_voxels = flat < self.unlabeled_below
        unlabeled = unlabeled_voxels.all(dim=2)
        mixed = unlabeled_voxels.any(dim=2) & ~unlabeled
        if bool(mixed.any()):
            pairs = [tuple(int(i) for i in p) for p in mixed.nonzero().tolist()]
            raise ValueError(
                f"target (sample, channel) pairs {pairs} mix unlabeled (-1) and labeled voxels: a crop, pad or "
                "augmentation changed the unlabeled marker; map labels with MapTaskLabelsd after spatial transforms"
            )
        return ~unlabeled

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape != target.shape:
            raise ValueError(f"logits {tuple(input.shape)} and target {tuple(target.shape)} must have the same shape")
        if input.dim() < 3:
            raise ValueError(f"expected (B, C, spatial...) tensors, got shape {tuple(input.shape)}")
        # MONAI's MetaTensor targets would carry their metadata through every step of the loss (and its backward)
        input, target = input.as_subclass(torch.Tensor), target.as_subclass(torch.Tensor)
        labeled = self.labeled_mask(target)
        if not bool(labeled.any()):
            raise ValueError(
                "no labeled channel in this batch: every target channel is unlabeled (-1); each item needs a task "
                "that labels at least one of organ/tumor"
            )
        logits = input.float()
        target = target.float()
        per_channel = []  # for each channel with a labeled sample: (n,) losses of its n labeled samples
        for c in range(input.shape[1]):
            rows = labeled[:, c].nonzero().flatten()
            if rows.numel() == 0:
                continue
            x = logits[rows, c : c + 1]
            y = target[rows, c : c + 1]
            pos_weight = None if self.pos_weight is None else x.new_tensor(self.pos_weight)
            bce = F.binary_cross_entropy_with_logits(x, y, reduction="none", pos_weight=pos_weight)
            per_channel.append(self.dice_weight * self.dice(x, y).flatten() + self.bce_weight * bce.flatten(1).mean(1))
        if self.average == "structures":
            return torch.cat(per_channel).mean()
        return torch.stack([losses.mean() for losses in per_channel]).mean()


class MaxPoolDeepSupervisionLoss(DeepSupervisionLoss):
    """MONAI's ``DeepSupervisionLoss`` with each lower-resolution target max-pooled to its output's grid.

    MONAI samples the target with nearest-neighbour interpolation, which drops structures smaller than the
    sampling step (a lesion of a few voxels is absent at 1/4 resolution, and that level then teaches its head
    that there is none). Max pooling keeps every labeled structure at every level (a voxel is foreground when any
    voxel it covers is), and a channel filled with the unlabeled marker stays unlabeled.

    Args:
        loss: the loss of one level, e.g. ``PartialLabelDiceBCELoss``.
        weight_mode, weights: as ``DeepSupervisionLoss`` ("exp": 1, 0.5, 0.25, ...).

    Forward:
        input: logits (B, C, H, W, D), or a list of them at full, 1/2, 1/4... resolution.
        target: (B, C, H, W, D) at full resolution.
    """

    def get_loss(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape[2:] != target.shape[2:]:
            pool = (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)[input.dim() - 3]
            target = pool(target.float(), tuple(input.shape[2:]))
        return self.loss(input, target)  # type: ignore[no-any-return]
