"""Preprocess a datalist once into memory-mappable arrays, the nnU-Net way (fire CLI ``dodnet-preprocess``).

``dodnet-preprocess DATALIST OUTPUT_DIR [--workers N]`` (or ``python -m scripts.data.preprocess`` from the
bundle folder) runs the bundle's one deterministic chain (``scripts.data.ct_preprocessing``: load, orientation,
resampling to ``pixdim``, HU window to [-1, 1]) on every item of every split, crops each case to the body's
bounding box as inference's body crop finds it (``scripts.data.body_crop.body_bounding_box``: the largest connected
component above ``body_hu`` on a copy strided by ``body_downsample``; widened to every labeled voxel, plus
``margin`` voxels) and writes::

    OUTPUT_DIR/
        manifest.json            parameters (pixdim, hu_range, body crop, format version) and per-case records
        datalist.json            the input's splits, items pointing at the cases below
        cases/<name>/image.npy   (1, H, W, D) float16, windowed intensities in [-1, 1]
        cases/<name>/label.npy   (1, H, W, D) uint8, the source dataset's label values
        cases/<name>/locations.npz  per label value v > 0: (n, 3) int32 voxel coordinates, a random sample of
                                 at most ``max_locations`` voxels with that value (foreground-biased crops)
        cases/<name>/case.json   geometry (crop box, resampled shape and affine, cropped affine), voxel counts
                                 per label value, bytes; written last

``np.load(path, mmap_mode="r")`` opens the arrays without reading them, so training copies out one patch per
sample (``scripts.data.LoadPatchd``). Each case is written into a temporary folder that is renamed into place
when complete: a killed run resumes where it stopped, and no reader sees half a case. A folder made with other
parameters is refused. An unreadable or corrupt case is reported by file name and skipped; the exit status is
1 when any case failed, 2 for usage errors.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from scripts.data.body_crop import DEFAULT_BODY_HU, body_bounding_box, hu_to_scaled
from scripts.utils import write_json_atomic

__all__ = [
    "PREPROCESS_VERSION",
    "MANIFEST_NAME",
    "CASE_RECORD_NAME",
    "PreprocessError",
    "preprocess_case",
    "preprocess_datalist",
]

PathLike = Union[str, os.PathLike]

PREPROCESS_VERSION = 2
"""Format version of a preprocessed folder; bumped whenever the written arrays change (2: inference's body crop)."""

MANIFEST_NAME = "manifest.json"
CASE_RECORD_NAME = "case.json"
CASES_DIR = "cases"
SPLITS = ("training", "validation", "test")
_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".npy")
DEFAULT_BODY_DOWNSAMPLE = 4
DEFAULT_MARGIN = 8
"""Body crop defaults, as ``scripts.data.body_crop.BodyCropd`` (inference) uses them."""


class PreprocessError(ValueError):
    """A preprocessing request that cannot run (bad datalist, output folder made with other parameters)."""


def _params(
    pixdim: Sequence[float],
    hu_range: Sequence[float],
    margin: int,
    max_locations: int,
    body_hu: float = DEFAULT_BODY_HU,
    body_downsample: int = DEFAULT_BODY_DOWNSAMPLE,
) -> Dict[str, Any]:
    pixdim = [float(p) for p in pixdim]
    hu_range = [float(h) for h in hu_range]
    if len(pixdim) != 3 or min(pixdim) <= 0:
        raise PreprocessError(f"pixdim must be three positive spacings in mm, got {pixdim}")
    if len(hu_range) != 2 or hu_range[0] >= hu_range[1]:
        raise PreprocessError(f"hu_range must be [low, high] with low < high, got {hu_range}")
    if int(margin) < 0 or int(max_locations) < 1:
        raise PreprocessError(f"margin must be >= 0 and max_locations >= 1, got {margin} and {max_locations}")
    if int(body_downsample) < 1:
        raise PreprocessError(f"body_downsample must be >= 1, got {body_downsample}")
    return {
        "version": PREPROCESS_VERSION,
        "pixdim": pixdim,
        "hu_range": hu_range,
        "body_hu": float(body_hu),
        "body_downsample": int(body_downsample),
        "margin": int(margin),
        "max_locations": int(max_locations),
        "image_dtype": "float16",
        "label_dtype": "uint8",
    }


