"""GPU slot allocator: flock-based, one job per GPU, released when a holder dies."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import time
from itertools import pairwise
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path

import pytest

from nlp_transfer.sweeps import gpu_slots
from nlp_transfer.sweeps.gpu_slots import (
    ENV_VAR,
    acquire_gpu,
    available_gpu_ids,
    claim_gpu,
    gpu_for_process,
)

CTX = mp.get_context("fork")


def _job(index: int, gpus: list[str], lock_dir: str, out_dir: str) -> None:
    """Hold a GPU for a short random time and record (gpu, env, start, end)."""
    rng = random.Random(index)
    with acquire_gpu(gpus, lock_dir, timeout=30, poll=0.01) as lease:
        assert lease is not None
        start = time.time()
        env = os.environ.get(ENV_VAR)
        time.sleep(rng.uniform(0.03, 0.12))
        end = time.time()
    record = {"job": index, "gpu": lease.gpu_id, "env": env, "start": start, "end": end}
    Path(out_dir, f"job_{index}.json").write_text(json.dumps(record))


def _hold_forever(gpus: list[str], lock_dir: str, ready: MpEvent) -> None:
    claim_gpu(gpus, lock_dir)
    ready.set()
    time.sleep(60)


def test_no_gpus_is_a_noop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "7")
    with acquire_gpu([], tmp_path / "locks") as lease:
        assert lease is None
        assert os.environ[ENV_VAR] == "7"
    assert claim_gpu(None, tmp_path / "locks") is None
    assert not (tmp_path / "locks").exists()


def test_sets_and_restores_visible_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    with acquire_gpu(["3"], tmp_path) as lease:
        assert lease is not None and lease.held
        assert os.environ[ENV_VAR] == "3" and lease.gpu_id == "3"
    assert ENV_VAR not in os.environ and not lease.held
    monkeypatch.setenv(ENV_VAR, "0,1")
    with acquire_gpu([0, 1], tmp_path):
        assert os.environ[ENV_VAR] in ("0", "1")
    assert os.environ[ENV_VAR] == "0,1"


def test_waits_then_times_out_when_every_gpu_is_held(tmp_path: Path) -> None:
    first = claim_gpu(["a", "b"], tmp_path)
    second = claim_gpu(["a", "b"], tmp_path)
    assert first is not None and second is not None
    assert {first.gpu_id, second.gpu_id} == {"a", "b"}
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="no free GPU"):
        claim_gpu(["a", "b"], tmp_path, timeout=0.2, poll=0.05)
    assert time.monotonic() - t0 >= 0.2
    second.release()
    second.release()  # idempotent
    third = claim_gpu(["a", "b"], tmp_path, timeout=1, poll=0.05)
    assert third is not None and third.gpu_id == second.gpu_id
    first.release()
    third.release()


def test_concurrent_jobs_never_share_a_gpu(tmp_path: Path) -> None:
    gpus, n_jobs = ["0", "1", "2"], 8
    locks, out = tmp_path / "locks", tmp_path / "records"
    out.mkdir()
    procs = [CTX.Process(target=_job, args=(i, gpus, str(locks), str(out))) for i in range(n_jobs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    records = [json.loads(f.read_text()) for f in sorted(out.glob("job_*.json"))]
    assert sorted(r["job"] for r in records) == list(range(n_jobs))
    for r in records:
        assert r["gpu"] in gpus and r["env"] == r["gpu"]
    for gpu in gpus:
        spans = sorted((r["start"], r["end"]) for r in records if r["gpu"] == gpu)
        for (_, end), (start, _) in pairwise(spans):
            assert start >= end, f"GPU {gpu} was shared: {spans}"
    assert len({r["gpu"] for r in records}) > 1  # the jobs spread over the GPUs


def test_lock_is_released_when_the_holder_dies(tmp_path: Path) -> None:
    ready = CTX.Event()
    holder = CTX.Process(target=_hold_forever, args=(["0"], str(tmp_path), ready))
    holder.start()
    try:
        assert ready.wait(timeout=30)
        with pytest.raises(TimeoutError):
            claim_gpu(["0"], tmp_path, timeout=0.1, poll=0.02)
    finally:
        holder.kill()
        holder.join(timeout=30)
    with acquire_gpu(["0"], tmp_path, timeout=5, poll=0.02) as lease:
        assert lease is not None and lease.gpu_id == "0"


def test_available_gpu_ids_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "2, 5")
    assert available_gpu_ids() == ["2", "5"]
    monkeypatch.setenv(ENV_VAR, "")
    assert available_gpu_ids() == []


def _child_claims(lock_dir: str, out: str) -> None:
    lease = gpu_for_process(["0", "1"], lock_dir, timeout=5, poll=0.02)
    Path(out).write_text(lease.gpu_id if lease else "")


def test_gpu_for_process_keeps_one_gpu_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(gpu_slots, "_process_lease", None)
    lease = gpu_for_process(["0", "1"], tmp_path)
    assert lease is not None and gpu_for_process(["0", "1"], tmp_path) is lease
    try:
        child = CTX.Process(target=_child_claims, args=(str(tmp_path), str(tmp_path / "out")))
        child.start()
        child.join(timeout=30)
        assert child.exitcode == 0
        other = (tmp_path / "out").read_text()
        assert other in ("0", "1") and other != lease.gpu_id
        assert lease.held  # the child closing its inherited fd left the parent's lock alone
        with pytest.raises(TimeoutError):
            claim_gpu([lease.gpu_id], tmp_path, timeout=0.05, poll=0.01)
    finally:
        lease.release()
