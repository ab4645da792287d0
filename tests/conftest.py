"""Test set-up: the bundle root (as ``monai.bundle run`` does) and the release tools on sys.path; shared fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers.paths import BUNDLE_ROOT, SCHEMA_PATH, SHARED_DATA, TOOLS_DIR

for path in (BUNDLE_ROOT, TOOLS_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


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
