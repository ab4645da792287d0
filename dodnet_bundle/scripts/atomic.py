"""Atomic file output: write under a temporary name in the destination folder, then ``os.replace``.

An interrupted run (crash, SIGKILL, full disk) never leaves a half-written file under the final name,
and readers never see a partial file. Every writer of the bundle (label maps, reports, metrics,
datalists, converted checkpoints, ONNX exports, release zips, MOTS-synth volumes) goes through
``atomic_output`` (training checkpoints are written atomically by Ignite's own saver).
Dependency-free on purpose: the data generators import it without torch or MONAI.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

__all__ = ["atomic_output", "write_text_atomic", "write_json_atomic"]

PathLike = Union[str, os.PathLike]


@contextmanager
def atomic_output(path: PathLike, mode: Optional[int] = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that pick a format by suffix work);
    on success it is renamed to ``path``, on any error it is removed and the error propagates.

    Args:
        path: the final file; its folder is created if needed.
        mode: permission bits to set before the rename (e.g. ``0o644`` for files meant to be shared);
            None leaves the process default.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{final.name}")
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(text: str, path: PathLike) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    return Path(path)


def write_json_atomic(obj: Any, path: PathLike, **dumps_kwargs: Any) -> Path:
    """Write ``obj`` as indented JSON (trailing newline) to ``path`` atomically."""
    return write_text_atomic(json.dumps(obj, indent=2, **dumps_kwargs) + "\n", path)
