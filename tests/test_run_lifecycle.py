"""training/run.py helpers that every entry point shares."""

from __future__ import annotations

import errno
from pathlib import Path

from nlp_transfer.training.run import disk_full_hint


def test_disk_full_hint_names_the_free_space_and_the_fix(tmp_path: Path) -> None:
    assert disk_full_hint(ValueError("lr must be > 0"), tmp_path) == ""
    # what torch raises when a checkpoint write runs out of space
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 9 vs 7")
    hint = disk_full_hint(torch_error, tmp_path / "sweep" / "3")  # not created yet
    assert "disk looks full" in hint and f"under {tmp_path}" in hint
    assert "model_checkpoint_steps=null" in hint
    assert "GiB free" in disk_full_hint(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
