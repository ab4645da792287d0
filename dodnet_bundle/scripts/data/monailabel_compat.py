"""Keep the bundle's preprocessing working inside MONAI Label 0.8.5 with MONAI >= 1.5.

MONAI Label puts the image's path in the data dictionary as ``image_path`` (its writer needs it to
choose the output format). MONAI 1.5+'s ``Spacingd`` treats every ``image_*`` item of a NIfTI image
as a metadata dictionary and calls ``.update()`` on it, which fails on that string. The pair below
moves such plain strings aside before the spatial transforms and puts them back afterwards; outside
MONAI Label (no such items) both are no-ops. Neither is invertible, so ``Invertd`` skips them.
"""

from __future__ import annotations

from typing import Any, Dict, Hashable, Mapping

from monai.transforms import Transform

__all__ = ["StashStringItemsd", "RestoreStashedItemsd", "STASH_KEY"]

STASH_KEY = "_stashed_string_items"


class StashStringItemsd(Transform):
    """Move every string item whose key starts with ``<key>_`` into ``data[stash_key]``.

    Args:
        keys: image keys whose ``<key>_*`` string companions (e.g. ``image_path``) are stashed.
        stash_key: where the stashed items are kept (a key not starting with any image key).
    """

    def __init__(self, keys: Any = "image", stash_key: str = STASH_KEY) -> None:
        self.keys = [keys] if isinstance(keys, str) else list(keys)
        self.stash_key = stash_key

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        stash = dict(d.get(self.stash_key, {}))
        for name in list(d):
            if isinstance(name, str) and isinstance(d[name], str):
                if any(name.startswith(f"{key}_") for key in self.keys):
                    stash[name] = d.pop(name)
        if stash:
            d[self.stash_key] = stash
        return d


class RestoreStashedItemsd(Transform):
    """Put the items stashed by :class:`StashStringItemsd` back under their own keys."""

    def __init__(self, stash_key: str = STASH_KEY) -> None:
        self.stash_key = stash_key

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        d.update(d.pop(self.stash_key, {}))
        return d
