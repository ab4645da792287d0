"""Data: the CT preprocessing chain, label mapping, datalists, inference cases, MOTS-synth and MOTS preparation.

Components are named ``scripts.data.<Name>`` (loaded on first use, see ``scripts.utils.lazy_exports``).
"""

from scripts.utils import lazy_exports

_EXPORTS = {
    "ct_loader": "transforms",
    "DEFAULT_BODY_HU": "body_crop",
    "hu_to_scaled": "body_crop",
    "body_bounding_box": "body_crop",
    "BodyMask": "body_crop",
    "BodyCropd": "body_crop",
    "ct_preprocessing": "transforms",
    "DEFAULT_PIXDIM": "transforms",
    "DEFAULT_HU_RANGE": "transforms",
    "UNLABELED": "label_mapping",
    "MapTaskLabelsd": "label_mapping",
    "apply_rule": "label_mapping",
    "label_source_name": "label_mapping",
    "DatalistError": "datalist",
    "load_datalist": "datalist",
    "read_header": "datalist",
    "DEFAULT_DATALIST_NAME": "datalist",
    "IMAGE_SUFFIXES": "cases",
    "BadInputError": "cases",
    "NonCTIntensityWarning": "cases",
    "find_cases": "cases",
    "case_name": "cases",
    "check_input": "cases",
    "dicom_series": "cases",
    "CheckCTImaged": "cases",
    "StashStringItemsd": "monailabel_compat",
    "RestoreStashedItemsd": "monailabel_compat",
    "STASH_KEY": "monailabel_compat",
    "PREPROCESS_VERSION": "preprocess",
    "MANIFEST_NAME": "preprocess",
    "CASE_RECORD_NAME": "preprocess",
    "PreprocessError": "preprocess",
    "preprocess_case": "preprocess",
    "preprocess_datalist": "preprocess",
    "LoadPatchd": "patches",
    "LoadPreprocessedCased": "patches",
    "load_preprocessed_datalist": "patches",
    "cases_per_task": "patches",
    "patch_window": "patches",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
