"""Export the all-task DoDNet to ONNX (image in, 14 logit channels out) for runtimes without PyTorch.

The exported network is ``scripts.networks.export_variants.prepare_for_export`` of the trained DoDNet
wrapped in ``AllTasksNetwork`` (tensor-only input, all tasks' logits out). The ONNX graph has a fixed input
shape (the sliding-window ROI and batch size it is exported for): the legacy exporter bakes shape arithmetic
into the graph, and onnxruntime rejects any other shape instead of computing a wrong answer. TorchScript needs
no wrapper: ``python -m monai.bundle ckpt_export network_def ...`` scripts the network with its
optional ``task_id``.

Usage (from the bundle root)::

    python -m scripts.inference.export --ckpt_file models/model.pt --filepath models/model.onnx \
        --roi_size "[192,192,64]"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from scripts.networks.export_variants import AllTasksNetwork, prepare_for_export
from scripts.networks.weights import load_network_weights
from scripts.utils import atomic_output

__all__ = ["export_onnx"]


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
        load_network_weights(network, ckpt_file)
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


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m scripts.inference.export --ckpt FILE --out FILE ...``: ``export_onnx``'s arguments as flags."""
    from scripts.cli_errors import fire_call, run_cli

    run_cli("export", lambda args: fire_call("export", export_onnx, args), argv)


if __name__ == "__main__":
    main()