def _case_stem(path: str) -> str:
    name = Path(str(path).rstrip("/")).name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def crop_box(image: Any, label: Any, params: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
    """The stored part of a resampled case: ``(start, end)`` int64 voxel indices (end exclusive), 3 per axis.

    The body's bounding box as inference finds it (``body_bounding_box`` of the (1, H, W, D) windowed ``image``
    at ``params["body_hu"]`` on a copy strided by ``params["body_downsample"]``), widened to contain every
    labeled voxel of ``label`` (1, H, W, D) (a label outside the body, e.g. on a separate component, is kept),
    plus ``params["margin"]`` voxels, clipped at the grid. No body found: the whole grid.
    """
    shape = np.asarray(image.shape[1:], dtype=np.int64)
    threshold = hu_to_scaled(params["body_hu"], params["hu_range"])
    body_start, body_end = body_bounding_box(image, threshold, params["body_downsample"])
    start, end = np.asarray(body_start, dtype=np.int64), np.asarray(body_end, dtype=np.int64)
    if np.array_equal(start, np.zeros(3)) and np.array_equal(end, shape):
        return start, end
    foreground = torch.as_tensor(label[0]) > 0.5
    if bool(foreground.any()):
        for axis in range(3):
            hits = torch.nonzero(foreground.any(dim=tuple(a for a in range(3) if a != axis))).flatten()
            start[axis] = min(start[axis], int(hits[0]))
            end[axis] = max(end[axis], int(hits[-1]) + 1)
    margin = int(params["margin"])
    return np.maximum(start - margin, 0), np.minimum(end + margin, shape)


def preprocess_case(item: Dict[str, Any], case_dir: PathLike, params: Dict[str, Any]) -> Dict[str, Any]:
    """Preprocess one datalist item into ``case_dir`` (written atomically as a folder).

    Args:
        item: ``{"image": path, "label": path, "task": name}`` with absolute paths and the canonical task name.
        case_dir: the case's final folder; it must not exist yet.
        params: the preprocessing parameters (``_params``).

    Returns:
        the case record (also written to ``case_dir/case.json``).

    Raises:
        ValueError: the label has values outside the task's source set or is not an integer map.
        Exception: whatever reading or resampling the files raises (the caller reports it by file name).
    """
    from monai.transforms import Compose

    from scripts.data.transforms import ct_preprocessing
    from scripts.tasks import resolve_task

    spec = resolve_task(item["task"])
    chain = Compose(ct_preprocessing("image", ["label"], pixdim=params["pixdim"], hu_range=params["hu_range"]))
    out = chain({"image": item["image"], "label": item["label"]})
    image, label = out["image"], out["label"]
    affine = np.asarray(image.affine, dtype=np.float64)
    resampled_shape = [int(s) for s in image.shape[1:]]
    start, end = crop_box(image, label, params)
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, end))
    image_np = np.asarray(image.detach().cpu().numpy()[(slice(None), *box)], dtype=np.float16)
    label_f = np.asarray(label.detach().cpu().numpy()[(slice(None), *box)])
    label_np = np.rint(label_f)
    if label_np.size and (label_np.min() < 0 or label_np.max() > 255 or not np.allclose(label_np, label_f)):
        raise ValueError(f"label {item['label']} is not an integer label map with values in 0-255")
    label_np = label_np.astype(np.uint8)
    counts = np.bincount(label_np.ravel(), minlength=256)
    values = [int(v) for v in np.flatnonzero(counts)]
    bad = sorted(set(values) - set(spec.source_values))
    if bad:
        raise ValueError(
            f"label {item['label']} has values {set(bad)} outside the {spec.name} task's source set "
            f"{set(spec.source_values)}"
        )
    crop_affine = affine.copy()
    crop_affine[:3, 3] = affine[:3, :3] @ start.astype(np.float64) + affine[:3, 3]
    rng = np.random.default_rng(zlib.crc32(Path(case_dir).name.encode()))
    locations: Dict[str, np.ndarray] = {}
    spatial = label_np.shape[1:]
    for value in values:
        if value == 0:
            continue
        flat = np.flatnonzero(label_np[0] == value)
        if flat.size > params["max_locations"]:
            flat = np.sort(rng.choice(flat, size=params["max_locations"], replace=False))
        locations[str(value)] = np.stack(np.unravel_index(flat, spatial), axis=1).astype(np.int32)

    final = Path(case_dir)
    tmp = final.with_name(f".tmp-{os.getpid()}-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        np.save(tmp / "image.npy", image_np)
        np.save(tmp / "label.npy", label_np)
        np.savez(tmp / "locations.npz", **locations)
        record = {
            "params": params,
            "task": spec.name,
            "source_image": str(item["image"]),
            "source_label": str(item["label"]),
            "shape": [int(s) for s in spatial],
            "spacing": [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)],
            "resampled_shape": resampled_shape,
            "crop_start": [int(s) for s in start],
            "crop_end": [int(e) for e in end],
            "resampled_affine": affine.tolist(),
            "affine": crop_affine.tolist(),
            "voxels_per_value": {str(v): int(counts[v]) for v in values},
            "bytes": int(sum(p.stat().st_size for p in tmp.iterdir())),
        }
        write_json_atomic(record, tmp / CASE_RECORD_NAME)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def _run_one(args: Tuple[Dict[str, Any], str, Dict[str, Any], bool]) -> Tuple[str, Optional[Dict[str, Any]], str]:
    """Process-pool task: ``(case folder name, record or None, error message)``."""
    item, case_dir, params, debug = args
    from scripts.data.datalist import _check_item

    name = Path(case_dir).name
    try:
        checked, problems = _check_item(item, Path("/"), require_label=True, check_values=False)
        if problems:
            return name, None, "; ".join(problems)
        return name, preprocess_case(checked, case_dir, params), ""
    except Exception as err:  # reported by file name, the other cases go on
        if debug:
            raise
        return name, None, f"{type(err).__name__}: {err}".strip().splitlines()[0]


