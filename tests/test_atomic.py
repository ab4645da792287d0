"""Atomic output: a failed write leaves the previous file intact and no temporary behind."""

from __future__ import annotations

import json
import stat

import pytest

from scripts.utils import atomic_output, write_json_atomic, write_text_atomic


def test_success_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "report.json"
    write_json_atomic({"a": 1}, target)
    write_json_atomic({"a": 2}, target)
    assert json.loads(target.read_text()) == {"a": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]


def test_failure_keeps_the_old_content_and_removes_the_temporary(tmp_path):
    target = tmp_path / "metrics.csv"
    write_text_atomic("old\n", target)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_output(target) as tmp:
            assert tmp.parent == target.parent and tmp.name.endswith(".csv") and tmp != target
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_mode_is_applied_before_the_rename(tmp_path):
    target = tmp_path / "model.pt"
    with atomic_output(target, mode=0o640) as tmp:
        tmp.write_bytes(b"weights")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
