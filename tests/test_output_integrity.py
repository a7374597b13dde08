"""Outputs are published whole (temp name, fsync, rename) and never overwrite a user's file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nlp_transfer.utils import io
from nlp_transfer.utils.io import (
    OutputExistsError,
    atomic_write_json,
    new_dir_atomically,
    new_file_atomically,
    write_atomically,
)


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_json_fsyncs_file_and_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    dirs: list[Path] = []
    monkeypatch.setattr(io, "fsync_dir", lambda p: dirs.append(Path(p)))
    atomic_write_json(tmp_path / "metrics.json", {"a": 1})
    assert synced and dirs == [tmp_path]
    assert (tmp_path / "metrics.json").read_text() == '{\n  "a": 1\n}\n'
    assert _hidden(tmp_path) == []


def test_write_atomically_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "model.joblib"
    target.write_bytes(b"old model")

    def crash(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed"):
        write_atomically(target, crash)
    assert target.read_bytes() == b"old model" and _hidden(tmp_path) == []
    write_atomically(target, lambda tmp: tmp.write_bytes(b"new model"))
    assert target.read_bytes() == b"new model" and _hidden(tmp_path) == []


def test_new_file_temp_names_are_unique(tmp_path: Path) -> None:
    out = tmp_path / "predictions.jsonl"
    with new_file_atomically(out) as first, new_file_atomically(out.with_name("b")) as second:
        third = io._temp_beside(out)
        assert len({first, second, third}) == 3 and first.parent == out.parent
        third.unlink()
        first.write_text("mine\n")
        second.write_text("b\n")
    assert out.read_text() == "mine\n" and _hidden(tmp_path) == []


def test_new_file_refusal_is_an_output_exists_error(tmp_path: Path) -> None:
    out = tmp_path / "p.jsonl"
    with (
        pytest.raises(OutputExistsError, match="nothing was overwritten"),
        new_file_atomically(out, "prediction file") as tmp,
    ):
        tmp.write_text("x\n")
        out.write_text("other\n")
    assert out.read_text() == "other\n"
    with new_file_atomically(out.with_name("q.jsonl")) as tmp:
        tmp.write_text("ok\n")
    assert (tmp_path / "q.jsonl").read_text() == "ok\n" and _hidden(tmp_path) == []


def test_new_dir_is_published_whole_or_not_at_all(tmp_path: Path) -> None:
    out = tmp_path / "export"
    with pytest.raises(RuntimeError, match="disk full"), new_dir_atomically(out) as staging:
        (staging / "config.json").write_text("{}")
        raise RuntimeError("disk full")
    assert not out.exists() and _hidden(tmp_path) == []
    out.mkdir()  # an empty folder the user made for it is fine
    with new_dir_atomically(out) as staging:
        (staging / "config.json").write_text("{}")
        (staging / "head.safetensors").write_bytes(b"w")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "head.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    with pytest.raises(OutputExistsError, match="not empty"), new_dir_atomically(out):
        pass
    other = tmp_path / "other"
    with (
        pytest.raises(OutputExistsError, match="appeared while"),
        new_dir_atomically(other) as staging,
    ):
        (staging / "a").write_text("mine")
        other.mkdir()
        (other / "b").write_text("theirs")
    assert sorted(p.name for p in other.iterdir()) == ["b"] and _hidden(tmp_path) == []
