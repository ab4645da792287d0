"""Where a case lives between loading and writing: the GPU-resident inference pipeline.

With a CUDA device, ``configs/inference.json`` moves the loaded image to the GPU once (``PipelineToDeviced``);
orientation, resampling, intensity scaling, the body crop, the sliding window, thresholding, the published
post-processing (``scripts.inference.components``) and the inversion to the input grid then run there, and only
the uint8 label maps come back to the host (``PipelineToHostd`` with ``when="gpu_pipeline"``); the writer inverts
requested masks and probabilities on the GPU one channel at a time and brings each inverted channel back.
Otherwise the case stays on the host and the stitched masks come back right after the sliding window
(``when="host_pipeline"``), as a CPU-preprocessed pipeline needs.

One ``PipelineDevice`` is shared by these steps and by ``SegmentationRunner``, which reruns a case on the host
pipeline (``on_host``) when the GPU runs out of memory.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Hashable, Iterator, Mapping, Union

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from scripts.utils import as_bool

__all__ = ["PipelineDevice", "PipelineToDeviced", "PipelineToHostd"]


class PipelineDevice:
    """The device a case is processed on, and whether the pipeline is resident there.

    Args:
        device: the inference device (the network's).
        enabled: ``"auto"`` (resident on a CUDA device, host pipeline on the CPU), True or False. True with a CPU
            device runs the resident steps on the CPU (the same results; the tests' way to reach them).
    """

    def __init__(self, device: Union[str, torch.device] = "cpu", enabled: Union[bool, str] = "auto") -> None:
        self.device = torch.device(device)
        auto = isinstance(enabled, str) and enabled.strip().lower() == "auto"
        self.enabled = self.device.type == "cuda" if auto else as_bool(enabled)
        self._on_host = False

    @property
    def resident(self) -> bool:
        """True while cases are processed on ``device`` from loading to the uint8 results."""
        return self.enabled and not self._on_host

    @contextmanager
    def on_host(self) -> Iterator[None]:
        """Process cases on the host pipeline inside the block (the out-of-memory fallback)."""
        previous, self._on_host = self._on_host, True
        try:
            yield
        finally:
            self._on_host = previous

    def peak_memory_bytes(self) -> int:
        """The GPU's peak allocated bytes since the last ``reset_peak_memory``; 0 off CUDA."""
        if self.device.type != "cuda" or not torch.cuda.is_available():
            return 0
        return int(torch.cuda.max_memory_allocated(self.device))

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory measurement (one per case)."""
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats(self.device)


def _move(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


class PipelineToDeviced(MapTransform):
    """Move ``keys`` to ``pipeline.device`` while the pipeline is resident (after loading); else a no-op.

    A ``MetaTensor`` keeps its metadata and applied operations, so ``Invertd`` still inverts the chain.
    """

    def __init__(self, keys: KeysCollection, pipeline: PipelineDevice, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.pipeline = pipeline

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        if self.pipeline.resident:
            for key in self.key_iterator(d):
                d[key] = _move(d[key], self.pipeline.device)
        return d


class PipelineToHostd(MapTransform):
    """Move ``keys`` to the host at one of two points of the post-processing.

    Args:
        keys: items to move (missing ones are skipped with ``allow_missing_keys``).
        pipeline: the shared ``PipelineDevice``.
        when: ``"host_pipeline"``: move when the pipeline is not resident (masks to the host after GPU stitching,
            before the CPU post-processing); ``"gpu_pipeline"``: move when it is resident (the uint8 results, after
            the inversion to the input grid).
    """

    def __init__(
        self, keys: KeysCollection, pipeline: PipelineDevice, when: str, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if when not in ("host_pipeline", "gpu_pipeline"):
            raise ValueError(f"when must be 'host_pipeline' or 'gpu_pipeline', got {when!r}")
        self.pipeline = pipeline
        self.when = when

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        if self.pipeline.resident == (self.when == "gpu_pipeline"):
            for key in self.key_iterator(d):
                d[key] = _move(d[key], torch.device("cpu"))
        return d
