"""Small file helpers: atomic (fsynced, renamed) writes and guarding a user's outputs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nlp_transfer.training.checkpoint_io import fsync_dir


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename it into place
    (and fsync the folder): a crash leaves the old file or the new one, never a torn one."""

    def dump(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=_jsonable)
            f.write("\n")

    write_atomically(path, dump)


def _temp_beside(path: Path, directory: bool = False) -> Path:
    """A new, uniquely named hidden temp file (or folder) next to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    if directory:
        tmp = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would stick to the published folder
        return Path(tmp)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` to a unique temp file beside ``path``, fsync, rename over ``path``."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def new_file_atomically(path: str | Path, what: str = "output") -> Iterator[Path]:
    """Yield a unique temp path; on success publish it as ``path`` only if ``path`` does
    not exist (``os.link`` fails atomically if it does: never overwrites, even when another
    process created it meanwhile). The temp file is always removed."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        yield tmp
        _fsync_file(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise OutputExistsError(
                f"{path}: {what} appeared while this one was being written; nothing was "
                "overwritten. Choose another path."
            ) from None
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def new_dir_atomically(path: str | Path, what: str = "output directory") -> Iterator[Path]:
    """Yield a hidden staging folder beside ``path``; on success rename it to ``path``
    (which must not exist or be empty: a non-empty one is never replaced). On failure the
    staging folder is removed and ``path`` is left as it was."""
    path = guard_new_output(path, what)
    staging = _temp_beside(path, directory=True)
    try:
        yield staging
        try:
            os.rename(staging, path)  # replaces an empty folder, never a non-empty one
        except OSError as err:
            raise OutputExistsError(
                f"{path}: {what} appeared while this one was being written ({err.strerror}); "
                "nothing was overwritten. Choose another path."
            ) from None
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def read_json(path: str | Path) -> Any:
    with Path(path).open(encoding="utf-8") as f:
        return json.load(f)


class OutputExistsError(FileExistsError):
    """A run would write over another run's results."""


def guard_new_output(path: str | Path, what: str = "output") -> Path:
    """Refuse to write into a non-empty existing file/folder that holds user results."""
    path = Path(path)
    if path.is_file() or (path.is_dir() and any(path.iterdir())):
        raise OutputExistsError(
            f"{path}: {what} already exists and is not empty; nothing was overwritten. "
            "Choose another path or remove it yourself."
        )
    return path


def checkpoint_run_dir(ckpt_path: str | Path) -> Path:
    """The run folder a checkpoint belongs to: the folder holding its ``checkpoints/``
    (``<run>/checkpoints/x.ckpt``, ``<run>/checkpoints/steps/x.ckpt``), else its own folder."""
    path = Path(ckpt_path).expanduser().resolve()
    for parent in (path.parent, path.parent.parent):
        if parent.name == "checkpoints":
            return parent.parent
    return path.parent


def free_default_output(path: str | Path) -> Path:
    """``path``, or the first free ``<stem>_<n><suffix>`` (n = 1, 2, ...) when ``path`` holds
    results already: a default output never replaces an earlier one."""
    path = Path(path)

    def taken(p: Path) -> bool:
        return p.is_file() or (p.is_dir() and any(p.iterdir()))

    n, candidate = 0, path
    while taken(candidate):
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    return candidate
