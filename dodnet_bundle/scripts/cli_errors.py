"""One line per user mistake: the shared error handling of every console command of the bundle.

``run_cli(prog, main)`` runs a command's ``main(argv)``; an error whose root cause (MONAI's config machinery wraps
errors in ``RuntimeError``) is a known user-error type is printed as one line ``<prog>: error: <message>`` on stderr
and ends the process with its exit code: 2 for usage errors (options, values, task names, checkpoints, the output
location), 1 for failed cases (an input that cannot be segmented). Any other error is a bug and keeps its
traceback; ``--debug`` (removed from the arguments before ``main`` sees them) shows the traceback of user errors too.

Used by ``dodnet-segment``, ``dodnet-evaluate``, ``dodnet-prepare-mots``, ``dodnet-preprocess`` and the checkpoint
converter. Under ``python -m monai.bundle run`` the configs' first run step, ``install_excepthook``, does the same for
an error that nothing catches (``DODNET_DEBUG=1`` keeps MONAI's traceback).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Type, Union

__all__ = [
    "USAGE_EXIT",
    "FAILED_EXIT",
    "UsageError",
    "OutputLocationError",
    "one_line",
    "user_error_exit",
    "closest",
    "check_output_location",
    "config_ids",
    "check_overrides",
    "run_cli",
    "fire_call",
    "install_excepthook",
]

USAGE_EXIT = 2
"""Exit code of a usage error (bad option, value, task, checkpoint or output location)."""
FAILED_EXIT = 1
"""Exit code of a run in which cases failed (or the input cannot be segmented)."""


class UsageError(ValueError):
    """A mistake in a command's options or values; the message names the value and the fix (exit 2)."""


class OutputLocationError(UsageError):
    """The output location cannot hold the outputs (a file in its place, not writable); checked before any case."""


# (module, class name, exit code): imported on use, so that this module stays free of torch and MONAI
_KNOWN: Tuple[Tuple[str, str, int], ...] = (
    ("scripts.cli_errors", "UsageError", USAGE_EXIT),
    ("scripts.tasks", "TaskSelectionError", USAGE_EXIT),
    ("scripts.networks.weights", "MissingWeightsError", USAGE_EXIT),
    ("scripts.networks.weights", "CheckpointError", USAGE_EXIT),
    ("scripts.networks.convert_official_checkpoint", "CheckpointMismatchError", USAGE_EXIT),
    ("scripts.data.datalist", "DatalistError", USAGE_EXIT),
    ("scripts.data.prepare_mots", "DataPreparationError", USAGE_EXIT),
    ("scripts.data.preprocess", "PreprocessError", USAGE_EXIT),
    ("scripts.data.cases", "BadInputError", FAILED_EXIT),
    ("scripts.inference.runner", "CasesFailedError", FAILED_EXIT),
)


def _known_types() -> List[Tuple[Type[BaseException], int]]:
    found = []
    for module, name, code in _KNOWN:
        if module not in sys.modules and module != __name__:
            continue  # never raised by a module that was not imported
        cls = getattr(importlib.import_module(module), name, None)
        if isinstance(cls, type):
            found.append((cls, code))
    return found


