"""Custom code of the DoDNet bundle; importable as ``scripts`` with the bundle root on sys.path."""

import atexit
import logging
import warnings

__all__ = ["ignore_library_noise"]

# MONAI's LoadImage builds every default reader; with pydicom installed (highdicom, for DICOM SEG output) the
# nvImageCodec DICOM reader logs and warns that its GPU decoder is missing, on each one. The bundle reads with ITK.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)


def ignore_library_noise() -> None:
    """Warning filters for library warnings that tell a user nothing; call again after ``warnings.simplefilter``.

    - ITK's SWIG-generated extension types (SwigPyObject, SwigPyPacked, swigvarlink) have no __module__; Python
      warns about each when ITK loads a module and once more at interpreter exit ("sys:1: DeprecationWarning:
      builtin type swigvarlink has no __module__ attribute"). Every entry point imports this package before ITK.
    - The nvImageCodec DICOM reader's missing GPU decoder (above).
    """
    warnings.filterwarnings(
        "ignore",
        message=r"builtin type (swigvarlink|SwigPyObject|SwigPyPacked) has no __module__",
        category=DeprecationWarning,
    )
    warnings.filterwarnings("ignore", message=r"NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")


class _FilterRefresh(UserWarning):
    """Issued, and ignored, once at exit by ``_refresh_warning_filters``."""


ignore_library_noise()


@atexit.register  # registered on import, so it runs after the exit handlers registered later
def _refresh_warning_filters() -> None:
    """Hand the interpreter's final clean-up the current warning filters.

    A warning issued inside ``warnings.catch_warnings()`` (the inference runner records each case's warnings under
    "always") leaves the interpreter's C-level state holding that block's copy of the filters. ITK's exit warning
    comes when the ``warnings`` module is already gone, so that stale copy decides and lets it through. Any warning
    issued now, outside such blocks, points the state at the current filters, with the library filters in front.
    """
    ignore_library_noise()
    warnings.filterwarnings("ignore", category=_FilterRefresh)
    warnings.warn("refresh the warning filters", _FilterRefresh)
