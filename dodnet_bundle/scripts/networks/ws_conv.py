"""Weight-standardized 3-D convolution, as used throughout DoDNet's encoder-decoder."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["WSConv3d", "standardize_weight", "make_conv3d"]


def standardize_weight(weight: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Standardize a convolution kernel per output channel.

    ``w' = (w - mean(w)) / sqrt(var_unbiased(w) + eps)`` with the statistics taken over the
    input-channel and spatial axes (all but axis 0), as in the authors' implementation.

    Args:
        weight: kernel of shape (C_out, C_in, k1, k2, k3).
        eps: added to the variance.

    Returns:
        a tensor of the same shape and dtype.
    """
    flat = weight.reshape(weight.shape[0], -1)
    mean = flat.mean(dim=1)
    var = flat.var(dim=1, unbiased=True)
    shape = [weight.shape[0]] + [1] * (weight.dim() - 1)
    return (weight - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps)


class WSConv3d(nn.Conv3d):
    """``nn.Conv3d`` whose kernel is standardized (see :func:`standardize_weight`) on every call.

    The stored parameter is the raw kernel, so a checkpoint of the authors' layout loads as is.
    Without autograd (inference) the standardized kernel is a constant: it is computed once and reused
    until the raw kernel changes (a new tensor, or an in-place update such as ``load_state_dict``).
    Input (B, C_in, H, W, D) -> output (B, C_out, H', W', D') exactly as ``nn.Conv3d``.
    """

    __jit_ignored_attributes__ = ["_standardized"]

    def __init__(self, *args, eps: float = 1e-12, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if not torch.is_grad_enabled():
                return self._conv_forward(x, self._standardized_constant(), self.bias)
        return self._conv_forward(x, standardize_weight(self.weight, self.eps), self.bias)

    @torch.jit.unused
    def _standardized_constant(self) -> torch.Tensor:
        w = self.weight
        if torch.compiler.is_compiling():  # traced into the compiled graph (no cache lookup: no graph break)
            return standardize_weight(w, self.eps)
        if w.is_inference():  # created under torch.inference_mode: no version counter to watch
            return standardize_weight(w, self.eps)
        key = (w.data_ptr(), w._version, w.dtype, w.device, w.shape, w.stride(), self.eps)
        cached = self.__dict__.get("_standardized")
        if cached is None or cached[0] != key:
            cached = (key, standardize_weight(w.detach(), self.eps))
            self.__dict__["_standardized"] = cached
        return cached[1]


def make_conv3d(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, weight_std: bool = True
) -> nn.Conv3d:
    """A bias-free 3-D convolution with "same" padding for odd kernels, weight-standardized or plain."""
    conv_type = WSConv3d if weight_std else nn.Conv3d
    return conv_type(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
