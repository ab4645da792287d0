"""The dynamic segmentation head: 1x1x1 convolutions whose weights come from the controller."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from .fused_head import fused_head

__all__ = ["DynamicHead"]


class DynamicHead(nn.Module):
    """Applies a small stack of generated 1x1x1 convolutions, one stack per sample and task.

    Layer widths are ``in_channels -> width -> ... -> width -> out_channels`` with ``depth`` layers
    (8-8-8-2 in the paper: depth 3, width 8), ReLU between layers and none after the last. The
    parameter vector of one head is laid out as the authors' controller emits it: all kernels
    first (layer by layer, output-major: ``w[o, i] = params[o * c_in + i]``), then all biases.

    The head has no learnable parameters of its own. The first layers of all K heads of a sample
    form one matrix, so the pre-segmentation map is read once for every task; the rest run as
    batched matrix products over chunks of ``chunk_voxels`` voxels, which stay cache-resident. With autograd on
    (training) every layer is one batched product over the whole map, which keeps the backward pass lean.

    With ``compiled`` set (``scripts.networks.acceleration.compile_dynamic_heads``, the inference config's
    ``compile_head``), inference without autograd runs each head as one kernel fused by ``torch.compile``
    (``scripts.networks.fused_head``): the same logits up to rounding, a fraction of the memory traffic.
    Training and TorchScript always use the eager head.

    Args:
        in_channels: channels of the pre-segmentation map (8).
        width: hidden channels (4-16; 8 in the paper).
        depth: number of layers (2-4; 3 in the paper).
        out_channels: outputs per task (2: organ, tumor).
        chunk_voxels: voxels processed per step (memory/cache trade-off only; results do not depend on it).

    Forward: features (B, in_channels, H, W, D), params (B, K, num_params) -> logits (B, K * out_channels,
    H, W, D), channels ``[2k, 2k + 1]`` belonging to the k-th requested task.
    """

    def __init__(
        self, in_channels: int = 8, width: int = 8, depth: int = 3, out_channels: int = 2, chunk_voxels: int = 32768
    ) -> None:
        super().__init__()
        if not 2 <= depth <= 4:
            raise ValueError(f"dynamic head depth must be in [2, 4], got {depth}")
        if not 4 <= width <= 16:
            raise ValueError(f"dynamic head width must be in [4, 16], got {width}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        dims = [in_channels] + [width] * (depth - 1) + [out_channels]
        self.layer_shapes: List[Tuple[int, int]] = [(dims[i + 1], dims[i]) for i in range(depth)]
        self.num_params = sum(o * i + o for o, i in self.layer_shapes)
        self.chunk_voxels = chunk_voxels
        self.compiled = False

    def param_fan_in(self) -> torch.Tensor:
        """(num_params,) int64: for each parameter of a head, the input channels of its layer (0 for biases)."""
        kernels = [torch.full((c_out * c_in,), c_in, dtype=torch.long) for c_out, c_in in self.layer_shapes]
        biases = [torch.zeros(c_out, dtype=torch.long) for c_out, _ in self.layer_shapes]
        return torch.cat(kernels + biases)

    def split_params(self, params: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Split (B, K, num_params) into per-layer kernels (B, K, C_out, C_in) and biases (B, K, C_out)."""
        batch, tasks = params.shape[0], params.shape[1]
        weights: List[torch.Tensor] = []
        biases: List[torch.Tensor] = []
        start = 0
        for c_out, c_in in self.layer_shapes:
            weights.append(params[:, :, start : start + c_out * c_in].reshape(batch, tasks, c_out, c_in))
            start += c_out * c_in
        for c_out, _ in self.layer_shapes:
            biases.append(params[:, :, start : start + c_out])
            start += c_out
        return weights, biases

    @torch.jit.unused
    def _fused(
        self, features: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor]
    ) -> Optional[torch.Tensor]:
        return fused_head(features, weights, biases)

    def forward(self, features: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        batch, channels = features.shape[0], features.shape[1]
        spatial = features.shape[2:]
        tasks = params.shape[1]
        weights, biases = self.split_params(params.to(features.dtype))
        if self.compiled and not torch.jit.is_scripting() and not torch.is_grad_enabled():
            fused = self._fused(features, weights, biases)
            if fused is not None:
                return fused
        x = features.reshape(batch, channels, -1)  # (B, C, N)
        num_voxels = x.shape[2]
        if torch.is_grad_enabled():  # training: whole-map batched products (chunks written into slices of one
            # output would make autograd zero-fill a full-size gradient per chunk in the backward pass)
            y = torch.baddbmm(biases[0].reshape(batch, -1, 1), weights[0].reshape(batch, -1, channels), x)
            y = y.reshape(batch * tasks, self.layer_shapes[0][0], num_voxels)  # (B * K, width, N)
            for i in range(1, len(weights)):
                c_out, c_in = self.layer_shapes[i]
                w = weights[i].reshape(batch * tasks, c_out, c_in)
                y = torch.baddbmm(biases[i].reshape(batch * tasks, c_out, 1), w, y.relu())
            return y.reshape([batch, tasks * self.out_channels] + list(spatial))
        out = torch.empty(0)
        for b in range(batch):
            # layer 1 of all K heads is one (K * width, C) matrix: the map is read once for every task
            w_first = weights[0][b].reshape(-1, channels)
            b_first = biases[0][b].reshape(-1, 1)
            for start in range(0, num_voxels, self.chunk_voxels):
                y = torch.addmm(b_first, w_first, x[b, :, start : start + self.chunk_voxels])
                y = y.reshape(tasks, self.layer_shapes[0][0], -1)  # (K, width, n)
                for i in range(1, len(weights)):
                    y = torch.baddbmm(biases[i][b].unsqueeze(-1), weights[i][b], y.relu_())
                if out.numel() == 0:
                    out = torch.empty((batch, tasks * self.out_channels, num_voxels), dtype=y.dtype, device=y.device)
                out[b, :, start : start + self.chunk_voxels] = y.reshape(tasks * self.out_channels, -1)
        return out.reshape([batch, tasks * self.out_channels] + list(spatial))
