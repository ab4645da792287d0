"""Build DoDNet's datalist from the public MOTS source folders (fire CLI ``dodnet-prepare-mots``).

Recognised layouts (found under ``root`` or given per task):

- MSD ``TaskXX_Name/`` with ``dataset.json`` (its ``training`` list of image/label pairs; the
  unlabeled ``test`` list is not used): Task03_Liver, Task06_Lung, Task07_Pancreas,
  Task08_HepaticVessel, Task09_Spleen, Task10_Colon.
- LiTS: ``volume-N.nii[.gz]`` with ``segmentation-N.nii[.gz]`` anywhere below the folder (the
  "Training Batch 1/2" sub-folders of the challenge download work as they are).
- KiTS19: ``case_XXXXX/imaging.nii.gz`` with ``case_XXXXX/segmentation.nii.gz`` (the ``data/``
  folder of the kits19 repository, or its parent).

KiTS19 stores the slices on NIfTI axis i (arrays are (slices, rows, columns)) and its affine says so.
The bundle's preprocessing reorients every image with ``Orientationd(RAS)`` using the file affine,
which moves the slice axis last like every other source: do NOT transpose KiTS19 arrays by hand (the
authors' code did, because it ignored affines). ``prepare_mots`` reads each KiTS19 header and reports
the axis codes it found; a case whose affine does not map axis i to the superior-inferior direction
(a copy that was already transposed, or an affine lost in conversion) is listed in a warning.

Split rules (``split``): ``"original"``: per task the first ``TaskSpec.train_cases`` cases (sorted by
case number) for training and the next ``TaskSpec.test_cases`` for testing, the authors' rule;
``"ratio"``: the same proportions applied to however many cases a folder holds; ``"none"``: every case
for training. ``val_per_task`` cases are then moved from the end of each task's training part to
``validation``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from scripts.tasks import TaskSpec, resolve_tasks
from scripts.utils import write_json_atomic

__all__ = ["DataPreparationError", "find_task_cases", "prepare_mots", "main", "LAYOUTS", "SPLIT_RULES"]

logger = logging.getLogger("dodnet.prepare_mots")

PathLike = Union[str, os.PathLike]
Case = Tuple[str, Path, Path]  # (case id, image, label)

LAYOUTS: Dict[str, Tuple[str, ...]] = {
    "liver": ("lits", "msd:Task03_Liver"),
    "kidney": ("kits19",),
    "hepatic_vessel": ("msd:Task08_HepaticVessel",),
    "pancreas": ("msd:Task07_Pancreas",),
    "colon": ("msd:Task10_Colon",),
    "lung": ("msd:Task06_Lung",),
    "spleen": ("msd:Task09_Spleen",),
}
"""Public folder layouts accepted per task, in order of preference when ``root`` holds several."""

SPLIT_RULES = ("original", "ratio", "none")

_NIFTI = re.compile(r"\.nii(\.gz)?$")
_LITS = re.compile(r"^(volume|segmentation)-(\d+)\.nii(\.gz)?$")
_KITS_CASE = re.compile(r"^case_(\d+)$")


class DataPreparationError(ValueError):
    """A dataset folder is missing, malformed or has unpaired files (the message lists every problem)."""


def _natural_key(text: str) -> Tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def _msd_cases(folder: Path) -> List[Case]:
    """Image/label pairs of an MSD task folder, from its dataset.json ``training`` list."""
    meta = folder / "dataset.json"
    if not meta.is_file():
        raise DataPreparationError(f"{folder}: no dataset.json (expected an MSD TaskXX_* folder)")
    try:
        training = json.loads(meta.read_text())["training"]
    except (ValueError, KeyError, TypeError) as err:
        raise DataPreparationError(f"{meta}: not a valid MSD dataset.json with a 'training' list ({err})") from None
    cases, problems = [], []
    for entry in training:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            problems.append(f"{meta}: training entry {entry!r} lacks 'image' or 'label'")
            continue
        image, label = folder / entry["image"], folder / entry["label"]
        missing = [str(p) for p in (image, label) if not p.is_file()]
        if missing:
            problems.append(f"{meta}: listed file(s) missing: {', '.join(missing)}")
            continue
        cases.append((_NIFTI.sub("", image.name), image, label))
    if problems:
        raise DataPreparationError("\n".join(problems))
    return sorted(cases, key=lambda c: _natural_key(c[0]))


def _lits_cases(folder: Path) -> List[Case]:
    """volume-N / segmentation-N pairs anywhere below ``folder``."""
    found: Dict[str, Dict[int, Path]] = {"volume": {}, "segmentation": {}}
    problems = []
    for path in sorted(folder.rglob("*.nii*")):
        match = _LITS.match(path.name)
        if not match or path.name.startswith("._"):
            continue
        kind, number = match.group(1), int(match.group(2))
        if number in found[kind]:
            problems.append(f"{folder}: {kind}-{number} found twice: {found[kind][number]} and {path}")
        found[kind][number] = path
    volumes, segs = found["volume"], found["segmentation"]
    for n in sorted(set(volumes) - set(segs)):
        problems.append(f"{volumes[n]}: no matching segmentation-{n}.nii[.gz] (unpaired LiTS volume)")
    for n in sorted(set(segs) - set(volumes)):
        problems.append(f"{segs[n]}: no matching volume-{n}.nii[.gz] (unpaired LiTS segmentation)")
    if problems:
        raise DataPreparationError("\n".join(problems))
    return [(f"volume-{n}", volumes[n], segs[n]) for n in sorted(volumes)]


def _kits_cases(folder: Path, allow_unlabeled: bool) -> List[Case]:
    """case_XXXXX/imaging.nii.gz + segmentation.nii.gz below ``folder`` (or ``folder/data``)."""
    base = folder / "data" if (folder / "data").is_dir() and not any(folder.glob("case_*")) else folder
    cases, problems = [], []
    for case in sorted(p for p in base.iterdir() if p.is_dir() and _KITS_CASE.match(p.name)):
        image, label = case / "imaging.nii.gz", case / "segmentation.nii.gz"
        if not image.is_file():
            problems.append(f"{case}: no imaging.nii.gz")
        elif not label.is_file():
            if not allow_unlabeled:
                problems.append(
                    f"{case}: imaging.nii.gz has no segmentation.nii.gz (KiTS19 test cases 210-299 have none; "
                    "pass allow_unlabeled=True to skip image-only cases)"
                )
        else:
            cases.append((case.name, image, label))
    if problems:
        raise DataPreparationError("\n".join(problems))
    return cases


def kits_axis_report(cases: Sequence[Case]) -> Tuple[Dict[str, int], List[str]]:
    """Count the NIfTI axis codes of KiTS19 images (header only) and list cases whose axis i is not S/I.

    Returns:
        ``({axcodes: count}, [case ids whose affine does not put the slices on axis i])``.
    """
    import nibabel as nib

    counts: Dict[str, int] = {}
    odd = []
    for case_id, image, _ in cases:
        codes = "".join(nib.aff2axcodes(nib.load(str(image)).affine))
        counts[codes] = counts.get(codes, 0) + 1
        if codes[0] not in "SI":
            odd.append(case_id)
    return counts, odd


def _layout_folder(root: Path, layout: str) -> Optional[Path]:
    """The folder of ``layout`` directly under ``root`` (case-insensitive), or None."""
    if not root.is_dir():
        return None
    children = [p for p in root.iterdir() if p.is_dir()]
    if layout.startswith("msd:"):
        name = layout[4:].lower()
        return next((p for p in children if p.name.lower() == name), None)
    names = {"lits": ("lits", "lits17", "lits2017", "liver_lits"), "kits19": ("kits19", "kits", "kits2019")}[layout]
    return next((p for p in children if p.name.lower() in names), None)


def _layout_of(folder: Path) -> str:
    """Guess the layout of an explicitly given folder."""
    if (folder / "dataset.json").is_file():
        return "msd"
    if any(folder.glob("case_*")) or any((folder / "data").glob("case_*")):
        return "kits19"
    return "lits"


def find_task_cases(
    spec: TaskSpec, folder: Optional[PathLike] = None, root: Optional[PathLike] = None, allow_unlabeled: bool = False
) -> Tuple[str, Path, List[Case]]:
    """Locate a task's source folder and list its labeled cases, sorted by case number.

    Args:
        spec: the task.
        folder: the task's source folder (any accepted layout); else it is looked up under ``root``.
        root: folder holding the source folders (``Task03_Liver``, ``LiTS``, ``KiTS19``, ...).
        allow_unlabeled: skip KiTS19 image-only cases instead of reporting them.

    Returns:
        ``(layout, folder, cases)``.

    Raises:
        DataPreparationError: folder missing, no cases, malformed or unpaired files.
    """
    if folder is not None:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise DataPreparationError(f"{spec.name}: source folder {path} does not exist")
        layout = _layout_of(path)
    else:
        if root is None:
            raise DataPreparationError(f"{spec.name}: give root= or {spec.name}= (the task's source folder)")
        root_path = Path(root).expanduser()
        hits = [(lay, _layout_folder(root_path, lay)) for lay in LAYOUTS[spec.name]]
        hits = [(lay, p) for lay, p in hits if p is not None]
        if not hits:
            expected = " or ".join(lay[4:] if lay.startswith("msd:") else lay for lay in LAYOUTS[spec.name])
            raise DataPreparationError(f"{spec.name}: no source folder under {root_path} (expected {expected})")
        layout, path = hits[0]
        layout = "msd" if layout.startswith("msd:") else layout
    if layout == "msd":
        cases = _msd_cases(path)
    elif layout == "kits19":
        cases = _kits_cases(path, allow_unlabeled)
    else:
        cases = _lits_cases(path)
    if not cases:
        raise DataPreparationError(f"{spec.name}: no labeled cases found in {path} (read as a {layout} layout)")
    return layout, path, cases


def split_cases(spec: TaskSpec, cases: Sequence[Case], split: str, val_per_task: int) -> Dict[str, List[Case]]:
    """Split one task's sorted cases into training / validation / test by ``split`` (see module doc)."""
    if split not in SPLIT_RULES:
        raise DataPreparationError(f"unknown split rule {split!r}; choose one of {', '.join(SPLIT_RULES)}")
    n = len(cases)
    if split == "original":
        need = spec.train_cases + spec.test_cases
        if n < need:
            raise DataPreparationError(
                f"{spec.name}: the original split needs {need} labeled cases ({spec.train_cases} train + "
                f"{spec.test_cases} test) but {n} were found; use split='ratio' for a partial copy"
            )
        n_train, n_test = spec.train_cases, spec.test_cases
    elif split == "ratio":
        n_test = int(round(n * spec.test_cases / (spec.train_cases + spec.test_cases)))
        n_test = min(max(n_test, 1 if n > 1 else 0), n - 1)
        n_train = n - n_test
    else:
        n_train, n_test = n, 0
    if not 0 <= val_per_task < n_train:
        raise DataPreparationError(
            f"{spec.name}: val_per_task={val_per_task} must leave at least one of {n_train} training cases"
        )
    training = list(cases[: n_train - val_per_task])
    validation = list(cases[n_train - val_per_task : n_train])
    return {"training": training, "validation": validation, "test": list(cases[n_train : n_train + n_test])}


