"""Every script under benchmarks/ imports: a helper renamed in the bundle must not leave one broken until the
day someone runs it (imports only; the benchmarks themselves run by hand, never in the test suite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

_IMPORT_ALL = """
import importlib, sys, traceback
sys.path.insert(0, {root!r})
for name in {names!r}:
    try:
        importlib.import_module(name)
    except Exception:
        print(f"benchmarks/{{name}}.py: " + traceback.format_exc().strip().splitlines()[-1])
"""


def test_every_benchmark_script_imports() -> None:
    names = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    assert "ablation_synth" in names and "fast_path_dice" in names
    code = _IMPORT_ALL.format(root=str(BENCHMARKS), names=names)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=BENCHMARKS, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", f"scripts that do not import:\n{done.stdout}"
