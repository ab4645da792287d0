"""Where a case's time goes: load, preprocess, network, post-process, invert, write.

``PhaseTimer`` times named phases of one case; ``run_chain`` applies a ``Compose`` one transform at a time so its
steps can be attributed to phases (loading vs. preprocessing, post-processing vs. inversion to the input grid)
with the same result as calling the ``Compose``. On a GPU the device is synchronized at each phase boundary, so a
phase is charged for the kernels it launched.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional

import torch
from monai.transforms import Compose, Invertd, LoadImaged, apply_transform

__all__ = ["PHASES", "PhaseTimer", "preprocessing_phase", "postprocessing_phase"]

PHASES = ("load", "preprocess", "network", "postprocess", "invert", "write")


def preprocessing_phase(transform: Any) -> str:
    """ "load" for the reader step, else "preprocess"."""
    return "load" if isinstance(transform, LoadImaged) else "preprocess"


def postprocessing_phase(transform: Any) -> str:
    """ "invert" for the inversion to the input grid, else "postprocess"."""
    return "invert" if isinstance(transform, Invertd) else "postprocess"


class PhaseTimer:
    """Seconds per phase of one case (``PHASES``), accumulated over ``phase`` blocks.

    Args:
        device: the compute device; CUDA is synchronized at phase boundaries.
    """

    def __init__(self, device: Optional[torch.device] = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.seconds: Dict[str, float] = {name: 0.0 for name in PHASES}

    def _sync(self) -> None:
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the block's wall time to phase ``name``."""
        if name not in self.seconds:
            raise ValueError(f"unknown phase {name!r}; phases: {', '.join(PHASES)}")
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start

    def run_chain(self, transform: Callable, data: Any, phase_of: Callable[[Any], str]) -> Any:
        """``transform(data)``, each step of a (non-lazy) ``Compose`` charged to ``phase_of(step)``; any other
        callable is charged as a whole to ``phase_of(transform)``."""
        if isinstance(transform, Compose) and not transform.lazy and not transform.unpack_items:
            for step in transform.flatten().transforms:
                with self.phase(phase_of(step)):
                    data = apply_transform(step, data, transform.map_items, log_stats=transform.log_stats)
            return data
        with self.phase(phase_of(transform)):
            return transform(data)

    def report(self) -> Dict[str, float]:
        """``{phase: seconds}`` rounded to milliseconds, with their ``total``."""
        out = {name: round(value, 3) for name, value in self.seconds.items()}
        out["total"] = round(sum(self.seconds.values()), 3)
        return out
