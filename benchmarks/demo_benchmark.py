"""Time and Dice of the main job (``bash dev.sh demo``), the numbers the README quotes.

Runs ``scripts.demo.run_demo`` from scratch (training from a fresh checkpoint folder; the MOTS-synth
cache is reused unless ``--fresh_data``) and prints one JSON line with the wall time of each step,
the organ Dice averaged over the tasks with organ labels (target >= 0.88), the tumor Dice averaged over the six
tumor classes (target >= 0.55), the per-structure test
Dice, the machine's core count and its load average before and after (other processes on the same
cores slow the run; quote the load with the time)::

    python benchmarks/demo_benchmark.py --output_dir demo_output
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dodnet_bundle"))

from scripts.demo import DEMO_DEFAULTS, run_demo  # noqa: E402

TARGET_SECONDS = 360.0
TARGET_ORGAN_DICE = 0.88
TARGET_TUMOR_DICE = 0.55


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--fresh_data", action="store_true", help="regenerate MOTS-synth (counts toward the time)")
    parser.add_argument("--epochs", type=int, default=DEMO_DEFAULTS["epochs"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.fresh_data:
        shutil.rmtree(Path(args.output_dir) / "data", ignore_errors=True)
    start = time.time()
    result = run_demo(output_dir=args.output_dir, epochs=args.epochs, threads=args.threads or None)
    wall = time.time() - start
    structures = result["summary"].get("structures", {})
    line = {
        "wall_s": round(wall, 1),
        "times_s": result["times_s"],
        "organ_mean_dice": round(result["organ_mean_dice"], 4),
        "tumor_mean_dice": round(result["tumor_mean_dice"], 4),
        "dice": {k: (None if v.get("dice_mean") is None else round(v["dice_mean"], 4)) for k, v in structures.items()},
        "held_out": result["held_out"],
        "meets_time_target": wall <= TARGET_SECONDS,
        "meets_dice_target": result["organ_mean_dice"] >= TARGET_ORGAN_DICE
        and result["tumor_mean_dice"] >= TARGET_TUMOR_DICE,
        "cpu": result["cpu"],
        "cpu_count": result["cpu_count"],
        "load_average": result["load_average"],
        "settings": result["settings"],
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
