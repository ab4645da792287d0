"""Do the fast inference paths keep the demo's accuracy? Dice per task of each path against fp32 eager.

Runs ``configs/inference.json`` (the product's inference path: preprocessing, sliding window over all
seven tasks, post-processing, inversion to the input grid) on the demo's held-out test volumes once per
path, scores every case's per-structure masks against its own-task label (``scripts.demo.score_structure_masks``) and
prints, per task and structure, the mean Dice of each path and its difference from fp32 eager. The
target (issue 6): every difference <= 0.005.

    bash dev.sh demo                                       # trains demo_output/models/model.pt
    python benchmarks/fast_path_dice.py --demo_dir demo_output

Paths: ``fp32-eager`` (contiguous memory format), ``fp32-cl`` (channels-last 3-D), ``bf16-cl`` (bf16
autocast + channels-last), ``bf16-eager``, ``bf16-cl-compiled`` (bf16 channels-last with the
``torch.compile``-fused dynamic head, ``compile_head``). Prints one JSON line at the end (``--json`` also writes it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "dodnet_bundle"
sys.path.insert(0, str(BUNDLE_ROOT))

from scripts.demo import _workflow, demo_inference_overrides, finished_run, score_structure_masks  # noqa: E402
from scripts.tasks import TASKS  # noqa: E402

PATHS: Dict[str, Tuple[str, bool, bool]] = {
    "fp32-eager": ("fp32", False, False),
    "fp32-cl": ("fp32", True, False),
    "bf16-cl": ("bf16", True, False),
    "bf16-eager": ("bf16", False, False),
    "bf16-cl-compiled": ("bf16", True, True),
}
"""Path name -> (precision, channels_last, compile_head) of configs/inference.json."""
REFERENCE = "fp32-eager"
TOLERANCE = 0.005


def run_path(
    demo_dir: Path, run_flags: Dict, items: List[Dict], root: Path, path: str, out_dir: Path, postprocess: bool
) -> Dict:
    """Infer every test case with one path (``run_flags``: the run's ``finished_run`` overrides); returns
    ``{"seconds", "dice": {task: {structure: [per case]}}}``."""
    precision, channels_last, compile_head = PATHS[path]
    overrides = {
        **demo_inference_overrides(demo_dir / "models" / "model.pt", run_flags),  # the run's network and post_rules
        "input": [str(root / item["image"]) for item in items],
        "output_dir": str(out_dir),
        "precision": precision,
        "channels_last": channels_last,
        "compile_head": compile_head,
        "device": "$torch.device('cpu')",
        "progress": False,
        "save_masks": True,
        "postprocess": postprocess,
    }
    start = time.time()
    _workflow(["inference.json"], None, overrides)
    seconds = time.time() - start
    dice: Dict[str, Dict[str, List[Optional[float]]]] = {}
    for item in items:
        case = Path(item["image"]).name.split(".")[0]
        scores = score_structure_masks(out_dir, case, root / item["label"], item["task"])
        for structure, value in scores.items():
            dice.setdefault(item["task"], {}).setdefault(structure, []).append(value)
    return {"seconds": round(seconds, 1), "dice": dice}


def demo_datalist(demo_dir: Path, result: Dict) -> Path:
    """The datalist the demo run trained and tested on (``demo_dir/data`` may hold other sizes' data sets)."""
    if "datalist" in result:
        return demo_dir / result["datalist"]
    s = result["settings"]  # runs from before the datalist was recorded: match the data set's sizes
    sizes = f"_{s['num_per_task']}-{s.get('num_val_per_task', 1)}-{s.get('num_test_per_task', 2)}"
    found = [p for p in sorted(demo_dir.glob("data/*/datalist.json")) if p.parent.name.endswith(sizes)]
    if len(found) != 1:
        sys.exit(f"{demo_dir}/data: {len(found)} MOTS-synth data sets match the demo's sizes {sizes}; rerun the demo")
    return found[0]


def mean(values: List[Optional[float]]) -> Optional[float]:
    scored = [v for v in values if v is not None]
    return float(np.mean(scored)) if scored else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo_dir", default="demo_output", help="output_dir of a finished demo run")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {list(PATHS)}")
    parser.add_argument("--json", default=None, help="also write the result here")
    parser.add_argument(
        "--no_postprocess",
        action="store_true",
        help="score the thresholded network output without the per-task post-processing (whose size cut-offs "
        "can flip a small tumor on a tiny probability change)",
    )
    args = parser.parse_args()
    demo_dir = Path(args.demo_dir).resolve()
    try:
        result, run_flags = finished_run(demo_dir)
    except FileNotFoundError as err:
        sys.exit(str(err))
    datalist = demo_datalist(demo_dir, result)
    items = json.loads(datalist.read_text())["test"]
    paths = [p for p in args.paths.split(",") if p]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        sys.exit(f"unknown paths {unknown}; choose from {list(PATHS)}")
    if REFERENCE not in paths:
        paths.insert(0, REFERENCE)

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            print(f"{path}: {len(items)} test volumes ...", flush=True)
            runs[path] = run_path(
                demo_dir, run_flags, items, datalist.parent, path, Path(tmp) / path, not args.no_postprocess
            )

    header = f"{'task':<16}{'structure':<22}" + "".join(f"{p:>12}" for p in paths) + f"{'max |diff|':>12}"
    lines, worst = [header], 0.0
    for spec in TASKS:
        for structure in runs[REFERENCE]["dice"].get(spec.name, {}):
            means = [mean(runs[p]["dice"][spec.name][structure]) for p in paths]
            ref = means[0]
            diffs = [abs(m - ref) for m in means[1:] if m is not None and ref is not None]
            worst = max([worst] + diffs)
            cells = "".join(f"{'n/a' if m is None else f'{m:.4f}':>12}" for m in means)
            lines.append(f"{spec.display:<16}{structure:<22}{cells}{max(diffs, default=0.0):>12.4f}")
    lines.append("inference seconds (all test volumes, CPU): " + ", ".join(f"{p} {runs[p]['seconds']}" for p in paths))
    lines.append(f"largest per-task Dice difference from {REFERENCE}: {worst:.4f} (target <= {TOLERANCE})")
    print("\n".join(lines))
    summary = {
        "paths": paths,
        "test_volumes": len(items),
        "postprocess": not args.no_postprocess,
        "max_abs_dice_diff": round(worst, 5),
        "target": TOLERANCE,
        "met": worst <= TOLERANCE,
        "seconds": {p: runs[p]["seconds"] for p in paths},
        "dice_means": {p: {t: {s: mean(v) for s, v in d.items()} for t, d in runs[p]["dice"].items()} for p in paths},
    }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
