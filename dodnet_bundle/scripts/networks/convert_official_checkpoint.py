"""Convert the DoDNet authors' released checkpoint into this bundle's ``models/model.pt``.

The authors' code (``jianpengz/DoDNet``, ``a_DynConv``) saves a state dict whose keys usually start
with ``module.`` (DataParallel/DDP), or a dictionary ``{"model", "optimizer", "amp"}`` from an apex
FP16 run. This module turns either into a plain state dict of :class:`scripts.networks.DoDNet`:

- prefixes are stripped (``module.``, repeated or nested under ``model`` / ``state_dict``);
- backbone keys keep the authors' names under ``backbone.``; the controller, a 1x1x1 ``Conv3d``
  ``[162, 263, 1, 1, 1]`` in their code, becomes the ``Linear`` ``controller.fc`` ``[162, 263]``;
- convolution kernels are permuted from the authors' (D, H, W) order (their network takes
  (N, C, D, H, W) with D the slice axis) to MONAI's (H, W, D): ``w[o, i, d, h, w] -> w.permute(0, 1, 3, 4, 2)``;
- weight standardization needs no change: ``WSConv3d`` stores the raw kernel and standardizes it on
  every call exactly like the authors' ``Conv3d`` (the statistics over (in, k, k, k) do not depend on
  the axis order, so standardizing then permuting equals permuting then standardizing);
- every key and shape is checked against the network that ``configs/inference.json`` builds, and
  the error lists all missing, unexpected and mis-shaped entries at once.

The output is a plain state dict, the format of the Model Zoo's ``models/model.pt``: MONAI's
``CheckpointLoader`` with ``{"model": network}``, MONAI Label (``checkpoint.get("model", checkpoint)``)
and ``python -m monai.bundle ckpt_export`` (no ``--key_in_ckpt``) all load it.

Spacing caveat: the authors later stated (their issue #19) that the released weights were trained at
3 x 0.76 x 0.76 mm (slice, row, col), not at the 1.5 x 0.8 x 0.8 mm of the paper. Run inference with
``configs/official_weights.json`` merged on ``configs/inference.json`` to resample accordingly.

Usage (from the bundle root)::

    python -m scripts.networks.convert_official_checkpoint --src MOTS_DynConv_checkpoint.pth --dst models/model.pt
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from scripts.networks.weights import read_state_dict
from scripts.utils import BUNDLE_ROOT, atomic_output

__all__ = [
    "CheckpointMismatchError",
    "convert",
    "convert_state_dict",
    "load_official_state_dict",
    "official_key_to_bundle",
    "bundle_key_to_official",
    "build_network",
]

CONTROLLER_KEY = "controller."
# the authors' (N, C, D, H, W) kernel -> MONAI's (N, C, H, W, D)
KERNEL_PERMUTATION = (0, 1, 3, 4, 2)


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the network; the message lists every difference."""


def official_key_to_bundle(key: str) -> str:
    """Map a key of the authors' network (prefixes already stripped) to this bundle's DoDNet key."""
    if key.startswith(CONTROLLER_KEY):
        return "controller.fc." + key[len(CONTROLLER_KEY) :]
    return "backbone." + key


def bundle_key_to_official(key: str) -> str:
    """Inverse of :func:`official_key_to_bundle` (used to name missing keys as the authors do)."""
    if key.startswith("controller.fc."):
        return CONTROLLER_KEY + key[len("controller.fc.") :]
    if key.startswith("backbone."):
        return key[len("backbone.") :]
    return key


