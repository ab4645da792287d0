"""The inference loop of ``configs/inference.json``: case by case, one bad case never costs the others.

``SegmentationRunner.run()`` loads the weights (a missing checkpoint stops the run before any case),
then for each case: cheap input checks -> preprocessing (the dataset's chain) -> task-aware sliding-window
inference -> postprocessing (threshold, published rules, merge, inversion to the input geometry) ->
``SegmentationWriter``, each phase timed (``scripts.inference.timing``: the report's ``seconds``, the
summary's ``phases``). With a GPU-resident pipeline (``scripts.inference.pipeline_device``) the report's
``pipeline`` gives the device and the case's peak GPU memory, and a case that runs out of GPU memory is rerun
on the host pipeline (preprocessing and post-processing on the CPU, windows still on the GPU). A failing case
is recorded with a message naming its file and the run goes on; ``summary.json`` lists successes, failures and
skipped cases; with ``fail_on_error`` the run raises at the end if any case failed (nonzero exit of
``monai.bundle run``).

Resuming: with ``skip_existing`` a case whose report (written last, the commit marker) matches the current
options and whose listed outputs all exist is skipped; temporary files of dead processes are removed first.

Several processes (``torchrun``, ``configs/mgpu_inference.json``): each rank runs its own shard of the cases
(the dataset is built from ``monai.data.partition_dataset``), the ranks' results are gathered with
``torch.distributed.all_gather_object`` and rank 0 writes the one ``summary.json`` after all ranks finished.
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

from scripts.cli_errors import check_output_location
from scripts.data.cases import IMAGE_SUFFIXES, BadInputError, NonCTIntensityWarning, check_input
from scripts.inference.lock import run_lock
from scripts.inference.pipeline_device import PipelineDevice
from scripts.inference.timing import PhaseTimer, postprocessing_phase, preprocessing_phase
from scripts.inference.writers import SegmentationWriter, remove_stale_temporaries
from scripts.networks.weights import load_network_weights
from scripts.utils import as_bool, root_cause, write_json_atomic

__all__ = ["SegmentationRunner", "CasesFailedError", "describe_error", "is_cohort_input", "merge_summaries"]

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


def is_cohort_input(input: Any) -> bool:
    """True when ``input`` (or an item of a list) is a folder of cases: it holds image files or subfolders,
    unlike a DICOM series folder (where ``skip_existing="auto"`` resumes)."""
    items = [input] if isinstance(input, (str, os.PathLike)) else list(input or [])
    for item in items:
        p = Path(item)
        if p.is_dir() and any(c.is_dir() or c.name.lower().endswith(IMAGE_SUFFIXES) for c in p.iterdir()):
            return True
    return False


def merge_summaries(parts: List[Dict[str, List[Dict[str, Any]]]]) -> Dict[str, List[Dict[str, Any]]]:
    """Merge the ranks' ``succeeded`` / ``failed`` / ``skipped`` lists, each sorted by case name."""
    return {
        key: sorted((entry for part in parts for entry in part.get(key, [])), key=lambda e: e["case"])
        for key in ("succeeded", "failed", "skipped")
    }


