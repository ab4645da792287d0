"""Validation during training: when it runs, and a sliding window under the inference fast path's autocast.

``ValidationHandler`` is MONAI's, at epoch level, that also validates after the last epoch when ``val_interval`` does
not divide ``epochs``: the final weights are always scored (and can become ``models/model.pt``).

``configs/train.json``'s ``val_precision``: ``"auto"`` (default) runs the validation windows in bf16 where the
device has fast bf16 (CUDA GPUs that support it, CPUs with AVX-512 bf16 / AMX) and in fp32 elsewhere;
``"fp32"``, ``"bf16"`` or ``"fp16"`` (GPUs) force one (``scripts.networks.acceleration.autocast``).
"""

from __future__ import annotations

from typing import Any, Optional

import monai.handlers
import torch
from ignite.engine import Engine, Events
from monai.engines import Evaluator
from monai.inferers import SlidingWindowInferer

from scripts.cli_errors import UsageError
from scripts.networks.acceleration import autocast, resolve_precision

__all__ = ["AutocastSlidingWindowInferer", "ValidationHandler"]


class ValidationHandler(monai.handlers.ValidationHandler):
    """MONAI's ``ValidationHandler`` at epoch level: runs ``validator`` every ``interval`` epochs and after the last
    epoch (``max_epochs``), each epoch at most once.

    Args:
        interval: validate every N epochs (train.json's ``val_interval``, >= 1).
        validator: the evaluator (``validate#evaluator``).
        exec_at_start: also validate the initial weights before training.

    Raises:
        UsageError: ``interval`` is not a whole number of epochs >= 1.
    """

    def __init__(self, interval: int, validator: Optional[Evaluator] = None, exec_at_start: bool = False) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise UsageError(f"val_interval must be a whole number of epochs >= 1, got {interval!r}")
        super().__init__(interval, validator, epoch_level=True, exec_at_start=exec_at_start)

    def _due(self, engine: Engine, epoch: int) -> bool:
        return epoch % self.interval == 0 or epoch == engine.state.max_epochs

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=self._due), self)
        if self.exec_at_start:
            engine.add_event_handler(Events.STARTED, self)


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
