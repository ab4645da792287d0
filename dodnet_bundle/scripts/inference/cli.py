"""``dodnet-segment``: whole-volume segmentation from the command line, a thin layer over inference.json.

    dodnet-segment INPUT OUTPUT_DIR [--tasks liver,kidney] [--tta] [--device cuda] [--preview]
                   [--precision bf16] [--compile_head] [--ckpt models/model.pt] [--save_masks]
                   [--save_probabilities] [--no_postprocess] [--output_type nifti|dicom_seg|both]

INPUT is a NIfTI/NRRD file, a DICOM series folder, a folder of those, or several of them separated
by commas. The command only turns its options into overrides of ``configs/inference.json`` and runs
that config with MONAI's ``ConfigWorkflow``: the config stays the one definition of the pipeline.
It prints a summary of successes and failures and exits with status 1 if any case failed.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from scripts.utils import BUNDLE_ROOT

__all__ = ["segment", "segment_main"]


def _as_list(value: Union[str, Sequence[str]]) -> List[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def segment(
    input: Union[str, Sequence[str]],
    output_dir: str,
    tasks: Union[str, Sequence[str]] = "all",
    tta: bool = False,
    device: Optional[str] = None,
    precision: Optional[str] = None,
    compile_head: bool = False,
    compile_network: bool = False,
    preview: bool = False,
    ckpt: Optional[str] = None,
    save_masks: bool = False,
    save_probabilities: bool = False,
    no_postprocess: bool = False,
    output_type: str = "nifti",
    sw_batch_size: Optional[int] = None,
    progress: bool = True,
    threads: Optional[int] = None,
    config_file: Optional[str] = None,
    args_file: Optional[str] = None,
    **overrides: Any,
) -> Dict[str, Any]:
    """Segment every case of ``input`` into ``output_dir`` with the bundle's inference config.

    Args:
        input: a file, a DICOM series folder, a folder of cases, or several (list or comma-separated).
        output_dir: destination of ``<case>_seg.nii.gz``, ``<case>_report.json`` and ``summary.json``.
        tasks: "all" or task names ("liver,kidney").
        tta: 8-flip test-time augmentation.
        device: "cpu", "cuda", "cuda:1" (default: CUDA when available).
        precision: "fp32" (default), "bf16" (fast on CPUs with AVX-512 bf16/AMX and on GPUs) or "fp16" (GPUs).
        compile_head: run the dynamic heads as ``torch.compile``-fused kernels (faster when all tasks run;
            compiles for a few seconds first; needs a C++ compiler on the CPU).
        compile_network: ``torch.compile`` the whole network (fastest on GPUs; compiles for tens of seconds first).
        preview: also write ``<case>_preview.png``.
        ckpt: weights file (default: the bundle's ``models/model.pt``).
        save_masks / save_probabilities: per-structure outputs.
        no_postprocess: skip the published per-task post-processing.
        output_type: "nifti" (``<case>_seg.nii.gz``), "dicom_seg" (``<case>_seg.dcm``, DICOM series inputs only)
            or "both".
        sw_batch_size: windows per network call.
        progress: progress bar over cases.
        threads: CPU threads of torch and ITK (default: the CPUs this process may run on, at most).
        config_file: another inference config (default: the bundle's ``configs/inference.json``).
        args_file: a JSON or YAML file of config ids and values, as ``monai.bundle run --args_file`` takes
            (the demo writes one for its network and weights: ``demo_output/demo_inference.json``); the command
            line's options and ids take precedence.
        overrides: any further config id, e.g. ``--patch_size "[96,96,64]"`` or ``--network_def#base_channels 8``;
            a name that is neither an option nor an id of the config is refused with the closest valid names.

    Returns:
        the run summary (``succeeded`` and ``failed`` lists).

    Raises:
        scripts.cli_errors.UsageError: an unknown option, an empty or unknown task selection, an output folder
            that cannot be written (all checked before any case).
    """
    from monai.bundle import ConfigParser, ConfigWorkflow

    from scripts.cli_errors import check_output_location, check_overrides
    from scripts.tasks import resolve_tasks

    root = BUNDLE_ROOT
    config_path = str(config_file or root / "configs" / "inference.json")
    if args_file is not None:
        overrides = {**_read_args_file(args_file), **overrides}
    check_overrides(ConfigParser.load_config_files(config_path), overrides, inspect.signature(segment).parameters)
    names = [t.name for t in resolve_tasks(_as_list(tasks) if str(tasks).strip().lower() != "all" else "all")]
    inputs = _as_list(input)
    settings: Dict[str, Any] = {
        "bundle_root": str(root),
        "input": inputs[0] if len(inputs) == 1 else inputs,
        "output_dir": str(Path(output_dir)),
        "tasks": names,
        "tta": bool(tta),
        "postprocess": not no_postprocess,
        "preview": bool(preview),
        "save_masks": bool(save_masks),
        "save_probabilities": bool(save_probabilities),
        "output_type": str(output_type),
        "progress": bool(progress),
        "fail_on_error": False,
    }
    check_output_location(settings["output_dir"])
    if threads is not None:
        settings["threads"] = int(threads)
    if device is not None:
        settings["device"] = f"$torch.device({str(device)!r})"
    if precision is not None:
        settings["precision"] = str(precision)
    if compile_head:
        settings["compile_head"] = True
    if compile_network:
        settings["compile_network"] = True
    if ckpt is not None:
        settings["ckpt_path"] = str(Path(ckpt))
    if sw_batch_size is not None:
        settings["sw_batch_size"] = int(sw_batch_size)
    settings.update(overrides)
    workflow = ConfigWorkflow(
        config_file=config_path,
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(root / "configs" / "logging.conf"),
        workflow_type="infer",
        **settings,
    )
    workflow.initialize()
    summary = workflow.run()[-1]  # the last run step is the runner; the first installs the error hook
    workflow.finalize()
    return summary


def _read_args_file(path: str) -> Dict[str, Any]:
    """The config ids and values of an ``args_file`` (JSON or YAML), checked to be a mapping."""
    from monai.bundle import ConfigParser

    from scripts.cli_errors import UsageError

    if not Path(path).is_file():
        raise UsageError(f"--args_file {path}: no such file")
    try:
        content = ConfigParser.load_config_file(path)
    except Exception as e:  # noqa: BLE001 - any parse error is the file's
        raise UsageError(f"--args_file {path}: cannot read it as JSON or YAML ({e})") from None
    if not isinstance(content, dict):
        raise UsageError(f"--args_file {path}: expected a mapping of config ids to values")
    return dict(content)


def _print_summary(summary: Dict[str, Any], output_dir: str) -> None:
    ok, bad, skipped = summary["succeeded"], summary["failed"], summary.get("skipped", [])
    done = f", {len(skipped)} finished earlier (skipped)" if skipped else ""
    print(f"\ndodnet-segment: {len(ok)} case(s) segmented{done}, {len(bad)} failed; outputs in {output_dir}")
    for case in ok:
        extra = f" (warning: {'; '.join(case['warnings'])})" if case.get("warnings") else ""
        main = case["outputs"].get("label_map") or case["outputs"].get("dicom_seg") or case["outputs"]["report"]
        print(f"  ok      {case['case']}: {main}{extra}")
        phases = {k: v for k, v in case.get("phases", {}).items() if k != "total"}
        if phases:
            print("          " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()) + f" ({case['seconds']:.1f} s)")
        pipeline = case.get("pipeline", {})
        if pipeline.get("resident") or pipeline.get("fallback"):
            note = f"; {pipeline['fallback']}" if pipeline.get("fallback") else ""
            print(
                f"          {pipeline['device']}, peak GPU memory {pipeline['peak_gpu_memory_mb'] / 1024:.2f} GB{note}"
            )
    for case in skipped:
        print(f"  skipped {case['case']}: finished earlier with the same options")
    for case in bad:
        print(f"  FAILED  {case['case']}: {case['error']}")


def segment_main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point (``dodnet-segment``): exit 2 on a usage error (options, tasks, weights, output folder),
    1 if any case failed; user errors print one line (the traceback with ``--debug``)."""
    from scripts.cli_errors import run_cli

    run_cli("dodnet-segment", _segment_cli, argv)


def _segment_cli(args: List[str]) -> Optional[int]:
    from scripts.cli_errors import fire_call

    called = fire_call("dodnet-segment", segment, args)
    if called is None:  # --help
        return None
    summary, arguments = called
    _print_summary(summary, arguments["output_dir"])
    return 1 if summary["failed"] else None


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    segment_main()
