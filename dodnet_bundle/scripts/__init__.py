"""Custom code of the DoDNet bundle; importable as ``scripts`` with the bundle root on sys.path."""
