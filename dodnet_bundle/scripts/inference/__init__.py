"""Inference: the task-aware sliding window, post-processing, the case runner, writers, reports and previews.

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
    "save_image_atomic": "writers",
    "SegmentationWriter": "writers",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
