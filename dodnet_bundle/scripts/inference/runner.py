"""The inference loop of ``configs/inference.json``: case by case, one bad case never costs the others.

``SegmentationRunner.run()`` loads the weights (a missing checkpoint stops the run before any case),
then for each case: cheap input checks -> preprocessing (``dataset[i]``) -> task-aware sliding-window
inference -> postprocessing (threshold, published rules, merge, inversion to the input geometry) ->
``SegmentationWriter``. A failing case is recorded with a message naming its file and the run goes
on; ``summary.json`` lists successes and failures; with ``fail_on_error`` the run raises at the end
if any case failed (nonzero exit of ``monai.bundle run``).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import nn
from torch.utils.data import Dataset

from scripts.data.cases import BadInputError, NonCTIntensityWarning, check_input
from scripts.inference.writers import SegmentationWriter
from scripts.networks.weights import load_network_weights
from scripts.utils import as_bool, root_cause, write_json_atomic

__all__ = ["SegmentationRunner", "CasesFailedError", "describe_error"]

logger = logging.getLogger(__name__)


class CasesFailedError(RuntimeError):
    """Raised after a run in which at least one case failed (all other cases were written)."""


def describe_error(error: BaseException) -> str:
    """The first ``BadInputError`` in the cause chain, else the innermost cause, as ``Type: message``."""
    error = root_cause(error, stop_at=(BadInputError,))
    if isinstance(error, BadInputError):  # names the file and the problem
        return str(error)
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


class SegmentationRunner:
    """Run inference over a dataset of cases and write each case's outputs.

    Args:
        dataset: MONAI ``Dataset`` of ``{"image": path, "case": name}`` items with the preprocessing transform.
        network: the network (already on its device).
        inferer: ``TaskSlidingWindowInferer`` (or any ``inferer(inputs, network)``) returning probabilities.
        postprocessing: dict transform turning ``pred`` probabilities into the label map (see inference.json).
        writer: ``SegmentationWriter``.
        ckpt_path: checkpoint loaded into ``network`` before the first case (None: use as is).
        output_dir: where ``summary.json`` goes (default: the writer's folder).
        progress: progress bar over cases.
        fail_on_error: raise ``CasesFailedError`` at the end if any case failed.
        options: entries copied into every report (tasks, tta, post-processing switch...).
    """

    def __init__(
        self,
        dataset: Dataset,
        network: nn.Module,
        inferer: Callable[..., torch.Tensor],
        postprocessing: Callable[[Dict[str, Any]], Dict[str, Any]],
        writer: SegmentationWriter,
        ckpt_path: Optional[Union[str, os.PathLike]] = None,
        output_dir: Optional[Union[str, os.PathLike]] = None,
        progress: Union[bool, str] = True,
        fail_on_error: Union[bool, str] = True,
        options: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.dataset = dataset
        self.network = network
        self.inferer = inferer
        self.postprocessing = postprocessing
        self.writer = writer
        self.ckpt_path = ckpt_path
        self.output_dir = Path(output_dir) if output_dir is not None else writer.output_dir
        self.progress = as_bool(progress)
        self.fail_on_error = as_bool(fail_on_error)
        self.options = dict(options or {})
        self.summary: Dict[str, Any] = {}

    def _device(self) -> torch.device:
        param = next(self.network.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def run_case(self, index: int) -> Dict[str, Any]:
        """Process case ``index`` and return its report (raises on any failure)."""
        item = self.dataset.data[index]  # type: ignore[attr-defined]
        check_input(item["image"])
        try:
            data = self.dataset[index]
        except Exception as e:
            if isinstance(root_cause(e), BadInputError):
                raise
            message = describe_error(e).replace(f" for file: {item['image']}", "")
            kind = "DICOM series" if Path(item["image"]).is_dir() else "image"
            raise BadInputError(f"{item['image']}: cannot load or preprocess this {kind} ({message})") from e
        with torch.no_grad():
            data["pred"] = self.inferer(data["image"][None], self.network)[0]
        data = self.postprocessing(data)
        return self.writer(data, item["case"], input=str(item["image"]), options=self.options)

    def run(self) -> Dict[str, Any]:
        """Process every case; returns (and writes to ``summary.json``) the successes and failures."""
        if self.ckpt_path is not None:
            load_network_weights(self.network, self.ckpt_path)
        self.network.eval()
        items: List[Dict[str, Any]] = list(self.dataset.data)  # type: ignore[attr-defined]
        succeeded, failed = [], []
        indices = range(len(items))
        if self.progress:
            from tqdm import tqdm

            indices = tqdm(indices, desc="dodnet-segment", unit="case")
        for i in indices:
            item, start = items[i], time.time()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    report = self.run_case(i)
                except Exception as e:  # one bad case never costs the others
                    message = describe_error(e)
                    if str(item["image"]) not in message:
                        message = f"{item['image']}: {message}"
                    logger.error("case %s failed: %s", item["case"], message)
                    failed.append({"case": item["case"], "input": str(item["image"]), "error": message})
                    continue
            notes = sorted({str(w.message) for w in caught if issubclass(w.category, NonCTIntensityWarning)})
            if notes:
                report["warnings"] = notes
                write_json_atomic(report, report["outputs"]["report"])
            succeeded.append(
                {
                    "case": item["case"],
                    "input": str(item["image"]),
                    "outputs": report["outputs"],
                    "seconds": round(time.time() - start, 2),
                    "warnings": notes,
                }
            )
        self.summary = {"succeeded": succeeded, "failed": failed, "options": self.options}
        write_json_atomic(self.summary, self.output_dir / "summary.json")
        logger.info("%d case(s) segmented, %d failed", len(succeeded), len(failed))
        if failed and self.fail_on_error:
            lines = "\n".join(f"  {f['error']}" for f in failed)
            raise CasesFailedError(f"{len(failed)} of {len(items)} case(s) failed:\n{lines}")
        return self.summary
