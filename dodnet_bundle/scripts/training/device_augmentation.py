"""Augmenting training patches on the training device (``train.json``'s ``augment_on_device``).

With ``augment_on_device`` the loader workers only cut patches (``LoadPatchd`` or the crop transforms); the batch
goes to the device as it is, and ``AugmentOnDevice`` runs the published augmentations and the label mapping
there, one sample at a time: the same MONAI dictionary transforms, on device tensors. A GPU then needs few CPU
workers. The trainer's ``prepare_batch`` is wrapped, so the network and the loss see exactly what they see with
augmentation in the workers.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import torch
from monai.data import decollate_batch, list_data_collate
from monai.engines.utils import PrepareBatch
from monai.transforms import Compose

__all__ = ["AugmentOnDevice"]


class AugmentOnDevice(PrepareBatch):
    """A ``prepare_batch`` that moves a collated batch to the device, augments each sample there, then hands the
    batch to ``prepare_batch``.

    Args:
        transform: dictionary transforms applied per sample on the device (the augmentations, then the label
            mapping); a sequence is composed.
        prepare_batch: the trainer's own ``prepare_batch`` (e.g. ``PrepareBatchExtraInput`` for the task ids).
        keys: the batch's tensors moved to the device before ``transform`` (others, such as the task names, stay).

    Call: ``(batch {"image": (B, 1, H, W, D), "label": (B, 1, H, W, D), "task": [B names], ...}, device,
    non_blocking)`` -> ``prepare_batch``'s result for the augmented batch (image (B, 1, H, W, D), label
    (B, 2, H, W, D) after the label mapping).
    """

    def __init__(
        self,
        transform: Union[Callable, Sequence[Callable]],
        prepare_batch: PrepareBatch,
        keys: Sequence[str] = ("image", "label"),
    ) -> None:
        self.transform = transform if callable(transform) else Compose(list(transform))
        self.prepare_batch = prepare_batch
        self.keys = tuple(keys)

    def augment(
        self,
        batchdata: Mapping[str, Any],
        device: Optional[Union[str, torch.device]] = None,
        non_blocking: bool = False,
    ) -> Dict[str, Any]:
        """The collated batch with ``keys`` on ``device`` and ``transform`` applied to each sample."""
        moved = dict(batchdata)
        for key in self.keys:
            if isinstance(moved.get(key), torch.Tensor) and device is not None:
                moved[key] = moved[key].to(device=device, non_blocking=non_blocking)
        samples = [self.transform(sample) for sample in decollate_batch(moved, detach=True)]
        return list_data_collate(samples)

    def __call__(
        self,
        batchdata: Dict[str, Any],
        device: Optional[Union[str, torch.device]] = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> Any:
        return self.prepare_batch(self.augment(batchdata, device, non_blocking), device, non_blocking, **kwargs)
