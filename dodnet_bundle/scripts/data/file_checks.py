"""Integrity checks of image files, shared by the datalist checks and the inference input checks.

``nifti_truncation`` compares the gzip trailer's size with the header and decompresses the stream only when they
disagree (cheap enough to check a 920-case datalist before training); the inference input check also runs
``gzip_problem`` first, which decompresses the whole stream (catches CRC errors anywhere, one case at a time).
ITK reads truncated NIfTI files without error and fills the missing part with zeros, so these checks are the
only guard against a cut-off download or copy.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np

__all__ = ["gzip_uncompressed_size", "nifti_data_end", "gzip_problem", "nifti_truncation"]


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


def gzip_problem(path: Path) -> Optional[str]:
    """Why the gzip file ``path`` cannot be decompressed (truncated, CRC error), or None."""
    try:
        gzip_uncompressed_size(path)
    except (OSError, EOFError, zlib.error) as err:
        return f"{path}: corrupt or truncated gzip file ({err})"
    return None


def nifti_truncation(path: Path) -> Optional[str]:
    """Why a NIfTI file is shorter than its header says (a cut-off download or copy), or None.

    Args:
        path: the file; other formats than ``.nii`` / ``.nii.gz`` are not checked (None).

    Raises:
        whatever nibabel raises for an unreadable header (callers report it with the file name).
    """
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    import nibabel as nib

    expected = nifti_data_end(nib.load(str(path)))
    if not name.endswith(".gz"):
        size = path.stat().st_size
        return f"{path} is truncated: {size} bytes, the header needs {expected}" if size < expected else None
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        if int.from_bytes(f.read(4), "little") == expected % 2**32:  # uncompressed size modulo 2**32
            return None
    try:
        total = gzip_uncompressed_size(path)
    except (OSError, EOFError, zlib.error) as err:
        return f"{path} is truncated or corrupt: {err}"
    return f"{path} is truncated: {total} bytes of data, the header needs {expected}" if total < expected else None
