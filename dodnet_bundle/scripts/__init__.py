"""Custom code of the DoDNet bundle; importable as ``scripts`` with the bundle root on sys.path."""

import logging
import warnings

# ITK's SWIG-generated extension types (SwigPyObject, SwigPyPacked, swigvarlink) have no __module__; Python warns
# about each when ITK loads a module and once more at interpreter exit ("sys:1: DeprecationWarning: builtin type
# swigvarlink has no __module__ attribute"). Every entry point imports this package before ITK.
warnings.filterwarnings(
    "ignore",
    message=r"builtin type (swigvarlink|SwigPyObject|SwigPyPacked) has no __module__",
    category=DeprecationWarning,
)

# MONAI's LoadImage builds every default reader; with pydicom installed (highdicom, for DICOM SEG output) the
# nvImageCodec DICOM reader logs and warns that its GPU decoder is missing, on each one. The bundle reads with ITK.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r"NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")
