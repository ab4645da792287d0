"""Where the repository, the bundle, the release tools and the shared reference data are."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLE_ROOT = REPO_ROOT / "dodnet_bundle"
TOOLS_DIR = REPO_ROOT / "tools"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "real-ct"
SCHEMA_PATH = REPO_ROOT.parent / "shared" / "reference" / "meta_schema_20240725.json"
