"""Build and verify the Model Zoo release asset ``dodnet_bundle_v<version>.zip``.

The asset is a zip of the bundle folder under one top-level ``dodnet_bundle/`` directory, which is
what ``python -m monai.bundle download --name dodnet_bundle --url <zip url>`` extracts. The build is
reproducible: files are added in sorted order with a fixed time stamp (1980-01-01) and fixed
permissions, so the same tree always gives the same bytes. Caches (``__pycache__``, ``*.pyc``,
``.cache``), run outputs (``eval/``, ``runs/``) and ``models/`` (weights; listed in
``large_files.yml`` instead) are left out unless ``include_weights`` is set.

Release tooling of the repository, not shipped inside the bundle. Usage (from the repository root)::

    python tools/release.py build --output_dir dist
    python tools/release.py verify dist/dodnet_bundle_v<version>.zip
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path, PurePosixPath
from typing import List, Optional, Tuple, Union

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "dodnet_bundle"
if str(BUNDLE_ROOT) not in sys.path:  # the bundle's own atomic writer, imported under its one name
    sys.path.insert(0, str(BUNDLE_ROOT))

from scripts.utils import atomic_output  # noqa: E402

__all__ = ["BUNDLE_NAME", "bundle_files", "check_bundle", "build", "verify_zip", "ReleaseError"]

BUNDLE_NAME = "dodnet_bundle"
FIXED_TIME = (1980, 1, 1, 0, 0, 0)
FILE_MODE = 0o644
EXCLUDED_DIRS = {"__pycache__", ".cache", ".pytest_cache", ".ipynb_checkpoints", "eval", "runs", "mlruns"}
EXCLUDED_SUFFIXES = {".pyc", ".pyo", ".tmp", ".swp", ".db", ".lock"}
WEIGHT_FILES = ("models/model.pt", "models/model.ts")
REQUIRED_FILES = ("LICENSE", "configs/metadata.json", "configs/inference.json")


class ReleaseError(ValueError):
    """The bundle or a release zip does not meet the Model Zoo's layout rules."""


def _read_metadata(text: str, source: str) -> dict:
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReleaseError(f"{source}: not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ReleaseError(f"{source}: expected a JSON object")
    return meta


def _check_version(meta: dict, source: str) -> str:
    version = meta.get("version")
    if not isinstance(version, str) or not version:
        raise ReleaseError(f"{source}: no 'version' string")
    changelog = meta.get("changelog")
    if not isinstance(changelog, dict) or version not in changelog:
        raise ReleaseError(f"{source}: version {version} is not listed in 'changelog' (the Model Zoo requires it)")
    return version


def check_bundle(bundle_root: Union[str, os.PathLike, None] = None) -> str:
    """Check the Model Zoo's layout rules on a bundle folder and return its version.

    Raises:
        ReleaseError: naming the missing file or the metadata problem.
    """
    root = Path(bundle_root) if bundle_root is not None else BUNDLE_ROOT
    if not root.is_dir():
        raise ReleaseError(f"{root}: bundle folder not found")
    missing = [name for name in REQUIRED_FILES if not (root / name).is_file()]
    if missing:
        raise ReleaseError(f"{root}: missing required bundle file(s): {', '.join(missing)}")
    meta_file = root / "configs" / "metadata.json"
    return _check_version(_read_metadata(meta_file.read_text(encoding="utf-8"), str(meta_file)), str(meta_file))


def _excluded(rel: PurePosixPath, include_weights: bool) -> bool:
    if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]):
        return True
    if rel.name.startswith(".") or rel.suffix in EXCLUDED_SUFFIXES:
        return True
    if rel.parts[0] == "models":
        return not (include_weights and str(rel) in WEIGHT_FILES)
    return False


