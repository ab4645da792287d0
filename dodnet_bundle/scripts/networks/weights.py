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
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn

from .dodnet import TRAINING_ONLY_PREFIX

__all__ = ["MissingWeightsError", "CheckpointError", "WRAPPER_KEYS", "read_state_dict", "load_network_weights"]

PathLike = Union[str, os.PathLike]
WRAPPER_KEYS = ("model", "state_dict", "network")
PREFIX = "module."


class MissingWeightsError(FileNotFoundError):
    """The checkpoint file is missing; the message says how to get weights."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (not weights-only, truncated, keys or shapes of another network); the
    one-line message names the file and the fix."""


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
            first = (str(e).strip().splitlines() or [""])[0]
            raise CheckpointError(
                f"{path}: refused to load: not a weights-only PyTorch checkpoint, or truncated/corrupt (re-download or "
                f"re-convert it; a pickle holding code is never loaded): {type(e).__name__}: {first}"
            ) from e
    for _ in range(3):  # unwrap {"model": {...}}, possibly nested once more
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{source}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
        )
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not_tensors or not obj:
        raise CheckpointError(
            f"{source}: not a state dict of tensors (top-level keys {sorted(map(str, obj))[:10]}); "
            f"non-tensor entries: {not_tensors[:10]}; expected a plain state dict or one under "
            f"{' / '.join(repr(k) for k in WRAPPER_KEYS)}"
        )
    out: Dict[str, torch.Tensor] = OrderedDict()
    for key, value in obj.items():
        name = _strip_prefix(str(key))
        if name in out:
            raise CheckpointError(f"{source}: key {name!r} occurs twice once prefixes are stripped")
        out[name] = value
    return out


def _shape(value: torch.Tensor) -> str:
    return "x".join(str(s) for s in value.shape)


def mismatch(source: str, state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> Optional[str]:
    """One line describing how a state dict differs from the network's (missing, extra, mis-shaped keys), or None.

    A different width of the first convolution (``backbone.conv1.weight``) is named as the ``base_channels`` the
    checkpoint was trained with. Deep-supervision keys (``TRAINING_ONLY_PREFIX``) may be missing or extra: DoDNet
    loads without them.
    """
    missing = [k for k in expected if k not in state and not k.startswith(TRAINING_ONLY_PREFIX)]
    extra = [k for k in state if k not in expected and not k.startswith(TRAINING_ONLY_PREFIX)]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or extra or shapes):
        return None
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(
            f"{len(shapes)} tensor(s) of another shape (e.g. {k}: {_shape(state[k])} in the file, "
            f"{_shape(expected[k])} in the network)"
        )
    if missing:
        parts.append(f"{len(missing)} missing key(s) (e.g. {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} extra key(s) (e.g. {extra[0]})")
    first = "backbone.conv1.weight"
    if first in shapes and state[first].dim() == expected[first].dim():
        fix = f"pass --network_def#base_channels {int(state[first].shape[0])} (the checkpoint's width)"
    else:
        fix = "use the checkpoint of this network_def or override network_def to the one it was trained with"
    return f"{source}: the weights do not fit the network defined by network_def: {'; '.join(parts)}; {fix}"


def load_network_weights(network: nn.Module, path: PathLike) -> nn.Module:
    """Load the checkpoint at ``path`` into ``network`` (strict: every key and shape must match) and return it.

    Raises:
        MissingWeightsError: no file at ``path``.
        CheckpointError: an unreadable checkpoint, or one whose keys or shapes differ from the network's.
    """
    state = read_state_dict(path)
    problem = mismatch(str(path), state, network.state_dict())
    if problem:
        raise CheckpointError(problem)
    network.load_state_dict(state, strict=True)
    return network
