"""Loading trained DoDNet weights for inference, never silently running with random weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Union

import torch
from torch import nn

__all__ = ["MissingWeightsError", "read_state_dict", "load_network_weights"]


class MissingWeightsError(FileNotFoundError):
    """The checkpoint file is missing; the message says how to get weights."""


def _how_to_get_weights(path: Path) -> str:
    return (
        f"model weights not found: {path}. DoDNet never segments with random weights. Get weights by "
        "(a) training: python -m monai.bundle run --config_file configs/train.json (writes models/model.pt), or "
        "(b) converting the authors' released checkpoint, in the bundle folder: python -m "
        "scripts.networks.convert_official_checkpoint --src MOTS_DynConv_checkpoint.pth --dst models/model.pt "
        "(and merge configs/official_weights.json for its spacing); or point ckpt_path "
        "(dodnet-segment --ckpt FILE) at an existing weights file."
    )


def read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Read a state dict saved as ``{"model": state_dict}`` or as a plain state dict (``weights_only=True``).

    A leading ``module.`` (DataParallel/DDP) is stripped from every key.

    Raises:
        MissingWeightsError: when the file does not exist.
        ValueError: when the file holds no tensor state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingWeightsError(_how_to_get_weights(p))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{p}: not a readable weights file ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{p}: expected a state dict or {{'model': state_dict}} of tensors")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_network_weights(network: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load the checkpoint at ``path`` into ``network`` (strict: every key must match) and return it."""
    state = read_state_dict(path)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{path}: the weights do not fit the network defined by network_def (wrong network_def "
            f"overrides or a checkpoint of another model?): {e}"
        ) from e
    return network
