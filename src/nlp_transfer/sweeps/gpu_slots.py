"""Share a machine's GPUs between local parallel jobs, one job per GPU.

Each GPU id has a lock file ``<lock_dir>/gpu_<id>.lock``; a job holds an exclusive
``fcntl.flock`` on one of them while it runs and points ``CUDA_VISIBLE_DEVICES`` at that GPU.
The kernel drops a flock when its process dies, so a crashed or killed job never keeps a GPU.
flock is reliable on local file systems; keep ``lock_dir`` off NFS.

Call it before anything initialises CUDA (``torch.cuda`` caches the visible devices)::

    with acquire_gpu(available_gpu_ids(), lock_dir) as lease:
        train(cfg)  # sees one GPU; ``lease`` is None on a CPU machine

A launcher that reuses worker processes across jobs (joblib/loky) must keep one GPU per
worker instead, since a worker's CUDA context outlives a job: use ``gpu_for_process``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ENV_VAR = "CUDA_VISIBLE_DEVICES"
_process_lease: tuple[int, GpuLease | None] | None = None


def available_gpu_ids() -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` when set, else ``nvidia-smi``'s
    indices, else none. Never touches torch, so CUDA stays uninitialised."""
    env = os.environ.get(ENV_VAR)
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


class GpuLease:
    """An exclusive hold on one GPU; ``release()`` (or leaving the ``with``) gives it back."""

    def __init__(self, gpu_id: str, lock_path: Path, fd: int, previous_env: str | None) -> None:
        self.gpu_id = gpu_id
        self.lock_path = lock_path
        self._fd: int | None = fd
        self._previous_env = previous_env

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlock the GPU and restore the previous ``CUDA_VISIBLE_DEVICES``; idempotent."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            if self._previous_env is None:
                os.environ.pop(ENV_VAR, None)
            else:
                os.environ[ENV_VAR] = self._previous_env

    def __enter__(self) -> GpuLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"GpuLease(gpu_id={self.gpu_id!r}, held={self.held})"


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None when another holder has it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _note_holder(fd: int) -> None:
    """Write the holder's pid into the lock file (for people debugging a stuck sweep)."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass


def claim_gpu(
    gpu_ids: Sequence[str | int] | None,
    lock_dir: str | Path,
    timeout: float | None = None,
    poll: float = 0.5,
) -> GpuLease | None:
    """Wait for a GPU of ``gpu_ids`` that no other job holds, lock it and set
    ``CUDA_VISIBLE_DEVICES`` to it. None (and nothing changed) when ``gpu_ids`` is empty.

    Raises ``TimeoutError`` when no GPU frees up within ``timeout`` seconds (None: wait forever).
    """
    ids = [str(g) for g in (gpu_ids or [])]
    if not ids:
        return None
    if poll <= 0:
        raise ValueError(f"poll must be positive, got {poll}")
    lock_root = Path(lock_dir)
    lock_root.mkdir(parents=True, exist_ok=True)
    # start the scan at a pid-dependent GPU so that simultaneous starters spread out
    start = os.getpid() % len(ids)
    order = ids[start:] + ids[:start]
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        for gpu in order:
            path = lock_root / f"gpu_{gpu}.lock"
            fd = _try_lock(path)
            if fd is not None:
                _note_holder(fd)
                previous = os.environ.get(ENV_VAR)
                os.environ[ENV_VAR] = gpu
                return GpuLease(gpu, path, fd, previous)
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no free GPU among {ids} after {timeout}s (locks in {lock_root})")
        wait = poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic()))
        time.sleep(wait)


@contextmanager
def acquire_gpu(
    gpu_ids: Sequence[str | int] | None,
    lock_dir: str | Path,
    timeout: float | None = None,
    poll: float = 0.5,
) -> Iterator[GpuLease | None]:
    """Context manager around :func:`claim_gpu`: holds a GPU for the ``with`` body and
    releases it on exit (also on error). Yields None, a no-op, when ``gpu_ids`` is empty."""
    lease = claim_gpu(gpu_ids, lock_dir, timeout=timeout, poll=poll)
    try:
        yield lease
    finally:
        if lease is not None:
            lease.release()


def gpu_for_process(
    gpu_ids: Sequence[str | int] | None,
    lock_dir: str | Path,
    timeout: float | None = None,
    poll: float = 0.5,
) -> GpuLease | None:
    """Claim a GPU once per process and keep it until the process exits (the kernel then
    drops the lock); later calls in the same process return the same lease."""
    global _process_lease
    if _process_lease is not None and _process_lease[0] == os.getpid():
        return _process_lease[1]
    if _process_lease is not None and _process_lease[1] is not None:
        # a forked child: its copy of the parent's lock fd must not unlock the parent's GPU
        inherited = _process_lease[1]
        if inherited._fd is not None:
            os.close(inherited._fd)
            inherited._fd = None
    lease = claim_gpu(gpu_ids, lock_dir, timeout=timeout, poll=poll)
    _process_lease = (os.getpid(), lease)
    return lease
