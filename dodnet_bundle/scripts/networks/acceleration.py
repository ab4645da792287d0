"""Fast inference paths: channels-last 3-D memory format and bf16/fp16 autocast, selected by name.

``precision``: ``"auto"`` (bf16 where the device computes it natively: CUDA GPUs that support it, CPUs with
AVX-512 BF16 or AMX-BF16 instructions; fp32 elsewhere), ``"fp32"``, ``"bf16"`` or ``"fp16"`` (GPUs).
Channels-last 3-D lets oneDNN (CPU) and cuDNN (GPU) pick their fastest convolution kernels.
``compile_dynamic_heads`` switches the dynamic heads to their ``torch.compile``-fused inference kernel;
``compile_network`` compiles the whole network (Inductor fuses each GroupNorm with its ReLU, the autocast
casts and the dynamic heads around the convolutions).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import warnings
from pathlib import Path
from typing import ContextManager, FrozenSet, Optional, Union

import torch
from torch import nn

from .dynamic_head import DynamicHead

__all__ = [
    "PRECISIONS",
    "NATIVE_BF16_CPU_FLAGS",
    "cpu_flags",
    "cpu_name",
    "cpu_has_native_bf16",
    "onednn_runs_bf16",
    "resolve_precision",
    "autocast",
    "to_channels_last",
    "input_to_channels_last",
    "compile_dynamic_heads",
    "compile_network",
    "use_compile_cache",
    "DEFAULT_COMPILE_CACHE",
]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU instructions that compute bf16 natively (oneDNN otherwise emulates it, slower than fp32)."""


@functools.lru_cache(maxsize=1)
def cpu_flags() -> FrozenSet[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where that file does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(word for line in text.splitlines() if line.startswith("flags") for word in line.split()[2:])


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform``'s processor or machine name elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def onednn_runs_bf16() -> bool:
    """Whether oneDNN will use its AVX-512 bf16 kernels in this process: False without oneDNN or where
    ``ONEDNN_MAX_CPU_ISA`` caps it below AVX-512 (bf16 is then emulated, several times slower than fp32)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is None:  # a PyTorch without the query: the CPU flags decide
        return True
    try:
        return bool(torch.backends.mkldnn.is_available() and check())
    except RuntimeError:
        return False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has AVX-512 BF16 or AMX-BF16 (``NATIVE_BF16_CPU_FLAGS``) and oneDNN may use them."""
    return any(flag in cpu_flags() for flag in NATIVE_BF16_CPU_FLAGS) and onednn_runs_bf16()


def resolve_precision(precision: str, device: Union[str, torch.device]) -> str:
    """``"auto"`` -> ``"bf16"`` where ``device`` computes bf16 natively, else ``"fp32"``; other names are checked
    and kept."""
    if precision == "auto":
        device = torch.device(device)
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto' or one of {sorted(PRECISIONS)}, got {precision!r}")
    return precision


def autocast(device: torch.device | str, precision: str = "fp32") -> ContextManager:
    """An autocast context for ``precision`` (``"auto"`` resolved for ``device``) on ``device`` (a no-op context
    for fp32)."""
    precision = resolve_precision(precision, device)
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    if device_type == "cpu" and dtype == torch.float16:
        raise ValueError("fp16 autocast is for GPUs; use precision 'bf16' on the CPU")
    return torch.autocast(device_type=device_type, dtype=dtype)


def to_channels_last(network: nn.Module) -> nn.Module:
    """Store the network's 5-D parameters channels-last (in place); returns the network."""
    return network.to(memory_format=torch.channels_last_3d)


def input_to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """A 5-D input in channels-last 3-D layout (other tensors unchanged)."""
    return x.contiguous(memory_format=torch.channels_last_3d) if x.dim() == 5 else x


def compile_dynamic_heads(network: nn.Module, enabled: bool = True) -> nn.Module:
    """Run every ``DynamicHead`` of ``network`` as its compiled fused kernel during inference (in place).

    Raises ``ValueError`` when ``enabled`` and the network has no dynamic head (a TorchScript or
    TensorRT module, another architecture): the setting would silently do nothing.
    """
    heads = [m for m in network.modules() if isinstance(m, DynamicHead)]
    if enabled and not heads:
        raise ValueError(f"compile_head: {type(network).__name__} has no DoDNet dynamic head to compile")
    for head in heads:
        head.compiled = enabled
    return network


DEFAULT_COMPILE_CACHE = "~/.cache/dodnet/torchinductor"
"""Where compiled kernels are kept between processes (PyTorch's own default lies in /tmp, often wiped)."""


def use_compile_cache(cache_dir: Optional[str] = DEFAULT_COMPILE_CACHE) -> Optional[str]:
    """Keep ``torch.compile``'s artifacts (Inductor's FX-graph and kernel caches) in ``cache_dir``, so a later
    process on this machine reuses them instead of compiling again; an explicit ``TORCHINDUCTOR_CACHE_DIR`` in the
    environment wins; a folder that cannot be created or written is named in a warning and left out. Returns the
    folder in use (None: PyTorch's default)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current and os.path.abspath(current) != os.path.abspath(default_cache_dir()):
        return current  # the user's own choice (Inductor writes its default into the environment when first used)
    if not cache_dir:
        return current
    folder = os.path.abspath(os.path.expanduser(str(cache_dir)))
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"{folder} is not writable")
    except OSError as error:  # a read-only or full home: compile as before, without keeping the kernels
        warnings.warn(f"compile_cache {folder} cannot be used ({error}); compiled kernels stay in PyTorch's default")
        return current
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder  # read by Inductor when it first compiles
    return folder


def compile_network(network: nn.Module, cache_dir: Optional[str] = DEFAULT_COMPILE_CACHE) -> nn.Module:
    """``torch.compile(network)`` with static shapes, made once per network and reused on later calls.

    Compiling happens on the first forward of each new input shape (tens of seconds for the full network the
    first time on a machine; the artifacts kept in ``cache_dir`` (``use_compile_cache``) make later processes
    reuse them); the compiled module shares the network's parameters. Channels-last conversion, if any, must
    come first. Raises ``ValueError`` for a TorchScript module or anything that is not an ``nn.Module`` (a
    TensorRT engine, a function).
    """
    if not isinstance(network, nn.Module) or isinstance(network, torch.jit.ScriptModule):
        raise ValueError(f"compile_network: cannot torch.compile a {type(network).__name__}")
    compiled = network.__dict__.get("_compiled_network")
    if compiled is None:
        use_compile_cache(cache_dir)
        compiled = torch.compile(network, dynamic=False)
        network.__dict__["_compiled_network"] = compiled  # not a submodule: absent from state_dict and modules()
    return compiled