def bundle_files(bundle_root: Union[str, os.PathLike, None] = None, include_weights: bool = False) -> List[str]:
    """Relative POSIX paths of the files that go into the release, sorted."""
    root = Path(bundle_root) if bundle_root is not None else BUNDLE_ROOT
    files = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            rel = PurePosixPath(path.relative_to(root).as_posix())
            if not _excluded(rel, include_weights):
                files.append(str(rel))
    return sorted(files)


def build(
    bundle_root: Optional[str] = None,
    output_dir: str = "dist",
    include_weights: bool = False,
    name: str = BUNDLE_NAME,
) -> str:
    """Write ``<output_dir>/<name>_v<version>.zip`` (atomically) and return its path.

    Args:
        bundle_root: the bundle folder (default: the folder holding this ``scripts`` package).
        output_dir: where the zip goes (created if needed).
        include_weights: also pack ``models/model.pt`` / ``models/model.ts`` when present.
        name: the top-level folder in the zip (the bundle name used by ``monai.bundle download``).
    """
    root = Path(bundle_root) if bundle_root is not None else BUNDLE_ROOT
    version = check_bundle(root)
    files = bundle_files(root, include_weights)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / f"{name}_v{version}.zip"
    with atomic_output(dst, mode=0o644) as tmp:  # the asset is published: world-readable
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
            for rel in files:
                info = zipfile.ZipInfo(f"{name}/{rel}", date_time=FIXED_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.create_system = 3  # unix, so the permission bits below are honoured
                info.external_attr = (0o100000 | FILE_MODE) << 16
                zf.writestr(info, (root / rel).read_bytes(), compresslevel=9)
    print(f"wrote {dst} ({len(files)} files, version {version})")
    return str(dst)


def verify_zip(zip_path: str, name: str = BUNDLE_NAME) -> Tuple[str, List[str]]:
    """Check a release zip: one top-level ``<name>/`` folder, required files, version in the file name.

    Returns:
        (version, member names).

    Raises:
        ReleaseError: naming the zip and every problem found.
    """
    path = Path(zip_path)
    if not path.is_file():
        raise ReleaseError(f"{path}: release zip not found")
    if not zipfile.is_zipfile(path):
        raise ReleaseError(f"{path}: not a zip file")
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        tops = sorted({n.split("/", 1)[0] for n in zf.namelist()})
        if tops != [name] or any("/" not in n for n in names):
            raise ReleaseError(
                f"{path}: every entry must lie under one top-level folder '{name}/' "
                f"(the layout `monai.bundle download` extracts); found top-level entries {tops[:10]}"
            )
        problems = []
        rel = {n.split("/", 1)[1] for n in names}
        missing = [f for f in REQUIRED_FILES if f not in rel]
        if missing:
            problems.append(f"missing required file(s) {', '.join(missing)}")
        unwanted = sorted(
            n for n in rel if _excluded(PurePosixPath(n), include_weights=True) and not n.startswith("models/")
        )
        if unwanted:
            problems.append(f"caches or run outputs packed: {', '.join(unwanted[:10])}")
        version = ""
        if "configs/metadata.json" in rel:
            meta_name = f"{name}/configs/metadata.json"
            meta = _read_metadata(zf.read(meta_name).decode("utf-8"), f"{path}:{meta_name}")
            try:
                version = _check_version(meta, f"{path}:{meta_name}")
            except ReleaseError as e:
                problems.append(str(e))
            if version and path.name != f"{name}_v{version}.zip":
                problems.append(f"file name should be {name}_v{version}.zip for metadata version {version}")
        if problems:
            raise ReleaseError(f"{path}: " + "; ".join(problems))
    return version, names


def verify(zip_path: str, name: str = BUNDLE_NAME) -> str:
    """Command-line form of :func:`verify_zip`: prints and returns a one-line summary."""
    version, names = verify_zip(zip_path, name)
    summary = f"{zip_path}: ok, {name} version {version}, {len(names)} files"
    print(summary)
    return summary


def main() -> None:
    import fire

    fire.Fire({"build": build, "verify": verify}, serialize=lambda _: None)


if __name__ == "__main__":
    main()
