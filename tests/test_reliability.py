"""User mistakes and environment surprises end in one clear line, and the embedded default works on a fresh checkout.

Subprocess runs use the commands exactly as users type them, with a tiny network and one thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from helpers.paths import BUNDLE_ROOT

RUN_TIMEOUT_S = 600


def _env() -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
    env.pop("DODNET_BUNDLE_ROOT", None)
    return env


def _fresh_bundle(tmp_path: Path) -> Path:
    """A bundle folder as a new clone has it: configs and scripts, no .cache, no models, no eval."""
    root = tmp_path / "dodnet_bundle"
    root.mkdir()
    for name in ("configs", "scripts", "LICENSE"):
        (root / name).symlink_to(BUNDLE_ROOT / name)
    return root


def test_training_on_the_embedded_default_from_a_cold_cache(tmp_path):
    """``monai.bundle run`` from the bundle folder, relative bundle_root, no MOTS-synth yet: generates and trains.

    The datalist check reads headers in threads while ITK loads its modules lazily, which changes the working
    directory for a moment; relative paths then were "not found" on the first run only.
    """
    root = _fresh_bundle(tmp_path)
    synth = {"num_per_task": 2, "num_val_per_task": 1, "num_test_per_task": 0}
    args: List[str] = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json",
        "--epochs", "1", "--network_def#base_channels", "4", "--patch_size", "[32,32,16]",
        "--num_workers", "0", "--val_interval", "1", "--synth_options", json.dumps(synth),
    ]  # fmt: skip
    result = subprocess.run(
        args, cwd=root, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "unusable" not in result.stderr
    datalists = list((root / ".cache" / "mots_synth").glob("*/datalist.json"))
    assert len(datalists) == 1 and len(json.loads(datalists[0].read_text())["training"]) == 14
    assert (root / "models" / "model.pt").is_file()
    assert list((root / "models").glob("checkpoint_epoch=1.pt"))


def test_datalist_check_survives_a_working_directory_change_in_a_reader_thread(tmp_path, monkeypatch):
    """A relative datalist is checked against the working directory of the call, whatever ITK does meanwhile
    (simulated: the first header read moves the process elsewhere, as ITK's LibraryLoader does for a moment)."""
    from helpers.tiny_mots import write_tiny_mots

    import scripts.data.datalist as datalist

    write_tiny_mots(tmp_path / "data", shape=(24, 24, 12))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    real = datalist.read_header

    def read_header_moving_cwd(path):
        os.chdir(tmp_path / "elsewhere")
        return real(path)

    monkeypatch.setattr(datalist, "read_header", read_header_moving_cwd)
    items = datalist.load_datalist(dataset_dir="data", split="training", num_workers=2)
    assert items and all(Path(item["image"]).is_absolute() and Path(item["image"]).is_file() for item in items)
