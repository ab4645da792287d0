"""The dynamic head as one compiled elementwise kernel, run once per task, for inference.

The eager :class:`~scripts.networks.dynamic_head.DynamicHead` runs its layers as batched 8 x 8 matrix
products, each a pass over the map in memory with little arithmetic per byte: on a 2-core CPU seven
eager heads take about 85 ms of a 2.1 s bf16 forward of a [192, 192, 64] patch, 5x one head. Written
as explicit multiply-adds over the channels, the layers of one head are elementwise code that
``torch.compile`` (Inductor: a C++/OpenMP loop on the CPU, a Triton kernel on CUDA) fuses into a
single loop: the map is read once, the hidden activations stay in registers (float32 arithmetic for
bf16/fp16 inputs) and only the head's 2 output channels are written, straight into their slice of the
K-task output. One compiled graph serves every task and every K.

Compiling takes a few seconds per input shape and dtype (cached by PyTorch across runs) and needs a C++
compiler on the CPU. Where compiling fails the head warns once and stays eager.
"""

from __future__ import annotations

import warnings
from typing import Callable, List, Optional

import torch

__all__ = ["pointwise_head", "fused_head", "fused_head_status"]


def pointwise_head(x: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor]) -> torch.Tensor:
    """One dynamic head written as elementwise multiply-adds (the form ``torch.compile`` fuses).

    Args:
        x: (B, C, N) map, N voxels.
        weights: per layer (B, C_out, C_in) kernels of this head.
        biases: per layer (B, C_out) biases.

    Returns:
        (B, C_out of the last layer, N) logits; ReLU between layers, none after the last.
    """
    hidden = [x[:, c] for c in range(x.shape[1])]  # C tensors of (B, N)
    last = len(weights) - 1
    for layer, (weight, bias) in enumerate(zip(weights, biases)):
        outputs = []
        for o in range(weight.shape[1]):
            acc = bias[:, o, None] + weight[:, o, 0, None] * hidden[0]
            for i in range(1, weight.shape[2]):
                acc = acc + weight[:, o, i, None] * hidden[i]
            outputs.append(acc if layer == last else torch.relu(acc))
        hidden = outputs
    return torch.stack(hidden, 1)


def _head_into(out: torch.Tensor, x: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor]) -> None:
    """``pointwise_head`` written into ``out`` (B, C_out, N), a channel slice of the K-task output: the
    compiled kernel stores there directly, with no per-task temporary and no concatenation."""
    out.copy_(pointwise_head(x, weights, biases))


_compiled: Optional[Callable[..., None]] = None
_failure: Optional[str] = None


def fused_head_status() -> str:
    """``"not compiled yet"``, ``"compiled"`` or ``"unavailable: <reason>"`` (for logs and tests)."""
    if _failure is not None:
        return f"unavailable: {_failure}"
    return "compiled" if _compiled is not None else "not compiled yet"


def fused_head(
    features: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor]
) -> Optional[torch.Tensor]:
    """All K heads of a batch through the compiled kernel, or ``None`` where compiling is unavailable.

    Args:
        features: (B, C, H, W, D) pre-segmentation map (any memory format).
        weights: per layer (B, K, C_out, C_in) kernels; biases: per layer (B, K, C_out).

    Returns:
        (B, K * C_out, H, W, D) logits, contiguous, channels ``[2k, 2k + 1]`` of the k-th task (as the
        eager head), or ``None`` after a compile failure (warned once).
    """
    global _compiled, _failure
    if _failure is not None:
        return None
    if _compiled is None:
        _compiled = torch.compile(_head_into, dynamic=False)
    batch, channels, tasks = features.shape[0], features.shape[1], weights[0].shape[1]
    head_out = weights[-1].shape[2]
    x = features.reshape(batch, channels, -1).contiguous()  # one (B, C, N) copy shared by the K heads
    out = torch.empty((batch, tasks * head_out, x.shape[2]), dtype=x.dtype, device=x.device)
    try:
        for k in range(tasks):  # one compiled graph serves every task (and every K)
            head_weights = [w[:, k].contiguous() for w in weights]
            head_biases = [b[:, k].contiguous() for b in biases]
            _compiled(out[:, k * head_out : (k + 1) * head_out], x, head_weights, head_biases)
    except Exception as error:  # no C++ compiler, unsupported backend: the eager head still works
        _failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        warnings.warn(f"compiling the dynamic head failed ({_failure}); using the eager head", stacklevel=2)
        return None
    return out.reshape([batch, out.shape[1]] + list(features.shape[2:]))
