"""The labeled test-set evaluation of ``configs/evaluate.json``: the weights loader and the metrics saver.

Each test case is segmented for its own task only (the evaluator passes the item's ``task_id`` to
the network), giving binary (organ, tumor) masks (2, H, W, D) on the preprocessed grid
(0.8 x 0.8 x 1.5 mm, where the paper measured too). ``scripts.inference.postprocessing.TaskPostProcessd``
with ``task_id_key`` applies the case's published post-processing rule. ``StructureMetricsSaver``
scores each channel the case's source dataset labels (a channel filled with -1 by
``MapTaskLabelsd`` is skipped) with the shared metrics of ``scripts.evaluation.metrics`` (Dice, HD95 in mm,
NSD) and writes the per case x structure CSV and the JSON summary with the 11-class Table 6
averages, atomically, when the run completes (and, with what it has, when the run fails).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch

from scripts.data.label_mapping import UNLABELED
from scripts.evaluation.folders import case_id
from scripts.evaluation.metrics import (
    DEFAULT_NSD_TOLERANCE_MM,
    spacing_from_affine,
    structure_metrics,
    summarize,
    write_metrics_csv,
    write_metrics_json,
)
from scripts.networks.weights import load_network_weights
from scripts.tasks import resolve_task

__all__ = ["WeightsLoader", "StructureMetricsSaver"]

logger = logging.getLogger(__name__)


class WeightsLoader:
    """Ignite handler: strict load of the trained weights into ``network`` when the run starts.

    A missing file raises ``scripts.networks.weights.MissingWeightsError`` naming the path and how to get
    weights (train, or convert the authors' checkpoint), before any case is loaded.
    """

    def __init__(self, network: torch.nn.Module, path: Union[str, Path]) -> None:
        self.network = network
        self.path = path

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any = None) -> None:
        load_network_weights(self.network, self.path)


def _task_of(value: Any) -> int:
    return int(torch.as_tensor(value).reshape(-1)[0])


class StructureMetricsSaver:
    """Ignite handler: Dice, HD95 (mm) and NSD per case and structure, saved as CSV and JSON summary.

    Reads, per item of each iteration, the binary prediction (2, H, W, D) and the target
    (2, H, W, D) (-1 = unlabeled channel) from ``engine.state.output`` and the task id from
    ``engine.state.batch``; voxel spacing comes from the label's affine. A case whose scoring raises
    is recorded with its error and the run continues. Under ``torch.distributed`` the rows of all
    ranks are gathered and rank 0 writes.

    Args:
        output_dir: folder of ``csv_name`` and ``summary_name``.
        pred_key, label_key: keys in the engine output; task_id_key: key in the engine batch.
        nsd_tolerance_mm: NSD tolerance in mm.
        both_empty: ``"exclude"`` or ``"count"`` (see ``scripts.evaluation.metrics``).
        threshold: prediction values above it are foreground (the masks are usually already binary).
        csv_name, summary_name: output file names.
    """

    def __init__(
        self,
        output_dir: Union[str, Path],
        pred_key: str = "pred",
        label_key: str = "label",
        task_id_key: str = "task_id",
        nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
        both_empty: str = "exclude",
        threshold: float = 0.5,
        csv_name: str = "metrics.csv",
        summary_name: str = "summary.json",
    ) -> None:
        if both_empty not in ("exclude", "count"):
            raise ValueError(f"both_empty must be 'exclude' or 'count', got {both_empty!r}")
        self.output_dir = Path(output_dir)
        self.pred_key, self.label_key, self.task_id_key = pred_key, label_key, task_id_key
        self.nsd_tolerance_mm = float(nsd_tolerance_mm)
        self.both_empty = both_empty
        self.threshold = float(threshold)
        self.csv_name, self.summary_name = csv_name, summary_name
        self.rows: List[Dict[str, Any]] = []
        self.failed: List[Dict[str, str]] = []
        self.summary: Optional[Dict[str, Any]] = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)

    def reset(self, engine: Any = None) -> None:
        self.rows, self.failed, self.summary = [], [], None

    @staticmethod
    def _case_name(label: Any, index: int) -> str:
        meta = getattr(label, "meta", {}) or {}
        name = meta.get("filename_or_obj")
        if name:
            path = Path(str(name))
            return case_id(path) or path.name
        return f"case_{index:04d}"

    def score_case(self, pred: torch.Tensor, label: torch.Tensor, task_id: int) -> List[Dict[str, Any]]:
        """Rows of the labeled structures of one case: pred/label (2, H, W, D), task id of the case."""
        spec = resolve_task(task_id)
        if pred.shape != label.shape or pred.shape[0] != 2:
            raise ValueError(
                f"expected prediction and label of shape (2, ...), got {tuple(pred.shape)} and {tuple(label.shape)}"
            )
        affine = getattr(label, "affine", None)
        if affine is None:
            affine = getattr(pred, "affine", None)
        if affine is not None:
            spacing = spacing_from_affine(affine)
        else:
            spacing = (1.0,) * (pred.dim() - 1)
            logger.warning("no affine on the label or prediction: HD95 and NSD are in voxels, not mm")
        rows = []
        for structure, channel, _, _ in spec.structures():
            ref = torch.as_tensor(label[channel]).detach().cpu()
            if bool((ref <= UNLABELED).all()):
                continue  # the source dataset does not label this channel
            p = (torch.as_tensor(pred[channel]).detach().cpu().float() > self.threshold).numpy()
            r = (ref > 0.5).numpy()
            rows.append(
                {"task": spec.name, "structure": structure, **structure_metrics(p, r, spacing, self.nsd_tolerance_mm)}
            )
        return rows

    def iteration_completed(self, engine: Any) -> None:
        outputs, batch = engine.state.output, engine.state.batch
        if isinstance(outputs, Mapping):  # not decollated: (B, ...) tensors
            outputs = [{k: v[i] for k, v in outputs.items()} for i in range(len(outputs[self.pred_key]))]
        if isinstance(batch, Mapping):
            batch = [{self.task_id_key: t} for t in torch.as_tensor(batch[self.task_id_key]).reshape(-1)]
        for out, item in zip(outputs, batch):
            label = out[self.label_key]
            case = self._case_name(label, len(self.rows) + len(self.failed))
            try:
                rows = self.score_case(out[self.pred_key], label, _task_of(item[self.task_id_key]))
            except Exception as exc:  # one bad case must not lose the others
                message = f"{type(exc).__name__}: {exc}"
                logger.error("evaluation of case %s failed: %s", case, message)
                self.failed.append({"case": case, "error": message})
                self.rows.append({"case": case, "status": "error", "error": message})
                continue
            self.rows.extend({"case": case, **r} for r in rows)

    def _gathered(self, gather: bool) -> tuple[List[Dict[str, Any]], List[Dict[str, str]], bool, str]:
        """Rows and failures of all ranks (``gather``) or of this one; whether to write; a file-name suffix."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank()
            if not gather:  # e.g. after an exception on this rank only: a collective call could hang
                return self.rows, self.failed, True, f"_rank{rank}"
            parts: List[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, (self.rows, self.failed))
            rows = [r for p in parts for r in p[0]]
            failed = [f for p in parts for f in p[1]]
            return rows, failed, rank == 0, ""
        return self.rows, self.failed, True, ""

    def write(self, complete: bool = True, gather: bool = True) -> Dict[str, Any]:
        """Write the CSV and the JSON summary of the cases scored so far (all ranks' when ``gather``).

        Under ``torch.distributed`` without ``gather`` each rank writes its own files with a ``_rank<r>``
        suffix. Returns the summary.
        """
        rows, failed, writer, suffix = self._gathered(gather)
        cases = sorted({r["case"] for r in rows})
        summary: Dict[str, Any] = {
            "complete": complete,
            "cases": len(cases),
            "cases_evaluated": len(cases) - len({f["case"] for f in failed}),
            "failed": failed,
            "nsd_tolerance_mm": self.nsd_tolerance_mm,
            "both_empty": self.both_empty,
            "grid": "preprocessed (resampled) image grid; distances in mm",
            **summarize(rows, both_empty=self.both_empty),
        }
        if writer:
            csv_path, json_path = Path(self.csv_name), Path(self.summary_name)
            write_metrics_csv(self.output_dir / f"{csv_path.stem}{suffix}{csv_path.suffix}", rows)
            write_metrics_json(self.output_dir / f"{json_path.stem}{suffix}{json_path.suffix}", summary)
            t6 = summary["table6_average"]
            logger.info(
                "evaluation of %d case(s): mean Dice %s, HD95 %s mm over %d of 11 classes; written to %s",
                summary["cases"],
                "n/a" if t6["dice"] is None else f"{t6['dice']:.4f}",
                "n/a" if t6["hd95_mm"] is None else f"{t6['hd95_mm']:.2f}",
                len(t6["classes"]),
                self.output_dir,
            )
        self.summary = summary
        return summary

    def completed(self, engine: Any) -> None:
        summary = self.write(complete=True)
        t6 = summary["table6_average"]
        if t6["dice"] is not None:
            engine.state.metrics["table6_mean_dice"] = t6["dice"]
        if t6["hd95_mm"] is not None:
            engine.state.metrics["table6_mean_hd95_mm"] = t6["hd95_mm"]

    def exception_raised(self, engine: Any, e: Exception) -> None:
        if self.rows:
            self.write(complete=False, gather=False)
        raise e
