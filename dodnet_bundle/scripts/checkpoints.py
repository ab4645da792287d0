"""Finding the checkpoint a killed or interrupted training run resumes from."""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import List, Optional, Tuple, Union

__all__ = ["LAST_CHECKPOINT_PATTERN", "latest_checkpoint"]

LAST_CHECKPOINT_PATTERN = r"^checkpoint_epoch=(\d+)\.pt$"
"""Names written by ``CheckpointSaver(save_interval=1, epoch_level=True)`` without ``file_prefix``."""


def latest_checkpoint(ckpt_dir: Union[str, os.PathLike], pattern: str = LAST_CHECKPOINT_PATTERN) -> Optional[str]:
    """The complete epoch checkpoint with the highest epoch in ``ckpt_dir``, or None when there is none.

    Files named by ``pattern`` (a regular expression whose first group is the epoch) are candidates.
    ``CheckpointSaver`` writes in place, so a run killed while saving can leave a truncated file; a
    candidate counts only when it is a complete ``torch.save`` archive (its zip directory is
    present), and the previous epoch's file is used otherwise.
    """
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    regex = re.compile(pattern)
    candidates: List[Tuple[int, Path]] = []
    for path in folder.iterdir():
        match = regex.match(path.name)
        if match and path.is_file():
            candidates.append((int(match.group(1)), path))
    for _, path in sorted(candidates, reverse=True):
        if zipfile.is_zipfile(path):
            return str(path)
    return None