def prepare_mots(
    root: Optional[PathLike] = None,
    output: Optional[PathLike] = None,
    tasks: Union[None, str, Sequence[Union[str, int]]] = None,
    split: str = "original",
    val_per_task: int = 1,
    allow_unlabeled: bool = False,
    liver: Optional[PathLike] = None,
    kidney: Optional[PathLike] = None,
    hepatic_vessel: Optional[PathLike] = None,
    pancreas: Optional[PathLike] = None,
    colon: Optional[PathLike] = None,
    lung: Optional[PathLike] = None,
    spleen: Optional[PathLike] = None,
) -> str:
    """Write a DoDNet datalist JSON for the public MOTS source folders and return its path.

    Every requested task is checked before anything is written; all problems (missing folders,
    malformed dataset.json, listed files that do not exist, unpaired images/labels) are reported
    together in one ``DataPreparationError``.

    Args:
        root: folder holding the source folders (e.g. ``Task03_Liver/ KiTS19/ Task07_Pancreas/ ...``).
        output: datalist path (default ``<root>/dodnet_datalist.json``); image/label paths in it are
            relative to its folder.
        tasks: tasks to include (default all seven; names, ids or "liver,kidney").
        split: "original" (the paper's per-task counts), "ratio" or "none" (see module doc).
        val_per_task: cases per task moved from the end of the training part to validation.
        allow_unlabeled: skip KiTS19 image-only cases instead of failing.
        liver, kidney, hepatic_vessel, pancreas, colon, lung, spleen: a task's source folder, overriding
            the look-up under ``root``.

    Returns:
        the datalist path (``{"training", "validation", "test"}``, items ``{"image", "label", "task"}``).
    """
    explicit = {
        "liver": liver,
        "kidney": kidney,
        "hepatic_vessel": hepatic_vessel,
        "pancreas": pancreas,
        "colon": colon,
        "lung": lung,
        "spleen": spleen,
    }
    if root is not None and not Path(root).expanduser().is_dir():
        raise DataPreparationError(f"root folder {root} does not exist")
    if output is None:
        if root is None:
            raise DataPreparationError("give output= (the datalist path) when no root folder is given")
        output = Path(root).expanduser() / "dodnet_datalist.json"
    out_path = Path(output).expanduser().resolve()
    specs = resolve_tasks(tasks)
    found, problems = {}, []
    for spec in specs:
        try:
            found[spec.name] = find_task_cases(spec, explicit[spec.name], root, allow_unlabeled)
            split_cases(spec, found[spec.name][2], split, val_per_task)
        except DataPreparationError as err:
            problems.append(str(err))
    if problems:
        raise DataPreparationError("cannot build the datalist:\n" + "\n".join(problems))
    datalist: Dict[str, List[Dict[str, str]]] = {"training": [], "validation": [], "test": []}
    for spec in specs:
        layout, folder, cases = found[spec.name]
        parts = split_cases(spec, cases, split, val_per_task)
        for part, part_cases in parts.items():
            for _, image, label in part_cases:
                datalist[part].append(
                    {
                        "image": os.path.relpath(image.resolve(), out_path.parent),
                        "label": os.path.relpath(label.resolve(), out_path.parent),
                        "task": spec.name,
                    }
                )
        sizes = ", ".join(f"{len(v)} {k}" for k, v in parts.items())
        logger.info("%s: %s layout at %s: %d cases (%s)", spec.name, layout, folder, len(cases), sizes)
        if layout == "kits19":
            counts, odd = kits_axis_report(cases)
            logger.info(
                "%s: NIfTI axis codes %s; slices on axis i are moved last by Orientationd(RAS) at load",
                spec.name,
                counts,
            )
            if odd:
                logger.warning(
                    "%s: %d case(s) whose affine does not map NIfTI axis i to superior-inferior (transposed or lost "
                    "affine?): %s",
                    spec.name,
                    len(odd),
                    ", ".join(odd[:20]),
                )
    write_json_atomic(datalist, out_path)
    return str(out_path)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point ``dodnet-prepare-mots`` (fire): ``dodnet-prepare-mots --root DIR [--split ratio]``."""
    from scripts.cli_errors import fire_call, run_cli

    def cli(args: List[str]) -> None:
        called = fire_call("dodnet-prepare-mots", prepare_mots, args)
        if called is not None:
            print(called[0])  # the datalist's path

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_cli("dodnet-prepare-mots", cli, argv)


if __name__ == "__main__":
    main()
