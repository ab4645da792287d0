"""Evaluation: per-structure metrics, validation Dice, the labeled-test-set handlers and folder evaluation.

Components are named ``scripts.evaluation.<Name>`` (loaded on first use, see ``scripts.utils.lazy_exports``).
"""

from scripts.utils import lazy_exports

_EXPORTS = {
    "DEFAULT_NSD_TOLERANCE_MM": "metrics",
    "TABLE6_STRUCTURES": "metrics",
    "CSV_COLUMNS": "metrics",
    "structure_task": "metrics",
    "spacing_from_affine": "metrics",
    "structure_metrics": "metrics",
    "summarize": "metrics",
    "write_metrics_csv": "metrics",
    "write_metrics_json": "metrics",
    "TaskDiceMetric": "validation_dice",
    "TaskDiceHandler": "validation_dice",
    "structure_metric_names": "validation_dice",
    "WeightsLoader": "handlers",
    "StructureMetricsSaver": "handlers",
    "merged_mapping": "folders",
    "source_mapping": "folders",
    "TOTALSEGMENTATOR_MAPPING": "folders",
    "preset_names": "folders",
    "resolve_label_mapping": "folders",
    "case_id": "folders",
    "pair_cases": "folders",
    "load_label_map": "folders",
    "check_geometry": "folders",
    "evaluate_case": "folders",
    "evaluate_folders": "folders",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
