"""Atomic writes."""

from __future__ import annotations

import os
import stat

import pytest

from ctmask.core.fileio import atomic_path, write_json_atomic


def test_atomic_write_replaces_and_keeps_plain_permissions(tmp_path):
    target = tmp_path / "sub" / "r.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert target.read_text().strip().endswith("}") and '"a": 2' in target.read_text()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """A crash right after the rename must not leave an empty file: data reaches the disk first."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
        events.append(("fsync", kind, st.st_size if kind == "file" else None))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst), None))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "ckpt.bin"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"x" * 1000)
    assert events == [("fsync", "file", 1000), ("replace", "ckpt.bin", None), ("fsync", "dir", None)]
    assert target.read_bytes() == b"x" * 1000
    # A failed write neither renames nor syncs anything.
    events.clear()
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            raise RuntimeError("crash")
    assert events == []
