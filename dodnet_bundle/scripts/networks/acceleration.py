"""Fast inference paths: channels-last 3-D memory format and bf16/fp16 autocast, selected by name.

``precision``: ``"fp32"`` (default), ``"bf16"`` (CPUs with AVX-512 bf16/AMX, and GPUs) or ``"fp16"``
(GPUs). Channels-last 3-D lets oneDNN (CPU) and cuDNN (GPU) pick their fastest convolution kernels.
``compile_dynamic_heads`` switches the dynamic heads to their ``torch.compile``-fused inference kernel;
``compile_network`` compiles the whole network (Inductor fuses each GroupNorm with its ReLU, the autocast
casts and the dynamic heads around the convolutions).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import nn

from .dynamic_head import DynamicHead

__all__ = [
    "PRECISIONS",
    "autocast",
    "to_channels_last",
    "input_to_channels_last",
    "compile_dynamic_heads",
    "compile_network",
]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device | str, precision: str = "fp32") -> ContextManager:
    """An autocast context for ``precision`` on ``device`` (a no-op context for fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
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


def compile_network(network: nn.Module) -> nn.Module:
    """``torch.compile(network)`` with static shapes, made once per network and reused on later calls.

    Compiling happens on the first forward of each new input shape (tens of seconds for the full
    network); the compiled module shares the network's parameters. Channels-last conversion, if any,
    must come first. Raises ``ValueError`` for a TorchScript module or anything that is not an
    ``nn.Module`` (a TensorRT engine, a function).
    """
    if not isinstance(network, nn.Module) or isinstance(network, torch.jit.ScriptModule):
        raise ValueError(f"compile_network: cannot torch.compile a {type(network).__name__}")
    compiled = network.__dict__.get("_compiled_network")
    if compiled is None:
        compiled = torch.compile(network, dynamic=False)
        network.__dict__["_compiled_network"] = compiled  # not a submodule: absent from state_dict and modules()
    return compiled
