"""Small helpers shared by every stage: the bundle root, flags, error causes, lazy package exports and
atomic file output.

Atomic output writes under a temporary name in the destination folder, then ``os.replace``: an interrupted
run (crash, SIGKILL, full disk) never leaves a half-written file under the final name, and readers never see
a partial file. Every writer of the bundle (label maps, reports, metrics,
datalists, converted checkpoints, ONNX exports, release zips, MOTS-synth volumes) goes through
``atomic_output`` (training checkpoints are written atomically by Ignite's own saver).
Dependency-free on purpose: the data generators and the CLIs import it without torch or MONAI.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type, Union

__all__ = [
    "BUNDLE_ROOT",
    "as_bool",
    "root_cause",
    "default_threads",
    "set_threads",
    "lazy_exports",
    "atomic_output",
    "write_text_atomic",
    "write_json_atomic",
]

PathLike = Union[str, os.PathLike]

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
"""The bundle folder (holding ``configs/`` and ``scripts/``)."""


def as_bool(value: Union[bool, str, int]) -> bool:
    """A flag given as a bool, an int or a string ("true"/"false", as MONAI Label may send it)."""
    if isinstance(value, str):
        key = value.strip().lower()
        if key in ("true", "1", "yes", "on"):
            return True
        if key in ("false", "0", "no", "off", ""):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    return bool(value)


def root_cause(error: BaseException, stop_at: Tuple[Type[BaseException], ...] = ()) -> BaseException:
    """The innermost ``__cause__`` of ``error`` (MONAI wraps transform errors in RuntimeErrors), stopping early
    at an error of a type in ``stop_at`` (one that already carries the message meant for the user)."""
    while error.__cause__ is not None and not isinstance(error, stop_at):
        error = error.__cause__
    return error


def default_threads() -> int:
    """The CPUs this process may run on (``os.sched_getaffinity``: a container's or ``taskset``'s share, not the
    host's core count that torch and ITK would otherwise use)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def set_threads(threads: Optional[Union[int, str]] = None) -> int:
    """Use ``threads`` CPU threads in torch (intra-op) and ITK (filters, readers); returns the number set.

    Args:
        threads: a positive number; None, "" or 0: ``default_threads()`` (also capped at it when larger would
            oversubscribe, as ``OMP_NUM_THREADS``-style settings from the environment are respected first).

    Raises:
        ValueError: a negative or non-integer value.
    """
    if threads in (None, "", 0, "0"):
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        n = min(int(env), default_threads()) if env.isdigit() and int(env) > 0 else default_threads()
    else:
        try:
            n = int(threads)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"threads must be a positive integer, got {threads!r}") from None
        if n < 1 or str(n) != str(threads).strip():
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
    import torch

    torch.set_num_threads(n)
    try:
        import itk

        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(n)
    except (ImportError, AttributeError):  # pragma: no cover - ITK is a dependency of the bundle
        pass
    return n


def lazy_exports(
    package: str, modules: Sequence[str]
) -> Tuple[Callable[[str], Any], Callable[[], List[str]], Dict[str, str]]:
    """``__getattr__``, ``__dir__`` and the ``{name: module}`` map of a package that re-exports the public names
    (``__all__``) of its ``modules``, each loaded on first use (PEP 562).

    Configs name components as ``scripts.<package>.<Name>``; importing the package stays free of torch until a
    name whose module needs it is used. The names are read from each module's literal ``__all__`` without
    importing it, so a module's ``__all__`` is the one list of what its package exports.

    Args:
        package: the package's ``__name__``.
        modules: module names within the package.
    """
    folder = Path(importlib.import_module(package).__file__).parent
    exports: Dict[str, str] = {}
    for module in modules:
        tree = ast.parse((folder / f"{module}.py").read_text(encoding="utf-8"))
        names = next(
            (
                ast.literal_eval(node.value)
                for node in tree.body
                if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)
            ),
            None,
        )
        if names is None:
            raise ImportError(f"{package}.{module} has no literal __all__ to export")
        for name in names:
            if name in exports:
                raise ImportError(f"{package}: {name!r} is exported by both {exports[name]} and {module}")
            exports[name] = module
    cache: Dict[str, Any] = {}

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if name not in cache:
            cache[name] = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        return cache[name]

    def __dir__() -> List[str]:
        return sorted(exports)

    return __getattr__, __dir__, exports


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