def load_official_state_dict(src: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Load the authors' checkpoint safely (``scripts.networks.weights.read_state_dict``: weights only, wrappers
    and ``module.`` prefixes stripped) with floating-point tensors as float32 (FP16 runs store half copies).

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: the file is not a weights-only checkpoint, or holds no state dict.
    """
    return OrderedDict((k, v.float() if v.is_floating_point() else v) for k, v in read_state_dict(src).items())


def convert_state_dict(
    official: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> Dict[str, torch.Tensor]:
    """Rename and permute the authors' weights and check them against ``expected`` (a DoDNet state dict).

    Args:
        official: the authors' state dict, prefixes stripped (see :func:`load_official_state_dict`).
        expected: state dict of the target network (names and shapes are checked, values unused).
        source: name of the checkpoint, used in error messages.

    Returns:
        a state dict with exactly the keys and shapes of ``expected``.

    Raises:
        CheckpointMismatchError: listing every missing, unexpected and mis-shaped key.
    """
    converted: Dict[str, torch.Tensor] = OrderedDict()
    origin: Dict[str, str] = {}
    for key, value in official.items():
        new_key = official_key_to_bundle(key)
        if key.startswith(CONTROLLER_KEY) and key.endswith("weight") and value.dim() == 5:
            value = value.reshape(value.shape[0], value.shape[1])  # 1x1x1 conv kernel -> Linear weight
        elif value.dim() == 5:
            value = value.permute(*KERNEL_PERMUTATION)
        converted[new_key] = value.contiguous()
        origin[new_key] = key
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    misshaped = [
        f"{origin[k]} {list(official[origin[k]].shape)} (as {k}: {list(converted[k].shape)}, "
        f"expected {list(expected[k].shape)})"
        for k in expected
        if k in converted and converted[k].shape != expected[k].shape
    ]
    if missing or unexpected or misshaped:
        lines = [f"{source}: does not match the DoDNet network of this bundle:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(bundle_key_to_official(k) for k in missing))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(origin[k] for k in unexpected))
        if misshaped:
            lines.append(f"  wrong shape ({len(misshaped)}): " + "; ".join(misshaped))
        lines.append(
            "  (the released MOTS checkpoint matches the default network_def of configs/inference.json: "
            "base_channels 32, blocks [1, 2, 2, 2, 2], 7 tasks, 8-8-2 dynamic head)"
        )
        raise CheckpointMismatchError("\n".join(lines))
    return OrderedDict((k, converted[k]) for k in expected)


def build_network(
    bundle_root: Union[str, os.PathLike, None] = None,
    config_file: Union[str, Sequence[str], None] = None,
    network_def: str = "network_def",
    network_args: Optional[Mapping[str, Any]] = None,
) -> torch.nn.Module:
    """Instantiate the bundle's network from its config (default ``configs/inference.json``).

    ``network_args`` override arguments of ``network_def`` (e.g. ``{"base_channels": 8}``).
    """
    from monai.bundle import ConfigParser

    root = Path(bundle_root) if bundle_root is not None else BUNDLE_ROOT
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    files = config_file if config_file is not None else str(root / "configs" / "inference.json")
    parser = ConfigParser()
    parser.read_config(files)
    parser["bundle_root"] = str(root)
    for name, value in (network_args or {}).items():
        parser[f"{network_def}#{name}"] = value
    return parser.get_parsed_content(network_def, instantiate=True)


def _atomic_save(obj: Any, dst: Path) -> None:
    with atomic_output(dst, mode=0o644) as tmp:  # weights are meant to be shared
        torch.save(obj, tmp)


def convert(
    src: str,
    dst: Optional[str] = None,
    bundle_root: Optional[str] = None,
    config_file: Optional[Union[str, List[str]]] = None,
    network_args: Optional[Dict[str, Any]] = None,
    overwrite: bool = False,
) -> str:
    """Convert the authors' checkpoint ``src`` into a state dict for this bundle at ``dst``.

    Args:
        src: the authors' checkpoint (e.g. ``MOTS_DynConv_checkpoint.pth``).
        dst: output path (default ``<bundle_root>/models/model.pt``); written atomically.
        bundle_root: the bundle folder (default: the folder holding this ``scripts`` package).
        config_file: config(s) defining ``network_def`` (default ``<bundle_root>/configs/inference.json``).
        network_args: overrides of ``network_def`` arguments (only for non-default networks).
        overwrite: replace an existing ``dst``.

    Returns:
        the output path.
    """
    root = Path(bundle_root) if bundle_root is not None else BUNDLE_ROOT
    out = Path(dst) if dst is not None else root / "models" / "model.pt"
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass --overwrite True to replace it")
    official = load_official_state_dict(src)
    network = build_network(root, config_file, network_args=network_args)
    state = convert_state_dict(official, network.state_dict(), source=str(src))
    network.load_state_dict(state, strict=True)  # a last check by torch itself
    _atomic_save(state, out)
    params = sum(v.numel() for v in state.values())
    print(f"converted {len(state)} tensors ({params:,} parameters) from {src} -> {out}")
    return str(out)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m scripts.networks.convert_official_checkpoint --src FILE [--dst FILE]``: exit 2 with one line
    for a missing, truncated or mismatched checkpoint or an existing ``dst`` (the traceback with ``--debug``)."""
    from scripts.cli_errors import USAGE_EXIT, fire_call, run_cli

    run_cli(
        "convert_official_checkpoint",
        lambda args: fire_call("convert_official_checkpoint", convert, args),
        argv,
        extra=((FileExistsError, USAGE_EXIT),),
    )


if __name__ == "__main__":
    main()
