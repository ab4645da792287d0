"""Network variants for graph exporters (ONNX, TensorRT, Triton): tensor-only inputs, folded weight
standardization and a batched dynamic head.

:class:`AllTasksNetwork` wraps :class:`scripts.networks.DoDNet` with ``task_id=None`` so one call returns every
task's organ and tumor logits. :func:`prepare_for_export` folds weight standardization into plain convolution
kernels and swaps in :class:`BatchedDynamicHead`, so the graph holds one copy of the weights and no
output-sized constants. ``scripts.inference.export`` writes the ONNX file.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .dynamic_head import DynamicHead
from .ws_conv import WSConv3d, standardize_weight

__all__ = ["AllTasksNetwork", "BatchedDynamicHead", "prepare_for_export", "fold_weight_standardization"]


class AllTasksNetwork(nn.Module):
    """A DoDNet with the task fixed to "all tasks", for exporters that need tensor-only inputs.

    Forward: image (B, C, H, W, D) -> logits (B, 2 * num_tasks, H, W, D); channel ``2k`` is the organ
    and ``2k + 1`` the tumor logit of task ``k`` (task order of ``scripts.tasks.TASKS``).
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.network(image, None)


def fold_weight_standardization(network: nn.Module) -> nn.Module:
    """A copy of ``network`` whose ``WSConv3d`` layers are plain ``nn.Conv3d`` with standardized kernels.

    Weight standardization depends only on the weights, so at inference it can be computed once:
    the copy gives the same outputs (to float rounding) and exports to a graph of plain convolutions,
    without the per-call mean/variance of every kernel (a quarter of the size, faster in any runtime).
    """
    folded = copy.deepcopy(network)
    for module in folded.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, WSConv3d):
                conv = nn.Conv3d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    stride=child.stride,
                    padding=child.padding,
                    dilation=child.dilation,
                    groups=child.groups,
                    bias=child.bias is not None,
                    padding_mode=child.padding_mode,
                ).to(device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    conv.weight.copy_(standardize_weight(child.weight, child.eps))
                    if child.bias is not None:
                        conv.bias.copy_(child.bias)
                setattr(module, name, conv)
    return folded


class BatchedDynamicHead(DynamicHead):
    """The dynamic head as plain batched matrix products, for graph exporters.

    Same parameters and layout as :class:`scripts.networks.DynamicHead` (it reuses ``split_params``);
    the eager head processes the map in chunks written into a preallocated output, which a traced
    graph would store as a constant of the output's size. Here every layer is one broadcast
    ``matmul`` over (B, K, C_out, N).
    """

    def forward(self, features: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        batch, channels = features.shape[0], features.shape[1]
        spatial = features.shape[2:]
        weights, biases = self.split_params(params.to(features.dtype))
        x = features.reshape(batch, 1, channels, -1)  # (B, 1, C, N), shared by the K heads
        for i in range(len(weights)):
            x = torch.matmul(weights[i], x) + biases[i].unsqueeze(-1)  # (B, K, C_out, N)
            if i < len(weights) - 1:
                x = torch.relu(x)
        return x.reshape([batch, params.shape[1] * self.out_channels] + list(spatial))


def prepare_for_export(network: nn.Module) -> nn.Module:
    """A copy of a DoDNet ready for graph export: folded weight standardization and the batched head."""
    exported = fold_weight_standardization(network)
    head = exported.head
    batched = BatchedDynamicHead(head.in_channels, head.layer_shapes[0][0], len(head.layer_shapes), head.out_channels)
    if batched.layer_shapes != head.layer_shapes:
        raise ValueError(f"unexpected dynamic head layout {head.layer_shapes}")
    exported.head = batched
    return exported
