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


def test_train_step_runs_the_demo_networks_training_step() -> None:
    """A tiny run of train_step.py (width 4, one 16^3 step): the demo's network returns its deep-supervision levels
    in training, so the script must use the trainer's loss (train#deep_supervision_loss), not the plain one."""
    cmd = [
        sys.executable,
        str(BENCHMARKS / "train_step.py"),
        "--batch_sizes", "1",
        "--patch", "16,16,16",
        "--repeats", "1",
        "--warmup", "0",
        "--threads", "1",
        "--overrides", '{"network_def#base_channels": 4}',
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=BENCHMARKS, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    row = done.stdout.strip().splitlines()[-1].split()
    assert row[0] == "1" and float(row[1]) > 0, done.stdout
