"""The task table: the single source of truth for DoDNet's seven partially labeled tasks.

Everything that needs to know about tasks reads this module: the label mapping used by training
(which of organ/tumor a source dataset labels and how its label values map), the loss masks,
inference merging into one label map, the post-processing rules, reports, previews, the
``channel_def`` of ``configs/metadata.json`` and the label names shown by MONAI Label.

Task order follows the authors' one-hot encoding: 0 liver, 1 kidney, 2 hepatic vessel,
3 pancreas, 4 colon, 5 lung, 6 spleen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

__all__ = [
    "LabelRule",
    "PostRule",
    "TaskSpec",
    "TASKS",
    "NUM_TASKS",
    "TaskSelectionError",
    "task_by_name",
    "resolve_task",
    "resolve_tasks",
    "merged_label_names",
    "merged_label_colors",
    "merged_structures",
    "MERGE_PRECEDENCE",
    "merge_precedence",
    "StructureCodes",
    "STRUCTURE_CODES",
    "structure_codes",
]


@dataclass(frozen=True)
class LabelRule:
    """How a source label value set maps to one binary target channel.

    ``min_value``: voxels with ``label >= min_value`` are foreground; ``equals``: voxels with
    ``label == equals`` are foreground. Exactly one of the two is set.
    """

    min_value: Optional[int] = None
    equals: Optional[int] = None

    def describe(self) -> str:
        return f"label >= {self.min_value}" if self.min_value is not None else f"label == {self.equals}"

    def matches(self, label: Any) -> Any:
        """Foreground under this rule, elementwise: a bool for an int, a bool array/tensor for a numpy array or a
        torch tensor of any shape (``label >= min_value`` or ``label == equals``)."""
        return label >= self.min_value if self.min_value is not None else label == self.equals


@dataclass(frozen=True)
class PostRule:
    """Published per-task post-processing of the thresholded masks.

    organ_components: keep this many largest connected organ components (0 keeps all).
    tumor_inside_organ: remove tumor voxels outside the (post-processed) organ.
    tumor_min_voxels: drop tumor components with this many voxels or fewer (0 keeps all).
    tumor_components: keep this many largest tumor components (0 keeps all).
    """

    organ_components: int = 0
    tumor_inside_organ: bool = False
    tumor_min_voxels: int = 0
    tumor_components: int = 0


@dataclass(frozen=True)
class TaskSpec:
    """One partially labeled task (one source dataset).

    organ_rule / tumor_rule: how the source labels map to the organ / tumor channel; None means
    the source does not label that channel (the channel is "unlabeled", -1 in the target).
    organ_id / tumor_id: the id of the structure in the merged label map (None: not produced).
    """

    id: int
    name: str
    display: str
    source: str
    source_values: Tuple[int, ...]
    organ_rule: Optional[LabelRule]
    tumor_rule: Optional[LabelRule]
    organ_id: Optional[int]
    tumor_id: Optional[int]
    organ_color: Optional[Tuple[int, int, int]]
    tumor_color: Optional[Tuple[int, int, int]]
    post: PostRule
    train_cases: int
    test_cases: int

    @property
    def labels_organ(self) -> bool:
        return self.organ_rule is not None

    @property
    def labels_tumor(self) -> bool:
        return self.tumor_rule is not None

    @property
    def organ_name(self) -> str:
        return self.name.replace("_", " ")

    @property
    def tumor_name(self) -> str:
        return f"{self.organ_name} tumor"

    def structures(self) -> Tuple[Tuple[str, int, int, Tuple[int, int, int]], ...]:
        """The structures this task contributes to the merged map.

        Returns:
            tuples ``(name, channel, merged_id, color)``, channel 0 = organ, 1 = tumor.
        """
        out = []
        if self.organ_id is not None and self.organ_color is not None:
            out.append((self.organ_name, 0, self.organ_id, self.organ_color))
        if self.tumor_id is not None and self.tumor_color is not None:
            out.append((self.tumor_name, 1, self.tumor_id, self.tumor_color))
        return tuple(out)


# fmt: off
TASKS: Tuple[TaskSpec, ...] = (
    TaskSpec(0, "liver", "Liver", "LiTS / MSD Task03_Liver", (0, 1, 2),
             LabelRule(min_value=1), LabelRule(equals=2), 1, 2, (221, 130, 101), (255, 255, 0),
             PostRule(organ_components=1, tumor_inside_organ=True, tumor_min_voxels=50), 104, 27),
    TaskSpec(1, "kidney", "Kidney", "KiTS19", (0, 1, 2),
             LabelRule(min_value=1), LabelRule(equals=2), 3, 4, (185, 102, 83), (255, 128, 0),
             PostRule(organ_components=2, tumor_inside_organ=True, tumor_components=1), 168, 42),
    TaskSpec(2, "hepatic_vessel", "Hepatic vessel", "MSD Task08_HepaticVessel", (0, 1, 2),
             LabelRule(equals=1), LabelRule(equals=2), 5, 6, (0, 151, 206), (255, 0, 255),
             PostRule(tumor_min_voxels=50), 242, 61),
    TaskSpec(3, "pancreas", "Pancreas", "MSD Task07_Pancreas", (0, 1, 2),
             LabelRule(min_value=1), LabelRule(equals=2), 7, 8, (249, 180, 111), (255, 0, 0),
             PostRule(organ_components=1, tumor_inside_organ=True, tumor_min_voxels=50), 224, 57),
    TaskSpec(4, "colon", "Colon", "MSD Task10_Colon", (0, 1),
             None, LabelRule(equals=1), None, 9, None, (0, 255, 0),
             PostRule(tumor_components=1), 100, 26),
    TaskSpec(5, "lung", "Lung", "MSD Task06_Lung", (0, 1),
             None, LabelRule(equals=1), None, 10, None, (0, 255, 255),
             PostRule(tumor_components=1), 50, 13),
    TaskSpec(6, "spleen", "Spleen", "MSD Task09_Spleen", (0, 1),
             LabelRule(equals=1), None, 11, None, (157, 108, 162), None,
             PostRule(organ_components=1), 32, 9),
)
# fmt: on

NUM_TASKS: int = len(TASKS)

_ALIASES: Dict[str, str] = {"hepatic vessel": "hepatic_vessel", "hepaticvessel": "hepatic_vessel", "kidneys": "kidney"}


class TaskSelectionError(ValueError):
    """An unknown task name or id, a task named twice, or an empty task selection (a usage error)."""


def task_by_name(name: str) -> TaskSpec:
    """Look a task up by name (case-insensitive; "hepatic vessel" and "hepatic_vessel" both work)."""
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    for spec in TASKS:
        if spec.name == key:
            return spec
    import difflib

    close = difflib.get_close_matches(key, [t.name for t in TASKS] + list(_ALIASES), n=1)
    hint = f" (did you mean {_ALIASES.get(close[0], close[0])!r}?)" if close else ""
    raise TaskSelectionError(f"unknown task {name!r}{hint}; known tasks: {', '.join(t.name for t in TASKS)}")


def resolve_task(task: Union[str, int]) -> TaskSpec:
    """A task given as a name, an int id or a string holding an int id."""
    if isinstance(task, bool):
        raise TaskSelectionError(f"unknown task {task!r}: expected a name or an id in [0, {NUM_TASKS - 1}]")
    if isinstance(task, str) and task.strip().lstrip("-").isdigit():
        task = int(task)
    if isinstance(task, str):
        return task_by_name(task)
    try:
        index = int(task)
    except (TypeError, ValueError):
        raise TaskSelectionError(f"unknown task {task!r}: expected a name or an id in [0, {NUM_TASKS - 1}]") from None
    if index != task or not 0 <= index < NUM_TASKS:
        raise TaskSelectionError(f"unknown task id {task!r}: expected an id in [0, {NUM_TASKS - 1}]")
    return TASKS[index]


def resolve_tasks(tasks: Union[None, str, int, Sequence[Union[str, int]]]) -> Tuple[TaskSpec, ...]:
    """A task selection: None or "all" -> all tasks; a comma-separated string, a name, an id or a list.

    Raises:
        TaskSelectionError: an unknown task, a task named twice, or an empty selection (``""``, ``","``,
            ``"[]"``, ``[]``): selecting no task is never taken to mean all of them.
    """
    if tasks is None or (isinstance(tasks, str) and tasks.strip().lower() == "all"):
        return TASKS
    given = tasks
    if isinstance(tasks, str):
        tasks = [t for t in tasks.strip().strip("[]").split(",") if t.strip().strip("'\"")]
    elif isinstance(tasks, int):
        tasks = [tasks]
    if not isinstance(tasks, (list, tuple)) or not tasks:
        raise TaskSelectionError(
            f"empty task selection {given!r}: name tasks (e.g. 'liver,kidney') or 'all'; "
            f"known tasks: {', '.join(t.name for t in TASKS)}"
        )
    specs = tuple(resolve_task(t.strip().strip("'\"") if isinstance(t, str) else t) for t in tasks)
    twice = sorted({s.name for s in specs if sum(o.id == s.id for o in specs) > 1})
    if twice:
        raise TaskSelectionError(f"task selection {list(tasks)!r} names {', '.join(twice)} twice")
    return specs


def merged_structures() -> Tuple[Tuple[int, str, TaskSpec, int, Tuple[int, int, int]], ...]:
    """All structures of the merged label map, ordered by merged id.

    Returns:
        tuples ``(merged_id, name, task, channel, color)``.
    """
    rows = [(mid, name, spec, ch, color) for spec in TASKS for name, ch, mid, color in spec.structures()]
    return tuple(sorted(rows, key=lambda r: r[0]))


def merged_label_names() -> Dict[int, str]:
    """``{merged id: name}`` including 0 = background; the ``channel_def`` of metadata.json."""
    names = {0: "background"}
    names.update({mid: name for mid, name, _, _, _ in merged_structures()})
    return names


def merged_label_colors() -> Dict[int, Tuple[int, int, int]]:
    """``{merged id: RGB color}`` for previews and viewers (background black)."""
    colors = {0: (0, 0, 0)}
    colors.update({mid: color for mid, _, _, _, color in merged_structures()})
    return colors


# Painting order of the merged label map where structures overlap (later wins): organs from large to
# small (so hepatic vessels stay visible inside the liver), then every tumor on top of every organ.
# Per-structure masks (inference option) keep the overlaps.
MERGE_PRECEDENCE: Tuple[str, ...] = (
    "liver",
    "spleen",
    "kidney",
    "pancreas",
    "hepatic vessel",
    "hepatic vessel tumor",
    "liver tumor",
    "pancreas tumor",
    "kidney tumor",
    "colon tumor",
    "lung tumor",
)


def merge_precedence() -> Tuple[int, ...]:
    """Merged ids in painting order (lowest precedence first); covers every structure exactly once."""
    by_name = {name: mid for mid, name, _, _, _ in merged_structures()}
    if sorted(MERGE_PRECEDENCE) != sorted(by_name):
        raise RuntimeError(f"MERGE_PRECEDENCE {MERGE_PRECEDENCE} does not list the structures {sorted(by_name)}")
    return tuple(by_name[name] for name in MERGE_PRECEDENCE)


@dataclass(frozen=True)
class StructureCodes:
    """SNOMED CT codes of one structure (scheme designator "SCT"), as ``(code value, code meaning)`` pairs.

    category: the segmented property category (CID 7150); type: the segmented property type (CID 7151);
    region: the anatomic region a tumor or vessel lies in (None for an organ).
    """

    category: Tuple[str, str]
    type: Tuple[str, str]
    region: Optional[Tuple[str, str]] = None


_ANATOMICAL = ("91723000", "Anatomical Structure")
_ABNORMAL = ("49755003", "Morphologically Abnormal Structure")
_NEOPLASM = ("108369006", "Neoplasm")
_LIVER, _KIDNEY, _PANCREAS = ("10200004", "Liver"), ("64033007", "Kidney"), ("15776009", "Pancreas")
_COLON, _LUNG, _SPLEEN = ("71854001", "Colon"), ("39607008", "Lung"), ("78961009", "Spleen")

# The segment descriptions of DICOM SEG outputs: organs are anatomical structures, tumors neoplasms in their organ
# (the MSD hepatic vessel tumors are liver tumors), hepatic vessels blood vessels of the liver.
STRUCTURE_CODES: Dict[str, StructureCodes] = {
    "liver": StructureCodes(_ANATOMICAL, _LIVER),
    "liver tumor": StructureCodes(_ABNORMAL, _NEOPLASM, _LIVER),
    "kidney": StructureCodes(_ANATOMICAL, _KIDNEY),
    "kidney tumor": StructureCodes(_ABNORMAL, _NEOPLASM, _KIDNEY),
    "hepatic vessel": StructureCodes(_ANATOMICAL, ("59820001", "Blood Vessel"), _LIVER),
    "hepatic vessel tumor": StructureCodes(_ABNORMAL, _NEOPLASM, _LIVER),
    "pancreas": StructureCodes(_ANATOMICAL, _PANCREAS),
    "pancreas tumor": StructureCodes(_ABNORMAL, _NEOPLASM, _PANCREAS),
    "colon tumor": StructureCodes(_ABNORMAL, _NEOPLASM, _COLON),
    "lung tumor": StructureCodes(_ABNORMAL, _NEOPLASM, _LUNG),
    "spleen": StructureCodes(_ANATOMICAL, _SPLEEN),
}


def structure_codes(name: str) -> StructureCodes:
    """The SNOMED CT codes of a structure of the merged label map (``"liver tumor"``...)."""
    if name not in STRUCTURE_CODES:
        raise KeyError(f"no SNOMED CT codes for structure {name!r}; known: {', '.join(STRUCTURE_CODES)}")
    return STRUCTURE_CODES[name]
