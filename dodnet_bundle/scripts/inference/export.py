"""Export the all-task DoDNet to ONNX (image in, 14 logit channels out) for runtimes without PyTorch.

Exporters such as ONNX, TensorRT and Triton need tensor-only inputs; :class:`AllTasksNetwork` wraps
:class:`scripts.networks.DoDNet` with ``task_id=None`` so one call returns every task's organ and
tumor logits. :func:`prepare_for_export` folds weight standardization into plain convolution
kernels and swaps in a batched dynamic head, so the graph holds one copy of the weights and no
output-sized constants. The ONNX graph has a fixed input shape (the sliding-window ROI and batch
size it is exported for): the legacy exporter bakes shape arithmetic into the graph, and
onnxruntime rejects any other shape instead of computing a wrong answer. TorchScript needs no
wrapper: ``python -m monai.bundle ckpt_export network_def ...`` scripts the network with its
optional ``task_id``.

Usage (from the bundle root)::

    python -m scripts.inference.export --ckpt_file models/model.pt --filepath models/model.onnx \
        --roi_size "[192,192,64]"
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from scripts.networks import DynamicHead, WSConv3d, standardize_weight
from scripts.utils import atomic_output

__all__ = [
    "AllTasksNetwork",
    "BatchedDynamicHead",
    "prepare_for_export",
    "fold_weight_standardization",
    "load_weights",
    "export_onnx",
]


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


def load_weights(network: nn.Module, ckpt_file: str) -> nn.Module:
    """Load ``ckpt_file`` (a state dict, or one under ``"model"``) into ``network`` with weights_only=True."""
    path = Path(ckpt_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: refused to load: not a weights-only PyTorch checkpoint: {e}") from e
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    try:
        network.load_state_dict(state, strict=True)
    except (RuntimeError, AttributeError, TypeError) as e:
        raise ValueError(f"{path}: does not fit the configured network_def: {e}") from e
    return network


def export_onnx(
    filepath: str = "models/model.onnx",
    ckpt_file: Optional[str] = "models/model.pt",
    roi_size: Sequence[int] = (192, 192, 64),
    batch_size: int = 1,
    opset_version: int = 17,
    bundle_root: Optional[str] = None,
    config_file: Optional[str] = None,
    network_args: Optional[Dict[str, Any]] = None,
) -> str:
    """Export the all-task network to ONNX with input ``image`` (batch_size, 1, *roi_size) and output ``pred``.

    Args:
        filepath: the ONNX file to write (atomically).
        ckpt_file: weights to load (None exports the randomly initialized network, for tests).
        roi_size: spatial input size (H, W, D), each divisible by 16; use the sliding-window ROI.
        batch_size: fixed batch size (the sliding window's ``sw_batch_size``).
        opset_version: ONNX opset.
        bundle_root: the bundle folder (default: the folder holding this ``scripts`` package).
        config_file: config(s) defining ``network_def`` (default ``configs/inference.json``).
        network_args: overrides of ``network_def`` arguments (e.g. ``{"base_channels": 8}``).

    Returns:
        the written path.
    """
    from scripts.networks.convert_official_checkpoint import build_network

    network = build_network(bundle_root, config_file, network_args=network_args)
    if ckpt_file:
        load_weights(network, ckpt_file)
    model = AllTasksNetwork(prepare_for_export(network)).eval()
    image = torch.zeros(batch_size, network.in_channels, *[int(s) for s in roi_size])
    network.check_image(image)  # a clear error for sizes not divisible by 16, before exporting
    out = Path(filepath)
    with atomic_output(out, mode=0o644) as tmp:  # an exported model is meant to be shared
        with torch.no_grad():
            torch.onnx.export(
                model,
                (image,),
                str(tmp),
                dynamo=False,
                input_names=["image"],
                output_names=["pred"],
                opset_version=opset_version,
            )
    print(f"exported {out}: image {tuple(image.shape)} -> pred ({batch_size}, {2 * network.num_tasks}, ...)")
    return str(out)


def main() -> None:
    import fire

    fire.Fire(export_onnx)


if __name__ == "__main__":
    main()
