"""Reading DoDNet checkpoints: the one reader used by inference, evaluation, fine-tuning, export and the
converter of the authors' weights. Never runs with random weights, never unpickles code.

Accepted layouts: a plain state dict; one wrapped under ``model`` / ``state_dict`` / ``network`` (MONAI and
Ignite savers, apex's ``{"model", "optimizer", "amp"}``), possibly nested; ``module.`` prefixes of
DataParallel/DDP, possibly repeated, are stripped.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import torch
from torch import nn

__all__ = ["MissingWeightsError", "WRAPPER_KEYS", "read_state_dict", "load_network_weights"]

PathLike = Union[str, os.PathLike]
WRAPPER_KEYS = ("model", "state_dict", "network")
PREFIX = "module."


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


def _strip_prefix(key: str) -> str:
    while key.startswith(PREFIX):
        key = key[len(PREFIX) :]
    return key


def read_state_dict(checkpoint: Union[PathLike, Mapping[str, Any]]) -> Dict[str, torch.Tensor]:
    """A network state dict from a checkpoint file (``torch.load(weights_only=True)``) or an in-memory dict.

    Raises:
        MissingWeightsError: the file does not exist (the message says how to get weights).
        ValueError: the file is not a weights-only PyTorch checkpoint, or holds no state dict of tensors, or two
            keys coincide once prefixes are stripped; the message names the file.
    """
    source = "checkpoint" if isinstance(checkpoint, Mapping) else str(checkpoint)
    if isinstance(checkpoint, Mapping):
        obj: Any = checkpoint
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise MissingWeightsError(_how_to_get_weights(path))
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, RuntimeError (not a zip/pickle), EOFError (truncated)...
            raise ValueError(
                f"{path}: refused to load: not a weights-only PyTorch checkpoint (torch.load(weights_only=True) "
                f"failed; a pickle holding code or custom objects is never loaded): {type(e).__name__}: {e}"
            ) from e
    for _ in range(3):  # unwrap {"model": {...}}, possibly nested once more
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not_tensors or not obj:
        raise ValueError(
            f"{source}: not a state dict of tensors (top-level keys {sorted(map(str, obj))[:10]}); "
            f"non-tensor entries: {not_tensors[:10]}; expected a plain state dict or one under "
            f"{' / '.join(repr(k) for k in WRAPPER_KEYS)}"
        )
    out: Dict[str, torch.Tensor] = OrderedDict()
    for key, value in obj.items():
        name = _strip_prefix(str(key))
        if name in out:
            raise ValueError(f"{source}: key {name!r} occurs twice once prefixes are stripped")
        out[name] = value
    return out


def load_network_weights(network: nn.Module, path: PathLike) -> nn.Module:
    """Load the checkpoint at ``path`` into ``network`` (strict: every key and shape must match) and return it."""
    state = read_state_dict(path)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{path}: the weights do not fit the network defined by network_def (wrong network_def "
            f"overrides or a checkpoint of another model?): {e}"
        ) from e
    return network
