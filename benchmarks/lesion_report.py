"""Where a trained demo network's tumor channel fails, lesion by lesion.

For each held-out test volume of the chosen tasks (the demo's own split), one line: the raw tumor Dice (logit
above 0, no post-processing), every reference lesion (a connected component of the task's tumor label) with
its voxels, median HU, largest tumor logit and voxels found, and the false-positive components (predicted
voxels that do not touch a lesion) with their voxels and median HU. Missed lesions of one brightness or false
positives of one tissue show what the network has not learned yet.

    bash dev.sh demo                                              # trains demo_output/models/model.pt
    python benchmarks/lesion_report.py --demo_dir demo_output --tasks liver,hepatic_vessel
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation_synth import PATCH, volume_transform  # noqa: E402  (sets up the bundle's sys.path too)
from monai.data import load_decathlon_datalist  # noqa: E402

from scripts.demo import _parser, finished_run  # noqa: E402
from scripts.networks.weights import load_network_weights  # noqa: E402
from scripts.tasks import TaskSelectionError, resolve_task  # noqa: E402


def _components(
    mask: np.ndarray, hu: np.ndarray, logit: Optional[np.ndarray] = None, found: Optional[np.ndarray] = None
) -> List[Dict[str, float]]:
    """Each connected component of ``mask``: voxels and median HU, with ``logit`` its largest logit and with
    ``found`` its voxels in ``found``."""
    labels, count = ndimage.label(mask)
    out = []
    for i in range(1, count + 1):
        component = labels == i
        entry = {"voxels": int(component.sum()), "hu": float(np.median(hu[component]))}
        if logit is not None:
            entry["max_logit"] = float(logit[component].max())
        if found is not None:
            entry["found"] = int((found & component).sum())
        out.append(entry)
    return out


def lesion_report(demo_dir: Path, tasks: List[str]) -> List[Dict[str, object]]:
    """One entry per test volume of ``tasks``: ``{"case", "task", "dice", "lesions", "false_positives"}``."""
    result, flags = finished_run(demo_dir)
    parser = _parser(["train.json", "demo.json"], flags)
    network = load_network_weights(parser.get_parsed_content("network_def"), demo_dir / "models" / "model.pt").eval()
    hu_scale = max(abs(v) for v in parser.get_parsed_content("hu_range"))  # the clip [-325, 325] -> [-1, 1]
    wanted = {resolve_task(t).name for t in tasks}
    items = load_decathlon_datalist(str(demo_dir / result["datalist"]), True, "test")
    transform = volume_transform(PATCH)
    rows: List[Dict[str, object]] = []
    with torch.no_grad():
        for source in (i for i in items if resolve_task(i["task"]).name in wanted):
            item = transform(source)
            task = int(item["task_id"])
            logit = network(item["image"][None].as_subclass(torch.Tensor), torch.tensor([task]))[0, 1].numpy()
            reference = (item["label"][1] > 0).numpy()
            hu = item["image"][0].numpy() * hu_scale
            found = logit > 0
            rows.append(
                {
                    "case": Path(source["image"]).name,
                    "task": resolve_task(task).name,
                    "dice": float(2 * (found & reference).sum() / max(1, found.sum() + reference.sum())),
                    "lesions": _components(reference, hu, logit, found),
                    "false_positives": _components(found & ~ndimage.binary_dilation(reference), hu),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo_dir", default="demo_output", help="output_dir of a finished demo run")
    parser.add_argument("--tasks", default="liver,hepatic_vessel", help="comma-separated task names")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args()
    try:
        rows = lesion_report(Path(args.demo_dir), [t for t in args.tasks.split(",") if t])
    except (FileNotFoundError, TaskSelectionError) as err:  # no finished run there; a misspelled task
        sys.exit(f"lesion_report: {err}")
    for row in rows:
        lesions = "; ".join(
            f"{x['voxels']} vox {x['hu']:.0f} HU max logit {x['max_logit']:.1f} found {x['found']}"
            for x in row["lesions"]
        )
        fps = "; ".join(f"{x['voxels']} vox {x['hu']:.0f} HU" for x in row["false_positives"]) or "none"
        print(f"{row['case']}: tumor Dice {row['dice']:.2f} | lesions: {lesions} | false positives: {fps}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