def one_line(error: BaseException) -> str:
    """The error's message on one line (lines of a multi-line message joined by "; ")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(error).__name__


def user_error_exit(
    error: BaseException, extra: Iterable[Tuple[Type[BaseException], int]] = ()
) -> Optional[Tuple[BaseException, int]]:
    """``(the user error, its exit code)`` when ``error`` or a cause of it is a known user error, else None.

    Args:
        error: the raised error.
        extra: further ``(type, exit code)`` pairs a command treats as user errors.
    """
    known = _known_types() + list(extra)
    current: Optional[BaseException] = error
    while current is not None:
        for cls, code in known:
            if isinstance(current, cls):
                return current, code
        current = current.__cause__
    return None


def closest(word: str, choices: Iterable[str], n: int = 3) -> str:
    """ " (did you mean ...?)" with the closest of ``choices`` (``difflib``), or "" when none is close."""
    matches = difflib.get_close_matches(word, sorted(set(choices)), n=n, cutoff=0.6)
    return f" (did you mean {' or '.join(matches)}?)" if matches else ""


def check_output_location(path: Union[str, os.PathLike]) -> Path:
    """Make sure ``path`` can hold outputs before any work: create the folder and write a probe file in it.

    Raises:
        OutputLocationError: a file stands where the folder (or one of its parents) should be, or the folder
            cannot be created or written; the message names the path.
    """
    folder = Path(path).expanduser()
    for part in (folder, *folder.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                what = "the output folder" if part == folder else f"a parent of the output folder {folder}"
                raise OutputLocationError(f"{part}: is a file, not a folder ({what}); pass another output folder")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tmp-probe-"):
            pass
    except OSError as e:
        raise OutputLocationError(
            f"{folder}: the output folder is not writable ({e.strerror or e}); pass a folder you can write to"
        ) from None
    return folder


def config_ids(config: Any, prefix: str = "") -> List[str]:
    """Every id of a parsed config (``a``, ``a#b``, ``a#0``...), as ``monai.bundle`` overrides name them."""
    ids: List[str] = []
    items = config.items() if isinstance(config, Mapping) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        name = f"{prefix}{key}"
        ids.append(name)
        ids.extend(config_ids(value, name + "#"))
    return ids


def _get(config: Any, id: str) -> Any:
    for key in id.split("#"):
        config = config[int(key)] if isinstance(config, list) else config[key]
    return config


def _component_parameters(component: Mapping[str, Any]) -> Optional[List[str]]:
    """The argument names the ``_target_`` of a config component takes; None where it takes ``**kwargs`` or
    cannot be resolved here (then its constructor checks them when the config is built)."""
    target = component.get("_target_")
    if not isinstance(target, str) or target.startswith(("$", "@", "%")):
        return None
    try:
        from pydoc import locate

        if "." not in target:  # a short MONAI name ("CacheDataset"): MONAI's own lookup
            from monai.bundle.config_item import ComponentLocator

            module = ComponentLocator().get_component_module_name(target)
            target = f"{module[0] if isinstance(module, list) else module}.{target}" if module else target
        params = inspect.signature(locate(target)).parameters  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - unresolvable here: left to the constructor
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return [n for n, p in params.items() if p.kind is not p.VAR_POSITIONAL]


def check_overrides(config: Mapping[str, Any], overrides: Iterable[str], options: Iterable[str] = ()) -> None:
    """Refuse override ids that name nothing in ``config`` (a misspelled option must not be ignored silently).

    Args:
        config: the parsed config (``ConfigParser.config`` or the JSON content); a new argument of a component
            (``network_def#norm_groups``) is accepted when the component's ``_target_`` takes it.
        overrides: the ids given (``precision``, ``network_def#base_channels``...).
        options: further valid names (a command's own flags), offered in the suggestions.

    Raises:
        UsageError: naming the unknown option and the closest valid names (``difflib``).
    """
    known = set(config_ids(config))
    components = {i for i in known if isinstance(_get(config, i), Mapping) and "_target_" in _get(config, i)}
    for name in overrides:
        if name in known:
            continue
        parent, _, arg = name.rpartition("#")
        if parent in components:  # a new argument of a component: known when its target takes it
            takes = _component_parameters(_get(config, parent))
            if takes is None or arg in takes:
                continue
            suggestion = closest(f"--{parent}#{arg}", [f"--{parent}#{t}" for t in takes])
            raise UsageError(f"unknown option --{name}{suggestion}: {_get(config, parent)['_target_']} takes no {arg}")
        flags = [f"--{o}" for o in (*options, *known)]
        raise UsageError(f"unknown option --{name}{closest('--' + name, flags)}; see --help for the options")


def run_cli(
    prog: str,
    main: Callable[[List[str]], Any],
    argv: Optional[Sequence[str]] = None,
    extra: Iterable[Tuple[Type[BaseException], int]] = (),
) -> None:
    """Run ``main(args)`` and turn user errors into one line on stderr and an exit code.

    Args:
        prog: the command's name, the prefix of the message.
        main: the command; gets the arguments without ``--debug``; an int it returns is the exit code (else 0).
        argv: the arguments (default ``sys.argv[1:]``).
        extra: further ``(type, exit code)`` pairs treated as user errors by this command.

    Raises:
        SystemExit: with the exit code of ``main`` or of the user error.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        code = main(args)
    except Exception as error:  # noqa: B902 - classified below, re-raised when not a user error
        found = user_error_exit(error, extra)
        if found is None or debug:
            raise
        print(f"{prog}: error: {one_line(found[0])}", file=sys.stderr)
        raise SystemExit(found[1]) from None
    if isinstance(code, int) and not isinstance(code, bool) and code:
        raise SystemExit(code)


def fire_call(prog: str, fn: Callable[..., Any], args: Sequence[str]) -> Optional[Tuple[Any, Dict[str, Any]]]:
    """Call ``fn`` with the command line ``args`` as parsed by ``fire``; a misspelled flag fails before ``fn`` runs.

    ``fire`` alone calls a function first and complains about a flag that the function does not take only
    afterwards, so a typo (``--epoch 3``) would cost a whole run. Here such a flag, a surplus positional
    argument or a missing one is a ``UsageError`` naming it (with the closest flags) before ``fn`` starts.
    ``-h``/``--help`` shows ``fn``'s arguments and docstring (exit 0). ``--noflag`` sets a boolean ``flag`` to
    False, as in ``fire``. A function with ``**kwargs`` receives any further flag and checks it itself.

    Args:
        prog: the command's name (help and messages).
        fn: the command's function; its signature defines the flags.
        args: the command line arguments.

    Returns:
        ``(fn's result, the bound arguments including defaults)``, or None after ``--help``.
    """
    import fire

    args = list(args)
    if any(a in ("-h", "--help") for a in args) and "--" not in args:

        @functools.wraps(fn)  # fire shows fn's signature and docstring
        def shown(*_: Any, **__: Any) -> None:
            return None

        fire.Fire(shown, command=["--", "--help"], name=prog)
        return None
    signature = inspect.signature(fn)
    params = signature.parameters
    named = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    any_flag = any(p.kind is p.VAR_KEYWORD for p in params.values())
    outcome: Dict[str, Any] = {}

    def call(*positional: Any, **flags: Any) -> None:  # fire hands every flag over; checked against fn's signature
        for key in list(flags):
            if key in params:
                continue
            if f"no{key}" in params and flags[key] is False:  # fire reads a bare --no_postprocess as _postprocess=False
                flags[f"no{key}"] = not flags.pop(key)
            elif key.startswith("no") and key[2:] in params and flags[key] is True:  # --noflag=True
                flags[key[2:]] = not flags.pop(key)
        unknown = [k for k in flags if k not in params] if not any_flag else []
        if unknown:
            suggestion = closest(f"--{unknown[0]}", [f"--{n}" for n in named])
            raise UsageError(f"unknown option --{unknown[0]}{suggestion}; see {prog} --help")
        try:
            bound = signature.bind(*positional, **flags)
        except TypeError as error:  # too many positional arguments, a missing one, a flag given twice
            raise UsageError(f"{error}; see {prog} --help") from None
        bound.apply_defaults()
        outcome["result"] = fn(*positional, **flags)
        outcome["arguments"] = dict(bound.arguments)

    fire.Fire(call, command=args, name=prog)
    return outcome["result"], outcome["arguments"]


def install_excepthook(prog: str = "monai.bundle run") -> None:
    """Print a known user error that nothing catches as one line ``<prog>: error: <message>`` and exit with its
    code (2 usage, 1 failed cases) instead of the chained traceback of the config machinery.

    Meant as the first ``run`` step of the bundle's configs (``monai.bundle run`` has the bundle importable from
    then on; errors of later steps, including the instantiation of their components, reach the hook). Other
    errors keep their traceback; so do all with ``DODNET_DEBUG=1``. Installing twice is a no-op.
    """
    if os.environ.get("DODNET_DEBUG") or getattr(sys.excepthook, "_dodnet_prog", None):
        return
    previous = sys.excepthook

    def hook(exc_type: Type[BaseException], error: BaseException, tb: Any) -> None:
        found = user_error_exit(error)
        if found is None:
            previous(exc_type, error, tb)
            return
        print(f"{prog}: error: {one_line(found[0])} (DODNET_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(found[1])  # the interpreter would exit 1 after a hook; usage errors exit 2

    hook._dodnet_prog = prog  # type: ignore[attr-defined]
    sys.excepthook = hook
