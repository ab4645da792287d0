"""Cheap integrity facts about image files, shared by the datalist checks and the inference input checks."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["gzip_uncompressed_size", "nifti_data_end"]


def gzip_uncompressed_size(path: Path) -> int:
    """Decompress the whole gzip stream and return its size in bytes.

    Raises:
        OSError, EOFError or zlib.error: for a truncated or corrupt stream (CRC errors included).
    """
    size = 0
    with gzip.open(path, "rb") as stream:
        while chunk := stream.read(1 << 24):
            size += len(chunk)
    return size


def nifti_data_end(image: Any) -> int:
    """Byte offset where a loaded nibabel NIfTI image's voxel data ends (header, extensions and data).

    The array proxy knows where the voxels really start (a header's ``vox_offset`` may be 0).
    """
    proxy = image.dataobj
    return int(proxy.offset) + int(np.prod(proxy.shape)) * np.dtype(proxy.dtype).itemsize