def _read_items(datalist: Path) -> Dict[str, List[Dict[str, Any]]]:
    if not datalist.is_file():
        raise PreprocessError(f"datalist not found: {datalist}")
    try:
        content = json.loads(datalist.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PreprocessError(f"datalist {datalist} is not readable JSON: {err}") from None
    if not isinstance(content, dict) or not any(isinstance(content.get(s), list) for s in SPLITS):
        raise PreprocessError(f"datalist {datalist} has none of the lists {list(SPLITS)}")
    splits: Dict[str, List[Dict[str, Any]]] = {}
    for split in SPLITS:
        items = content.get(split)
        if not isinstance(items, list):
            continue
        splits[split] = []
        for index, item in enumerate(items):
            if not isinstance(item, dict) or not item.get("image") or not item.get("label") or "task" not in item:
                raise PreprocessError(f"datalist {datalist}, {split} item {index}: needs image, label and task")
            resolved = dict(item)
            for key in ("image", "label"):
                path = Path(os.path.expanduser(str(item[key])))
                resolved[key] = str(path if path.is_absolute() else datalist.parent / path)
            splits[split].append(resolved)
    return splits


def _check_manifest(output_dir: Path, params: Dict[str, Any]) -> Dict[str, Any]:
    """The existing manifest's case records; refuses a folder made with other parameters."""
    path = output_dir / MANIFEST_NAME
    if not path.is_file():
        if (output_dir / CASES_DIR).is_dir() and any((output_dir / CASES_DIR).iterdir()):
            raise PreprocessError(f"{output_dir} holds cases but no {MANIFEST_NAME}; use an empty output folder")
        return {}
    try:
        manifest = json.loads(path.read_text())
        old = manifest["params"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PreprocessError(f"{path} is not a preprocessing manifest ({err}); use another output folder") from None
    if old != params:
        diff = ", ".join(f"{k} {old.get(k)!r} (asked {params[k]!r})" for k in params if old.get(k) != params[k])
        raise PreprocessError(
            f"{output_dir} holds cases preprocessed with other parameters: {diff}; "
            "use another output folder or remove this one"
        )
    return dict(manifest.get("cases", {}))


def preprocess_datalist(
    datalist: PathLike,
    output_dir: PathLike,
    workers: int = 2,
    pixdim: Sequence[float] = (0.8, 0.8, 1.5),
    hu_range: Sequence[float] = (-325.0, 325.0),
    margin: int = DEFAULT_MARGIN,
    max_locations: int = 10000,
    progress: bool = True,
    debug: bool = False,
    body_hu: float = DEFAULT_BODY_HU,
    body_downsample: int = DEFAULT_BODY_DOWNSAMPLE,
) -> Tuple[Path, List[str]]:
    """Preprocess every item of ``datalist`` into ``output_dir``; see the module docstring for the layout.

    Args:
        datalist: the input datalist JSON (item paths absolute or relative to its folder).
        output_dir: the preprocessed folder (created; resumed when it holds cases made with the same parameters).
        workers: processes preprocessing cases in parallel (0: in this process).
        pixdim: target spacing in mm, (H, W, D) order (as ``configs/train.json``'s ``pixdim``).
        hu_range: HU window mapped to [-1, 1] (as ``hu_range``).
        margin: voxels kept around the body's bounding box (inference's ``BodyCropd`` default).
        max_locations: stored foreground voxel coordinates per label value and case.
        progress: show a tqdm progress bar.
        debug: raise the first error with its traceback instead of skipping the case.
        body_hu: body threshold in HU (``scripts.data.body_crop.DEFAULT_BODY_HU``, as inference).
        body_downsample: stride of the copy the body is found on (as inference).

    Returns:
        ``(path of the written datalist, ["<image file>: <problem>" for every failed case])``.

    Raises:
        PreprocessError: unreadable datalist, or ``output_dir`` made with other parameters.
    """
    from tqdm import tqdm

    params = _params(pixdim, hu_range, margin, max_locations, body_hu, body_downsample)
    datalist = Path(os.path.expanduser(str(datalist)))
    output_dir = Path(os.path.expanduser(str(output_dir)))
    splits = _read_items(datalist)
    output_dir.mkdir(parents=True, exist_ok=True)
    records = _check_manifest(output_dir, params)
    write_json_atomic(
        {"params": params, "source_datalist": str(datalist), "cases": records}, output_dir / MANIFEST_NAME
    )
    cases_dir = output_dir / CASES_DIR
    cases_dir.mkdir(exist_ok=True)

    names: Dict[Tuple[str, str], str] = {}  # (image, label) -> case folder name, stable across runs
    used: Dict[str, int] = {}
    for items in splits.values():
        for item in items:
            key = (item["image"], item["label"])
            if key not in names:
                stem = _case_stem(item["image"])
                used[stem] = used.get(stem, 0) + 1
                names[key] = stem if used[stem] == 1 else f"{stem}-{used[stem]}"
    todo, failures = [], []
    by_name = {name: key for key, name in names.items()}
    items_by_key = {(i["image"], i["label"]): i for items in splits.values() for i in items}
    for name, key in by_name.items():
        record_path = cases_dir / name / CASE_RECORD_NAME
        if record_path.is_file():
            try:
                record = json.loads(record_path.read_text())
            except (OSError, ValueError):
                record = None
            if isinstance(record, dict) and record.get("params") == params:
                records[name] = {k: record[k] for k in ("task", "source_image", "shape", "spacing", "bytes")}
                continue
            shutil.rmtree(cases_dir / name)  # left by a run that was killed between rename and record: redo
        todo.append((items_by_key[key], str(cases_dir / name), params, debug))

    def collect(name: str, record: Optional[Dict[str, Any]], error: str) -> None:
        if record is None:
            failures.append(f"{items_by_key[by_name[name]]['image']}: {error}")
        else:
            records[name] = {k: record[k] for k in ("task", "source_image", "shape", "spacing", "bytes")}

    bar = tqdm(
        total=len(by_name), initial=len(by_name) - len(todo), desc="preprocess", unit="case", disable=not progress
    )
    if int(workers) <= 0 or len(todo) <= 1:
        for args in todo:
            collect(*_run_one(args))
            bar.update()
    else:
        import multiprocessing

        with ProcessPoolExecutor(max_workers=int(workers), mp_context=multiprocessing.get_context("spawn")) as pool:
            for result in pool.map(_run_one, todo):
                collect(*result)
                bar.update()
    bar.close()

    out_splits: Dict[str, List[Dict[str, Any]]] = {}
    for split, items in splits.items():
        out_splits[split] = []
        for item in items:
            name = names[(item["image"], item["label"])]
            if name not in records:
                continue
            case = f"{CASES_DIR}/{name}"
            out_item = {k: v for k, v in item.items() if k not in ("image", "label")}
            out_item.update(
                image=f"{case}/image.npy",
                label=f"{case}/label.npy",
                locations=f"{case}/locations.npz",
                case=case,
                task=records[name]["task"],
            )
            out_splits[split].append(out_item)
    manifest = {
        "params": params,
        "source_datalist": str(datalist),
        "num_cases": len(records),
        "total_bytes": int(sum(r["bytes"] for r in records.values())),
        "cases": dict(sorted(records.items())),
    }
    write_json_atomic(manifest, output_dir / MANIFEST_NAME)
    out_path = write_json_atomic(out_splits, output_dir / "datalist.json")
    return out_path, failures


def preprocess_cli(args: List[str]) -> int:
    """``dodnet-preprocess DATALIST OUTPUT_DIR [--workers N]``: returns 1 when some cases failed (listed on stderr)."""
    from scripts.cli_errors import fire_call

    called = fire_call("dodnet-preprocess", preprocess_datalist, args)
    if called is None:  # --help
        return 0
    path, failures = called[0]
    if failures:
        print(f"dodnet-preprocess: {len(failures)} case(s) failed and were skipped:", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"dodnet-preprocess: wrote {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point ``dodnet-preprocess`` (fire); exit status 0 ok, 1 failed cases, 2 usage errors (one line;
    ``--debug`` shows tracebacks and stops at the first failing case)."""
    from scripts.cli_errors import USAGE_EXIT, run_cli

    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_cli(
        "dodnet-preprocess",
        lambda args: preprocess_cli(args + (["--debug"] if debug else [])),
        argv,
        extra=((PreprocessError, USAGE_EXIT),),  # this module's class, also when run with python -m
    )


if __name__ == "__main__":
    main()
