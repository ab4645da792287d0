"""Validation during training that stays cheap: the sliding window under the inference fast path's autocast.

``configs/train.json``'s ``val_precision``: ``"auto"`` (default) runs the validation windows in bf16 where the
device has fast bf16 (CUDA GPUs that support it, CPUs with AVX-512 bf16 / AMX) and in fp32 elsewhere;
``"fp32"``, ``"bf16"`` or ``"fp16"`` (GPUs) force one (``scripts.networks.acceleration.autocast``).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import SlidingWindowInferer

from scripts.networks.acceleration import autocast, resolve_precision

__all__ = ["AutocastSlidingWindowInferer"]


class AutocastSlidingWindowInferer(SlidingWindowInferer):
    """``SlidingWindowInferer`` whose windows run under autocast for ``precision``; returns float32 logits.

    Args:
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see ``resolve_precision``), resolved for the
            device of each input.
        kwargs: ``SlidingWindowInferer``'s arguments (``roi_size``, ``sw_batch_size``, ``overlap``, ``mode``...).
    """

    def __init__(self, precision: str = "auto", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        resolve_precision(precision, "cpu")  # reject unknown names when the config is parsed
        self.precision = precision

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """(B, C, H, W, D) input -> the network's (B, K, H, W, D) output stitched over windows, float32."""
        precision = resolve_precision(self.precision, inputs.device)
        with autocast(inputs.device, precision):
            out = super().__call__(inputs, network, *args, **kwargs)
        return out.float() if isinstance(out, torch.Tensor) else out
