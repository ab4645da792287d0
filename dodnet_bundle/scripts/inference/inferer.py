"""Task-aware sliding-window inference: every requested task from one backbone pass per window.

``TaskSlidingWindowInferer`` is MONAI's ``SlidingWindowInfererAdapt`` (Gaussian blending; stitching on
the GPU with automatic fallback to buffered and then CPU stitching when GPU memory runs out) around DoDNet.
The task selection lives in the inferer, so the MONAI Label call ``inferer(inputs, network)`` with
no extra argument works. Each window is passed to the network once with ``task_id`` of shape
(1, K), turned into probabilities (sigmoid, as the authors' inference does per window) and stitched
in ``stitch_dtype`` (half precision by default: 14 channels of a whole abdominal CT in float32 are
several GB). Optional test-time augmentation averages the probabilities of the identity and the 7
other flip combinations of the three spatial axes.

Stitching device: with ``device=None`` (the default) and the network on a GPU, a CPU input is moved to
the GPU once, so windows are cut and stitched there (no per-window copy of 2K probability channels to the
host); MONAI's adaptive inferer stitches on the CPU instead for volumes above ``cpu_thresh`` voxels or
after a GPU out-of-memory error. The output then lives on the GPU (or the CPU after a fallback): the
inference config moves the thresholded masks to the CPU. ``device="cpu"`` forces CPU stitching.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInfererAdapt

from scripts.networks.acceleration import (
    DEFAULT_COMPILE_CACHE,
    autocast,
    compile_dynamic_heads,
    compile_network,
    input_to_channels_last,
    resolve_precision,
    to_channels_last,
)
from scripts.tasks import TaskSpec, resolve_tasks
from scripts.utils import as_bool, set_threads

__all__ = ["TaskSlidingWindowInferer", "flip_combinations"]


def flip_combinations(spatial_dims: int = 3) -> List[Tuple[int, ...]]:
    """All subsets of the spatial axes of a (B, C, *spatial) tensor, identity first (8 for 3-D)."""
    axes = range(2, 2 + spatial_dims)
    return [combo for r in range(spatial_dims + 1) for combo in itertools.combinations(axes, r)]


class _TaskProbabilities(torch.nn.Module):
    """Wraps the network for one window batch: (B, 1, h, w, d) -> probabilities (B, 2K, h, w, d).

    The window arrives in the stitching dtype and is cast to ``compute_dtype`` for the network (in
    channels-last layout when ``channels_last``, under autocast for ``precision`` "bf16"/"fp16"); the
    sigmoid, taken in float32, is cast back to the stitching dtype.
    """

    def __init__(
        self,
        network: Callable[..., torch.Tensor],
        task_id: torch.Tensor,
        compute_dtype: torch.dtype,
        precision: str = "fp32",
        channels_last: bool = False,
    ):
        super().__init__()
        self.network = network
        self.task_id = task_id
        self.compute_dtype = compute_dtype
        self.precision = precision
        self.channels_last = channels_last

    def forward(self, window: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        kwargs.setdefault("task_id", self.task_id.to(window.device))
        image = window.to(self.compute_dtype)
        if self.channels_last:
            image = input_to_channels_last(image)
        with autocast(window.device, self.precision):
            logits = self.network(image, *args, **kwargs)
        return torch.sigmoid(logits.float()).to(window.dtype)


class TaskSlidingWindowInferer(SlidingWindowInfererAdapt):
    """Sliding-window DoDNet inference for a selection of tasks, with optional flip TTA.

    Args:
        roi_size: window size (H, W, D); every size divisible by 16 (default [192, 192, 64]).
        tasks: task selection for ``scripts.tasks.resolve_tasks``: "all", None, names, ids, or a
            comma-separated string ("liver,kidney").
        tta: average the sigmoid outputs over the 8 flip combinations (8x the compute).
        sw_batch_size: windows per network call.
        overlap: window overlap (0.5).
        mode: blending, "gaussian" (sigma = ``sigma_scale`` x window size) or "constant".
        sigma_scale: Gaussian sigma relative to the window (0.125 = 1/8, as the authors).
        stitch_dtype: dtype of the stitched probabilities ("float16" halves the host memory).
        compute_dtype: dtype the network runs in (float32).
        precision: "auto" (bf16 where the device computes it natively, else fp32), "fp32" (default), "bf16" or
            "fp16" (GPUs): autocast
            of the network (see ``scripts.networks.acceleration``).
        channels_last: run the network in channels-last 3-D layout (faster oneDNN/cuDNN convolutions);
            converts the network's parameters in place on the first call.
        compile_head: run the dynamic heads as one ``torch.compile``-fused kernel per task (same results;
            a few seconds of compiling on the first window; needs a C++ compiler on the CPU).
        compile_network: run the whole network through ``torch.compile`` (fuses the normalizations,
            activations, casts and heads around the convolutions; compiles for tens of seconds on the first
            window on a machine, reused from ``compile_cache`` by later processes). Supersedes ``compile_head``.
        compile_cache: folder keeping ``compile_network``'s compiled kernels between processes.
        padding_mode, cval: padding of images smaller than one window (undone in the output).
        sw_device: device of the windows (the network's device).
        device: device of the stitched output. None (default): adaptive, as MONAI's ``SlidingWindowInfererAdapt``:
            on ``sw_device`` when it is a GPU (the input is moved there), else on the input's device; buffered
            CPU stitching above ``cpu_thresh`` voxels or after running out of GPU memory.
        progress: per-window progress bar.
        cpu_thresh: stitch on the CPU when the volume has more voxels than this (None: only after an OOM).
        buffer_steps, buffer_dim: as ``SlidingWindowInferer``.
        threads: CPU threads of torch and ITK for this process, set when the inferer is built
            (``scripts.utils.set_threads``; 0: the CPUs the process may use). None (default): left as they are.
            inference.json passes its ``threads`` here, so every consumer of the config that builds the inferer
            (``monai.bundle run``, ``dodnet-segment``, MONAI Label's ``BundleInferTask``, which runs no
            ``initialize``) gets the setting.

    Call:
        inputs: (B, 1, H, W, D) preprocessed CT, any size (padded internally to one window).
        network: DoDNet or any module taking ``(image, task_id=(1, K) int64)`` -> (B, 2K, ...) logits.

    Returns:
        probabilities (B, 2K, H, W, D) in ``stitch_dtype`` on the stitching device, a ``MetaTensor`` carrying the
        input's metadata when the input is one; channel ``2k`` organ, ``2k + 1`` tumor of ``self.tasks[k]``.
    """

    def __init__(
        self,
        roi_size: Union[Sequence[int], int] = (192, 192, 64),
        tasks: Union[None, str, int, Sequence[Union[str, int]]] = "all",
        tta: Union[bool, str] = False,
        sw_batch_size: int = 1,
        overlap: Union[Sequence[float], float] = 0.5,
        mode: str = "gaussian",
        sigma_scale: Union[Sequence[float], float] = 0.125,
        stitch_dtype: Union[str, torch.dtype] = "float16",
        compute_dtype: Union[str, torch.dtype] = "float32",
        precision: str = "fp32",
        channels_last: Union[bool, str] = False,
        compile_head: Union[bool, str] = False,
        compile_network: Union[bool, str] = False,
        compile_cache: Optional[str] = DEFAULT_COMPILE_CACHE,
        padding_mode: str = "constant",
        cval: float = 0.0,
        sw_device: Union[torch.device, str, None] = None,
        device: Union[torch.device, str, None] = None,
        progress: bool = False,
        cpu_thresh: Optional[int] = None,
        buffer_steps: Optional[int] = None,
        buffer_dim: int = -1,
        threads: Optional[Union[int, str]] = None,
    ) -> None:
        if threads is not None:
            set_threads(threads)
        super().__init__(
            roi_size=roi_size,
            sw_batch_size=sw_batch_size,
            overlap=overlap,
            mode=mode,
            sigma_scale=sigma_scale,
            padding_mode=padding_mode,
            cval=cval,
            sw_device=sw_device,
            device=device,
            progress=progress,
            cpu_thresh=cpu_thresh,
            buffer_steps=buffer_steps,
            buffer_dim=buffer_dim,
        )
        self.tasks: Tuple[TaskSpec, ...] = resolve_tasks(tasks)
        self.tta = as_bool(tta)
        self.stitch_dtype = _dtype(stitch_dtype)
        self.compute_dtype = _dtype(compute_dtype)
        resolve_precision(precision, "cpu")  # reject unknown names when the config is parsed
        self.precision = precision
        self.channels_last = as_bool(channels_last)
        self.compile_head = as_bool(compile_head)
        self.compile_network = as_bool(compile_network)
        self.compile_cache = compile_cache

    @property
    def task_id(self) -> torch.Tensor:
        """The selected task ids as an int64 (1, K) tensor (applied to every window)."""
        return torch.tensor([[t.id for t in self.tasks]], dtype=torch.long)

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        if inputs.dim() != 5:
            raise ValueError(f"inputs must be (B, C, H, W, D), got shape {tuple(inputs.shape)}")
        if self.channels_last and isinstance(network, torch.nn.Module):
            to_channels_last(network)
        if self.compile_network:
            network = compile_network(network, self.compile_cache)  # the heads are traced into the compiled graph
        elif self.compile_head and isinstance(network, torch.nn.Module):
            compile_dynamic_heads(network)
        predictor = _TaskProbabilities(
            network, kwargs.pop("task_id", self.task_id), self.compute_dtype, self.precision, self.channels_last
        )
        image = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        image = image.to(device=self._stitch_input_device(image), dtype=self.stitch_dtype)
        flips = flip_combinations(image.dim() - 2) if self.tta else [()]
        total: Optional[torch.Tensor] = None
        for dims in flips:
            out = super().__call__(image.flip(dims) if dims else image, predictor, *args, **kwargs)
            out = out.as_tensor() if isinstance(out, MetaTensor) else out
            if total is None:
                total = out.flip(dims) if dims else out
                continue
            if out.device != total.device:  # a later flip fell back to CPU stitching after a GPU OOM
                total, out = total.cpu(), out.cpu()
            for c in range(out.shape[1]):  # per channel: no second full-size temporary
                total[:, c] += out[:, c].flip([d - 1 for d in dims]) if dims else out[:, c]
            del out
        assert total is not None
        if len(flips) > 1:
            total /= len(flips)
        if isinstance(inputs, MetaTensor):
            return MetaTensor(total, meta=inputs.meta, applied_operations=inputs.applied_operations)
        return total

    def _stitch_input_device(self, image: torch.Tensor) -> torch.device:
        """Where the input goes before the windows are cut: the GPU of ``sw_device`` for adaptive stitching
        (``device`` None), else where it is. On the GPU, volumes above ``cpu_thresh`` get MONAI's buffered
        stitching into CPU memory (several windows gathered on the GPU per copy)."""
        sw_device = torch.device(self.sw_device) if self.sw_device is not None else image.device
        if self.device is None and sw_device.type == "cuda":
            return sw_device
        return image.device


def _dtype(value: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {value!r}")
    return dtype