def _distributed() -> Any:
    """``torch.distributed`` when a process group is running, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


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
        options: entries copied into every report (tasks, tta, post-processing switch...); with the weights
            file's size and modification time and the writer's settings they decide whether a case is finished.
        skip_existing: skip finished cases (see ``SegmentationWriter.finished``); "auto": when ``input`` is a
            folder of cases.
        input: the config's input (only read for ``skip_existing="auto"``).
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
        skip_existing: Union[bool, str] = "auto",
        input: Any = None,
        pipeline_device: Optional[PipelineDevice] = None,
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
        auto = isinstance(skip_existing, str) and skip_existing.strip().lower() == "auto"
        self.skip_existing = is_cohort_input(input) if auto else as_bool(skip_existing)
        self.pipeline_device = pipeline_device
        self.summary: Dict[str, Any] = {}

    def _device(self) -> torch.device:
        param = next(self.network.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def case_options(self) -> Dict[str, Any]:
        """The options stored in each report: ``options`` plus the weights file's identity (path, size, mtime)."""
        options = dict(self.options)
        if self.ckpt_path is not None and Path(self.ckpt_path).is_file():
            stat = Path(self.ckpt_path).stat()
            options["weights"] = {"path": str(self.ckpt_path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        return options

    def run_case(self, index: int, options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Process case ``index`` and return its report (raises on any failure).

        Warnings about non-CT intensities go into the report (``warnings``), which the writer writes last. On a
        GPU-resident pipeline an out-of-memory error reruns the case on the host pipeline (one log line, and
        ``pipeline.fallback`` in the report).
        """
        pipeline = self.pipeline_device
        if pipeline is None or not pipeline.resident:
            return self._run_case(index, options)
        try:
            return self._run_case(index, options)
        except torch.OutOfMemoryError as e:
            reason = describe_error(e)[:200]
        # outside the except block, so the failed attempt's tensors (held by the traceback) are freed first
        case = self.dataset.data[index]["case"]  # type: ignore[attr-defined]
        logger.warning("%s: out of GPU memory on the GPU-resident pipeline; rerunning on the host pipeline", case)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        with pipeline.on_host():
            return self._run_case(index, options, fallback=f"host pipeline after {reason}")

    def _run_case(
        self, index: int, options: Optional[Dict[str, Any]] = None, fallback: Optional[str] = None
    ) -> Dict[str, Any]:
        item = self.dataset.data[index]  # type: ignore[attr-defined]
        timer = PhaseTimer(self._device())
        pipeline = self.pipeline_device
        if pipeline is not None:
            pipeline.reset_peak_memory()
        check_case = getattr(self.writer, "check_case", None)
        with timer.phase("load"):  # the cheap checks read the file once
            if check_case is not None:
                check_case(item["image"])
            check_input(item["image"])
        transform = getattr(self.dataset, "transform", None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if transform is None:
                    with timer.phase("preprocess"):
                        data = self.dataset[index]
                else:  # the dataset's own chain, one step at a time: loading and preprocessing timed apart
                    data = timer.run_chain(transform, dict(item), preprocessing_phase)
            except Exception as e:
                if isinstance(root_cause(e), BadInputError):
                    raise
                message = describe_error(e).replace(f" for file: {item['image']}", "")
                kind = "DICOM series" if Path(item["image"]).is_dir() else "image"
                raise BadInputError(f"{item['image']}: cannot load or preprocess this {kind} ({message})") from e
            with torch.no_grad(), timer.phase("network"):
                data["pred"] = self.inferer(data["image"][None], self.network)[0]
            data = timer.run_chain(self.postprocessing, data, postprocessing_phase)
        notes = sorted({str(w.message) for w in caught if issubclass(w.category, NonCTIntensityWarning)})
        options = self.case_options() if options is None else options
        crop = data.get("body_crop", {"enabled": False, "fraction": 1.0})  # the grid's share the windows covered
        info: Dict[str, Any] = {"body_crop": crop}
        if pipeline is not None:
            info["pipeline"] = {
                "device": str(pipeline.device),
                "resident": pipeline.resident,
                "peak_gpu_memory_mb": round(pipeline.peak_memory_bytes() / 2**20, 1),
            }
            if fallback is not None:
                info["pipeline"]["fallback"] = fallback
        return self.writer(
            data, item["case"], input=str(item["image"]), options=options, warnings=notes, timer=timer, **info
        )

    def run(self) -> Dict[str, Any]:
        """Process every case (of this rank's shard); returns (and writes to ``summary.json``) the successes,
        failures and skipped cases (of all ranks).

        The output folders are locked for the run (``scripts.inference.lock``): a second run into the same
        folder is refused before any case instead of overwriting this run's ``summary.json``.
        """
        with run_lock([self.writer.output_dir, self.output_dir]):
            return self._run()

    def _run(self) -> Dict[str, Any]:
        dist = _distributed()
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)
        for folder in {self.writer.output_dir, self.output_dir}:  # a file in its place, not writable: no case runs
            check_output_location(folder)
        if self.ckpt_path is not None:
            load_network_weights(self.network, self.ckpt_path)
        self.network.eval()
        if rank == 0:  # before any rank writes: no temporary file of this run can be mistaken for a dead one
            for folder in {self.writer.output_dir, self.output_dir}:
                remove_stale_temporaries(folder)
        if dist is not None:
            dist.barrier()
        items: List[Dict[str, Any]] = list(self.dataset.data)  # type: ignore[attr-defined]
        options = self.case_options()
        part: Dict[str, List[Dict[str, Any]]] = {"succeeded": [], "failed": [], "skipped": []}
        indices = range(len(items))
        if self.progress:
            from tqdm import tqdm

            indices = tqdm(indices, desc="dodnet-segment" + (f" rank {rank}" if world > 1 else ""), unit="case")
        for i in indices:
            item, start = items[i], time.time()
            where = {"rank": rank} if world > 1 else {}
            done = self.writer.finished(item["case"], str(item["image"]), options) if self.skip_existing else None
            if done is not None:
                logger.info("case %s: finished by an earlier run, skipped", item["case"])
                part["skipped"].append(
                    {"case": item["case"], "input": str(item["image"]), "outputs": done["outputs"], **where}
                )
                continue
            try:
                report = self.run_case(i, options)
            except Exception as e:  # one bad case never costs the others
                message = describe_error(e)
                if str(item["image"]) not in message:
                    message = f"{item['image']}: {message}"
                logger.error("case %s failed: %s", item["case"], message)
                part["failed"].append({"case": item["case"], "input": str(item["image"]), "error": message, **where})
                continue
            part["succeeded"].append(
                {
                    "case": item["case"],
                    "input": str(item["image"]),
                    "outputs": report["outputs"],
                    "seconds": round(time.time() - start, 2),
                    "phases": report.get("seconds", {}),
                    "warnings": report.get("warnings", []),
                    **({"pipeline": report["pipeline"]} if "pipeline" in report else {}),
                    **where,
                }
            )
        if dist is not None:
            parts: List[Any] = [None] * world
            dist.all_gather_object(parts, part)
            merged = merge_summaries(parts)
        else:
            merged = part
        self.summary = {**merged, "options": self.options}
        if world > 1:
            self.summary["world_size"] = world
        if rank == 0:
            write_json_atomic(self.summary, self.output_dir / "summary.json")
        if dist is not None:
            dist.barrier()  # summary.json is complete when any rank returns
        ok, bad, skipped = (len(self.summary[k]) for k in ("succeeded", "failed", "skipped"))
        logger.info("%d case(s) segmented, %d skipped (finished earlier), %d failed", ok, skipped, bad)
        if bad and self.fail_on_error:
            lines = "\n".join(f"  {f['error']}" for f in self.summary["failed"])
            raise CasesFailedError(f"{bad} of {ok + bad + skipped} case(s) failed:\n{lines}")
        return self.summary
