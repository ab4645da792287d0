"""Inference: task-aware sliding window, post-processing, case runner, writers (NIfTI, DICOM SEG), reports, previews.

Components are named ``scripts.inference.<Name>`` (loaded on first use, see ``scripts.utils.lazy_exports``).
"""

from scripts.utils import lazy_exports

_EXPORTS = {
    "TaskSlidingWindowInferer": "inferer",
    "flip_combinations": "inferer",
    "remove_components_up_to": "postprocessing",
    "apply_post_rule": "postprocessing",
    "TaskPostProcessd": "postprocessing",
    "merge_task_masks": "postprocessing",
    "MergeTaskLabelsd": "postprocessing",
    "SegmentationRunner": "runner",
    "CasesFailedError": "runner",
    "describe_error": "runner",
    "is_cohort_input": "runner",
    "merge_summaries": "runner",
    "save_image_atomic": "writers",
    "remove_stale_temporaries": "writers",
    "SegmentationWriter": "writers",
    "OUTPUT_TYPES": "dicom_seg",
    "parse_output_type": "dicom_seg",
    "dicom_seg_source_problem": "dicom_seg",
    "read_dicom_series": "dicom_seg",
    "series_geometry": "dicom_seg",
    "label_map_on_series": "dicom_seg",
    "segment_descriptions": "dicom_seg",
    "write_dicom_seg": "dicom_seg",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
