"""Custom code of the DoDNet bundle; importable as ``scripts`` with the bundle root on sys.path."""

import warnings

# ITK's SWIG-generated extension types (SwigPyObject, SwigPyPacked, swigvarlink) have no __module__; Python warns
# about each when ITK loads a module and once more at interpreter exit ("sys:1: DeprecationWarning: builtin type
# swigvarlink has no __module__ attribute"). Every entry point imports this package before ITK.
warnings.filterwarnings(
    "ignore",
    message=r"builtin type (swigvarlink|SwigPyObject|SwigPyPacked) has no __module__",
    category=DeprecationWarning,
)
