"""Connected components of binary masks on the mask's own device.

The post-processing's two component operations (keep the largest components, drop components of at most N
voxels) run where the mask is: on the CPU through scikit-image's labelling (MONAI's
``KeepLargestConnectedComponent`` for the largest ones); on a GPU through cuCIM's labelling when cuCIM is
installed (MONAI's own GPU path), else through ``label_components_torch``, a label propagation in plain torch.
So a GPU-resident pipeline never copies a full-size mask to the host for post-processing.

``backend`` selects the labelling: ``"auto"`` (as above), ``"skimage"``, ``"cucim"`` or ``"torch"`` (any
device; the CPU tests compare it with scikit-image).
"""

from __future__ import annotations

import importlib.util
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import KeepLargestConnectedComponent
from monai.utils import convert_to_dst_type

__all__ = ["BACKENDS", "resolve_backend", "label_components_torch", "label_components", "keep_largest", "remove_up_to"]

BACKENDS = ("auto", "skimage", "cucim", "torch")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The labelling used for a mask on ``device``: ``backend`` itself unless it is ``"auto"``."""
    if backend not in BACKENDS:
        raise ValueError(f"components backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "skimage"
    return "cucim" if importlib.util.find_spec("cucim") is not None else "torch"


def _offsets(connectivity: int) -> list:
    """Neighbour offsets of a 3-D neighbourhood: 1 faces (6), 2 faces and edges (18), 3 all (26)."""
    if connectivity not in (1, 2, 3):
        raise ValueError(f"connectivity must be 1, 2 or 3, got {connectivity}")
    r = range(-1, 2)
    return [(a, b, c) for a in r for b in r for c in r if 0 < abs(a) + abs(b) + abs(c) <= connectivity]


def label_components_torch(mask: torch.Tensor, connectivity: int = 3) -> Tuple[torch.Tensor, int]:
    """Connected components of a binary (H, W, D) mask by label propagation, on the mask's device.

    Every foreground voxel starts with its own index; each round a voxel takes the largest index among itself and
    its foreground neighbours, until nothing changes (rounds: about the longest path inside a component). Runs on
    the mask's bounding box.

    Returns:
        (labels, count): int64 (H, W, D) labels 1..count numbered in order of first voxel (C order, as
        scikit-image numbers them), 0 for the background.
    """
    fg = mask.bool()
    labels = torch.zeros(fg.shape, dtype=torch.int64, device=fg.device)
    coords = fg.nonzero()
    if coords.numel() == 0:
        return labels, 0
    lo, hi = coords.min(0).values, coords.max(0).values + 1
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    sub = fg[box]
    # float64 carries indices exactly (up to 2**53) through max pooling, which has no integer kernels
    index = torch.arange(1, sub.numel() + 1, device=fg.device, dtype=torch.float64).view(sub.shape)
    current = torch.where(sub, index, torch.zeros_like(index))[None, None]
    keep = sub[None, None]
    offsets = _offsets(connectivity)
    while True:
        if connectivity == 3:
            spread = F.max_pool3d(current, kernel_size=3, stride=1, padding=1)
        else:
            padded = F.pad(current, (1, 1, 1, 1, 1, 1))
            spread = current.clone()
            shape = current.shape[2:]
            for a, b, c in offsets:
                shifted = padded[
                    :, :, 1 + a : 1 + a + shape[0], 1 + b : 1 + b + shape[1], 1 + c : 1 + c + shape[2]  # noqa: E203
                ]
                spread = torch.maximum(spread, shifted)
        spread = torch.where(keep, spread, torch.zeros_like(spread))
        if torch.equal(spread, current):
            break
        current = spread
    # renumber in order of each component's first voxel, as scikit-image does
    roots = current[0, 0]
    flat = roots.reshape(-1)
    values, inverse = torch.unique(flat, return_inverse=True)  # values[0] == 0 (the background is present or not)
    first = torch.full((values.numel(),), flat.numel(), dtype=torch.int64, device=fg.device)
    first.scatter_reduce_(0, inverse, torch.arange(flat.numel(), device=fg.device), reduce="amin")
    has_background = bool(values[0] == 0)
    order = torch.argsort(first[1:] if has_background else first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, order.numel() + 1, device=fg.device)
    if has_background:
        rank = torch.cat([torch.zeros(1, dtype=torch.int64, device=fg.device), rank])
    labels[box] = rank[inverse].view(sub.shape)
    return labels, int(order.numel())


def label_components(mask: torch.Tensor, connectivity: int = 3, backend: str = "auto") -> Tuple[torch.Tensor, int]:
    """Connected components of a binary (H, W, D) mask as int64 labels on the mask's device, and their count."""
    used = resolve_backend(backend, mask.device)
    if used == "torch":
        return label_components_torch(mask, connectivity)
    if used == "cucim":
        import cupy
        from cucim.skimage import measure as cucim_measure

        labels = cucim_measure.label(cupy.asarray(mask.bool()), connectivity=connectivity)
        return torch.as_tensor(labels, device=mask.device).to(torch.int64), int(labels.max())
    from skimage import measure

    labels, count = measure.label(mask.detach().cpu().numpy() > 0, connectivity=connectivity, return_num=True)
    return torch.as_tensor(labels.astype(np.int64), device=mask.device), int(count)


def keep_largest(mask: torch.Tensor, num_components: int, connectivity: int = 3, backend: str = "auto") -> torch.Tensor:
    """Keep the ``num_components`` largest connected components of a binary (1, H, W, D) mask.

    MONAI's ``KeepLargestConnectedComponent`` (scikit-image on the CPU, cuCIM on a GPU) unless the labelling
    resolves to ``"torch"``.
    """
    if resolve_backend(backend, mask.device) != "torch":
        return KeepLargestConnectedComponent(connectivity=connectivity, num_components=num_components)(mask)
    labels, count = label_components_torch(mask[0], connectivity)
    if count <= num_components:
        return mask
    sizes = torch.bincount(labels.reshape(-1), minlength=count + 1)
    sizes[0] = -1
    # stable order: among equal sizes the lower label (the first found) is kept
    order = torch.argsort(-sizes[1:], stable=True)[:num_components] + 1
    keep = torch.zeros(count + 1, dtype=torch.bool, device=mask.device)
    keep[order] = True
    out = keep[labels][None].to(mask.dtype)
    return convert_to_dst_type(out, mask)[0]


def remove_up_to(mask: torch.Tensor, max_voxels: int, connectivity: int = 3, backend: str = "auto") -> torch.Tensor:
    """Remove the connected components of ``max_voxels`` voxels or fewer from a binary (1, H, W, D) mask."""
    labels, count = label_components(mask[0], connectivity, backend)
    sizes = torch.bincount(labels.reshape(-1), minlength=count + 1)
    keep = sizes > max_voxels
    keep[0] = False
    out = keep[labels][None].to(mask.dtype)
    return convert_to_dst_type(out, mask)[0]
