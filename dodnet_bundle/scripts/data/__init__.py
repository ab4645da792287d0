"""Data: the CT preprocessing chain, label mapping, datalists, inference cases, MOTS-synth and MOTS preparation.

Components are named ``scripts.data.<Name>`` (loaded on first use, see ``scripts.utils.lazy_exports``).
"""

from scripts.utils import lazy_exports

__getattr__, __dir__, _EXPORTS = lazy_exports(
    __name__,
    [
        "transforms",
        "body_crop",
        "label_mapping",
        "datalist",
        "cases",
        "monailabel_compat",
        "preprocess",
        "patches",
        "augment",
    ],
)
__all__ = sorted(_EXPORTS)
