"""One run at a time per output folder: an exclusive ``fcntl.flock`` on ``<folder>/.dodnet-segment.lock``.

Two runs writing into one folder would each write ``summary.json`` and the last one would drop the other's
records; the second run is refused instead, before any case, with one line naming the folder and the pid (and
host) of the run that holds it. The lock is the kernel's: it ends with the holding process, however that
process ends, so the lock file a killed run leaves behind is simply taken over by the next run (no pid
guessing). The holder removes the file when it finishes; a run that opened the file just before its removal
notices (the path no longer names the file it locked) and locks the new file instead.

Under ``torchrun`` rank 0 takes the lock for all ranks and tells them whether it got it, so every rank stops
with the same message.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional, Union

from scripts.cli_errors import UsageError, check_output_location

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux or macOS: no locking
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "OutputFolderBusyError", "output_folder_lock", "run_lock"]

LOCK_NAME = ".dodnet-segment.lock"
"""The lock file's name inside the output folder."""

PathLike = Union[str, os.PathLike]


class OutputFolderBusyError(UsageError):
    """Another run holds the output folder; the message names the folder and the holder's pid and host."""


def _holder(fd: int, attempts: int = 20) -> str:
    """``pid N on host H`` as the holder wrote it (it writes right after locking: wait a moment for it)."""
    for _ in range(attempts):
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
        if len(text) >= 2 and text[0].isdigit():
            return f"pid {text[0]} on host {text[1]}"
        time.sleep(0.05)
    return "a process that has not written its pid yet"


@contextmanager
def output_folder_lock(folder: PathLike) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if needed) for the ``with`` block.

    Raises:
        OutputFolderBusyError: another process holds it.
    """
    path = Path(folder) / LOCK_NAME
    if fcntl is None:  # pragma: no cover
        yield path
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputFolderBusyError(
                f"{Path(folder)}: another run is writing into this output folder ({holder}); "
                "wait for it to finish or pass another output folder"
            ) from None
        try:
            now = os.stat(path)
            mine = os.fstat(fd)
            same = (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still locked: a waiting opener sees the path change
        os.close(fd)


def _distributed() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


@contextmanager
def run_lock(folders: Iterable[PathLike]) -> Iterator[List[Path]]:
    """Lock every folder of ``folders`` (each checked with ``check_output_location`` first) for the block;
    with ``torch.distributed`` running, rank 0 locks and every rank raises if it could not.

    Raises:
        OutputFolderBusyError: a folder is held by another run.
        OutputLocationError: a folder cannot hold outputs.
    """
    dist = _distributed()
    rank = dist.get_rank() if dist is not None else 0
    unique = sorted({Path(f) for f in folders})
    with ExitStack() as stack:
        error: Optional[UsageError] = None
        held: List[Path] = []
        if rank == 0:
            try:
                for folder in unique:
                    check_output_location(folder)
                    held.append(stack.enter_context(output_folder_lock(folder)))
            except UsageError as e:
                error = e
        if dist is not None:
            box = [None if error is None else (isinstance(error, OutputFolderBusyError), str(error))]
            dist.broadcast_object_list(box, src=0)
            if error is None and box[0] is not None:
                busy, message = box[0]
                error = OutputFolderBusyError(message) if busy else UsageError(message)
        if error is not None:
            raise error
        yield held
