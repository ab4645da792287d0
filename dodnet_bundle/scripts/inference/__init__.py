"""Inference: task-aware sliding window, post-processing, case runner, writers (NIfTI, DICOM SEG), reports, previews.

Components are named ``scripts.inference.<Name>`` (loaded on first use, see ``scripts.utils.lazy_exports``).
"""

from scripts.utils import lazy_exports

__getattr__, __dir__, _EXPORTS = lazy_exports(
    __name__, ["inferer", "postprocessing", "components", "pipeline_device", "runner", "writers", "dicom_seg"]
)
__all__ = sorted(_EXPORTS)
