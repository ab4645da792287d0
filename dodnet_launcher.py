"""Console entry points of the pip package: thin launchers around the self-contained bundle.

The bundle's custom code is the package ``scripts`` inside ``dodnet_bundle/`` (the Model Zoo layout),
imported with the bundle root on ``sys.path`` exactly as ``python -m monai.bundle run`` does. These
launchers only put the bundle root on ``sys.path`` and call into ``scripts``, so each module is
imported under one name only.

The bundle root is ``$DODNET_BUNDLE_ROOT`` if set, else the ``dodnet_bundle`` folder beside this file
(an editable install, ``pip install -e .``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def bundle_root() -> Path:
    """The bundle folder (holding ``configs/`` and ``scripts/``), put first on ``sys.path``."""
    root = Path(os.environ.get("DODNET_BUNDLE_ROOT", Path(__file__).resolve().parent / "dodnet_bundle"))
    if not (root / "configs" / "metadata.json").is_file():
        raise SystemExit(f"dodnet: no bundle at {root} (set DODNET_BUNDLE_ROOT to the dodnet_bundle folder)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def segment() -> None:
    """``dodnet-segment INPUT OUTPUT_DIR [--tasks ...]``: whole-volume inference (scripts.inference.cli)."""
    bundle_root()
    from scripts.inference.cli import segment_main

    segment_main()


def demo() -> None:
    """``dodnet-demo``: the embedded-default demo (scripts.demo)."""
    bundle_root()
    from scripts.demo import main

    main()


def evaluate() -> None:
    """``dodnet-evaluate PRED_DIR REF_DIR OUT_DIR [--mapping ...]``: score predictions (scripts.evaluation.folders)."""
    bundle_root()
    from scripts.evaluation.folders import main

    main()


def prepare_mots() -> None:
    """``dodnet-prepare-mots``: build a datalist from the public dataset folders (scripts.data.prepare_mots)."""
    bundle_root()
    from scripts.data.prepare_mots import main

    main()


def preprocess() -> None:
    """``dodnet-preprocess DATALIST OUTPUT_DIR [--workers N]``: resample once into memory-mappable arrays
    (scripts.data.preprocess)."""
    bundle_root()
    from scripts.data.preprocess import main

    main()
