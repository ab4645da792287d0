"""Test set-up: the bundle root on sys.path (as ``monai.bundle run`` does) and shared fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "dodnet_bundle"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "real-ct"
SCHEMA_PATH = REPO_ROOT.parent / "shared" / "reference" / "meta_schema_20240725.json"

if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))


@pytest.fixture(scope="session")
def bundle_root() -> Path:
    return BUNDLE_ROOT


@pytest.fixture(scope="session")
def real_ct() -> Path:
    """The shared real-CT folder; tests needing it skip with the reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared real-CT data not found at {SHARED_DATA} (../shared/data/real-ct beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def schema_path() -> Path:
    if not SCHEMA_PATH.is_file():
        pytest.skip(f"metadata schema not found at {SCHEMA_PATH} (../shared/reference beside the repo)")
    return SCHEMA_PATH
