"""Tests of the frozen-feature cache (``nlp_transfer.features.cache``)."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nlp_transfer.features.cache import (
    CacheNotWritableError,
    Entry,
    FeatureCache,
    Writer,
    cache_key,
    describe_key_parts,
    feature_key_parts,
    hash_examples,
    key_parts_from_encoder,
    main,
)

ROWS = [{"text": f"sentence {i}", "label": i % 2} for i in range(10)]


def make_parts(**changes: Any) -> dict[str, Any]:
    """Standard key parts with selected fields replaced."""
    kw: dict[str, Any] = {
        "encoder": {"name_or_path": "minilm", "revision": "main", "weights_sha1": "ab" * 20},
        "tokenizer": "minilm",
        "vocab_size": 30522,
        "max_length": 64,
        "pooling": "mean",
        "layers": [6],
        "data": hash_examples(ROWS),
    }
    kw.update(changes)
    return feature_key_parts(**kw)


def features(seed: int = 0, n: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


class Counter:
    """A compute callback that counts its calls and writes known arrays in batches."""

    def __init__(self, seed: int = 0) -> None:
        self.calls = 0
        self.seed = seed

    def __call__(self, writer: Writer) -> None:
        self.calls += 1
        feats = features(self.seed)
        for start in range(0, len(feats), 4):
            writer.append("features", feats[start : start + 4])
            writer.update()
        writer.write("labels", np.arange(len(feats)) % 2)
        writer.meta["hidden"] = 4


def entry_dirs(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if not p.name.startswith(".")]


# -- keys ------------------------------------------------------------------------------


def test_hash_examples_is_content_and_order_sensitive() -> None:
    base = hash_examples(ROWS)
    assert base == hash_examples(iter(list(ROWS)))
    assert base == hash_examples([{"label": r["label"], "text": r["text"]} for r in ROWS])
    assert base != hash_examples(ROWS[::-1])
    assert base != hash_examples([*ROWS[:-1], {"text": "sentence 9!", "label": 1}])
    assert base != hash_examples([*ROWS[:-1], {"text": "sentence 9", "label": "1"}])
    assert hash_examples([]) != hash_examples([""])


@pytest.mark.parametrize(
    "change",
    [
        {"max_length": 128},
        {"encoder": {"name_or_path": "minilm", "revision": "main", "weights_sha1": "cd" * 20}},
        {"encoder": {"name_or_path": "minilm", "revision": "v2", "weights_sha1": "ab" * 20}},
        {"encoder": {"name_or_path": "bert", "revision": "main", "weights_sha1": "ab" * 20}},
        {"tokenizer": "other"},
        {"vocab_size": 30523},
        {"pooling": "first"},
        {"layers": [5, 6]},
        {"data": hash_examples(ROWS[:-1])},
    ],
    ids=lambda c: next(iter(c)),
)
def test_changed_parts_miss(tmp_path: Path, change: dict[str, Any]) -> None:
    cache = FeatureCache(tmp_path)
    compute = Counter()
    cache.get_or_compute(make_parts(), compute)
    assert cache_key(make_parts(**change)) != cache_key(make_parts())
    cache.get_or_compute(make_parts(**change), compute)
    assert compute.calls == 2
    assert len(entry_dirs(tmp_path)) == 2


def test_identical_parts_hit(tmp_path: Path) -> None:
    compute = Counter()
    first = FeatureCache(tmp_path).get_or_compute(make_parts(), compute, description="demo")
    reordered = dict(reversed(list(make_parts().items())))
    second = FeatureCache(tmp_path).get_or_compute(reordered, compute)
    assert compute.calls == 1
    assert second.key == first.key
    np.testing.assert_array_equal(second["features"], features())
    np.testing.assert_array_equal(second["labels"], np.arange(10) % 2)
    assert second.meta == {"hidden": 4}
    assert second.manifest["description"] == "demo"
    assert isinstance(second["features"], np.memmap)
    assert not second["features"].flags.writeable
    assert FeatureCache(tmp_path).get(make_parts()) is not None
    assert FeatureCache(tmp_path).get(make_parts(max_length=1)) is None


def test_key_parts_from_encoder_resolves_layers() -> None:
    class Tok:
        name_or_path = "minilm"

        def __len__(self) -> int:
            return 30522

    class Enc:
        tokenizer = Tok()
        num_layers = 6
        max_length = 64

        def identity(self) -> dict[str, Any]:
            return {"name_or_path": "minilm", "revision": "main", "weights_sha1": "ab" * 20}

    data = hash_examples(ROWS)
    parts = key_parts_from_encoder(Enc(), data=data, pooling="mean", layers=[-1])
    assert parts == make_parts()
    assert parts == key_parts_from_encoder(Enc(), data=data, pooling="mean", layers=[6])
    with pytest.raises(ValueError, match="out of range"):
        key_parts_from_encoder(Enc(), data=data, pooling="mean", layers=[7])
    assert "encoder=minilm@abababab" in describe_key_parts(parts)


# -- writing ---------------------------------------------------------------------------


def test_writer_streams_allocates_and_ragged(tmp_path: Path) -> None:
    items = [np.full((n, 3), n, dtype=np.float16) for n in (2, 0, 5, 1)]
    sizes_seen: list[int] = []

    def compute(writer: Writer) -> None:
        mm = writer.allocate("pooled", (4, 3), np.float32)
        for i in range(4):
            mm[i] = i
        writer.append_ragged("tokens", items[:2])
        writer.append_ragged("tokens", items[2:])
        writer.append("ids", np.array([1, 2]))
        writer._appenders["ids"].file.flush()
        sizes_seen.append((writer.directory / "ids.npy").stat().st_size)
        writer.append("ids", np.array([3]))
        with pytest.raises(ValueError, match="already exists"):
            writer.allocate("pooled", (1,))
        with pytest.raises(ValueError, match="invalid array name"):
            writer.append("../escape", np.zeros(1))
        with pytest.raises(ValueError, match="rows of shape"):
            writer.append("ids", np.zeros((1, 2)))
        with pytest.raises(TypeError, match="numeric"):
            writer.write("objects", np.array(["a", None], dtype=object))

    entry = FeatureCache(tmp_path).get_or_compute(make_parts(), compute, total=4)
    assert sizes_seen[0] > 2 * 8  # rows are on disk before the writer closes
    np.testing.assert_array_equal(entry["pooled"][:, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(entry["ids"], [1, 2, 3])
    assert entry.num_items("tokens") == 4
    for i, item in enumerate(items):
        np.testing.assert_array_equal(entry.ragged("tokens", i), item)
    assert entry["tokens"].dtype == np.float16
    assert sorted(p.name for p in (tmp_path / ".tmp").iterdir()) == []


def test_failed_compute_leaves_no_entry(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)

    def boom(writer: Writer) -> None:
        writer.append("features", features())
        raise RuntimeError("encoder exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        cache.get_or_compute(make_parts(), boom)
    assert entry_dirs(tmp_path) == []
    assert list((tmp_path / ".tmp").iterdir()) == []
    assert cache.get_or_compute(make_parts(), Counter())["features"].shape == (10, 4)


# -- concurrency -----------------------------------------------------------------------


def _concurrent_worker(root: str, lock: bool, barrier: Any, log_path: str, out: Any) -> None:
    def compute(writer: Writer) -> None:
        with open(log_path, "a") as f:
            f.write(f"{os.getpid()}\n")
        if barrier is not None:
            barrier.wait(timeout=30)  # both writers are computing at the same time
        Counter()(writer)

    entry = FeatureCache(root, lock=lock, durable=False).get_or_compute(make_parts(), compute)
    out.put(hash_examples(np.asarray(entry["features"]).tolist()))


@pytest.mark.parametrize("lock", [False, True], ids=["race", "locked"])
def test_two_concurrent_writers(tmp_path: Path, lock: bool) -> None:
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    root, log_path = tmp_path / "cache", tmp_path / "computes.log"
    barrier = None if lock else ctx.Barrier(2)
    out = ctx.Queue()
    args = (str(root), lock, barrier, str(log_path), out)
    procs = [ctx.Process(target=_concurrent_worker, args=args) for _ in range(2)]
    for proc in procs:
        proc.start()
    digests = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert digests[0] == digests[1] == hash_examples(features().tolist())
    computes = log_path.read_text().split()
    assert len(computes) == (1 if lock else 2)
    assert len(entry_dirs(root)) == 1
    assert list((root / ".tmp").iterdir()) == []
    entry = FeatureCache(root).get(make_parts())
    assert entry is not None
    np.testing.assert_array_equal(entry["features"], features())


def test_losing_the_rename_race_adopts_the_winner(tmp_path: Path) -> None:
    winner = Counter(seed=1)

    def slow_loser(writer: Writer) -> None:
        # While we compute, another writer publishes the same key.
        FeatureCache(tmp_path, lock=False).get_or_compute(make_parts(), winner)
        Counter(seed=2)(writer)

    entry = FeatureCache(tmp_path, lock=False).get_or_compute(make_parts(), slow_loser)
    assert winner.calls == 1
    np.testing.assert_array_equal(entry["features"], features(seed=1))
    assert len(entry_dirs(tmp_path)) == 1
    assert list((tmp_path / ".tmp").iterdir()) == []


# -- corruption ------------------------------------------------------------------------


def _drop_manifest(d: Path) -> None:
    (d / "manifest.json").unlink()


def _garble_manifest(d: Path) -> None:
    (d / "manifest.json").write_text('{"format": 1, "arrays": {', encoding="utf-8")


def _truncate_array(d: Path) -> None:
    path = d / "features.npy"
    path.write_bytes(path.read_bytes()[:-7])


def _delete_array(d: Path) -> None:
    (d / "labels.npy").unlink()


def _wrong_shape(d: Path) -> None:
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["arrays"]["features"]["shape"] = [11, 4]
    (d / "manifest.json").write_text(json.dumps(manifest))


def _empty_dir(d: Path) -> None:
    for f in d.iterdir():
        f.unlink()


@pytest.mark.parametrize(
    "damage",
    [_drop_manifest, _garble_manifest, _truncate_array, _delete_array, _wrong_shape, _empty_dir],
)
def test_corrupt_entry_is_recomputed(
    tmp_path: Path, damage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cache = FeatureCache(tmp_path)
    compute = Counter()
    first = cache.get_or_compute(make_parts(), compute)
    damage(first.path)
    del first
    assert "CORRUPT" in _cli(["list", "--root", str(tmp_path)])
    with caplog.at_level(logging.WARNING, logger="nlp_transfer.features.cache"):
        entry = cache.get_or_compute(make_parts(), compute)
    assert compute.calls == 2
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(entry["features"], features())
    assert len(entry_dirs(tmp_path)) == 1
    assert list((tmp_path / ".trash").iterdir()) == []


def test_checksum_verification_catches_flipped_bytes(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, verify="checksum")
    compute = Counter()
    path = cache.get_or_compute(make_parts(), compute).path / "features.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    assert FeatureCache(tmp_path, verify="size").get(make_parts()) is not None  # size passes
    assert cache.get(make_parts()) is None  # checksum check does not
    cache.get_or_compute(make_parts(), compute)
    assert compute.calls == 2


def test_default_verification_hashes_each_entry_once_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nlp_transfer.features.cache as cache_mod

    cache = FeatureCache(tmp_path)  # verify="once"
    compute = Counter()
    path = cache.get_or_compute(make_parts(), compute).path / "features.npy"
    hashed: list[Path] = []
    real = cache_mod._sha256_file
    monkeypatch.setattr(cache_mod, "_sha256_file", lambda p: hashed.append(p) or real(p))
    cache_mod._VERIFIED.clear()  # as in a new process
    assert cache.get(make_parts()) is not None and cache.get(make_parts()) is not None
    assert hashed.count(path) == 1  # the second read costs a stat only
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes, mtime kept (bit rot, a careless copy)
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    cache_mod._VERIFIED.clear()  # the next run
    assert cache.get(make_parts()) is None  # detected and removed
    cache.get_or_compute(make_parts(), compute)
    assert compute.calls == 2


def test_writer_killed_midway(tmp_path: Path) -> None:
    """A writer process dies mid-compute: its temp dir is reaped, nothing is published."""
    script = (
        "import os, numpy as np\n"
        "from nlp_transfer.features.cache import FeatureCache\n"
        "def compute(w):\n"
        "    w.append('features', np.zeros((3, 4), np.float32))\n"
        "    os._exit(9)\n"
        f"FeatureCache({str(tmp_path)!r}).get_or_compute({{'k': 1}}, compute)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], timeout=60, check=False)
    assert proc.returncode == 9
    leftovers = list((tmp_path / ".tmp").iterdir())
    assert len(leftovers) == 1 and (leftovers[0] / "features.npy").exists()
    assert entry_dirs(tmp_path) == []

    def compute(writer: Writer) -> None:
        writer.write("features", np.ones((3, 4), np.float32))

    entry = FeatureCache(tmp_path).get_or_compute({"k": 1}, compute)
    np.testing.assert_array_equal(entry["features"], np.ones((3, 4)))
    assert list((tmp_path / ".tmp").iterdir()) == []


# -- permissions -----------------------------------------------------------------------


def test_root_under_a_regular_file_is_not_writable(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("x")
    cache = FeatureCache(tmp_path / "file.txt" / "cache")
    with pytest.raises(CacheNotWritableError) as info:
        cache.get_or_compute(make_parts(), Counter())
    assert str(tmp_path / "file.txt" / "cache") in str(info.value)
    assert "features.cache_dir" in str(info.value)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permission bits"
)
def test_read_only_root_is_not_writable(tmp_path: Path) -> None:
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        with pytest.raises(CacheNotWritableError, match=r"features\.cache_dir"):
            FeatureCache(root).get_or_compute(make_parts(), Counter())
    finally:
        root.chmod(0o700)


# -- list / clear / CLI ----------------------------------------------------------------


def _cli(argv: list[str]) -> str:
    from contextlib import redirect_stdout
    from io import StringIO

    out = StringIO()
    with redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


def test_list_and_clear(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    assert cache.list_entries() == []
    a: Entry = cache.get_or_compute(make_parts(), Counter(), description="train split")
    b = cache.get_or_compute(make_parts(max_length=128), Counter())
    infos = {i.key: i for i in cache.list_entries()}
    assert set(infos) == {a.key, b.key}
    assert infos[a.key].size_bytes >= a.nbytes > 0
    assert infos[a.key].description == "train split"
    assert "max_length=128" in infos[b.key].description
    assert infos[a.key].status == "ok" and infos[a.key].created > 0

    table = _cli(["list", "--root", str(tmp_path)])
    assert a.key[:16] in table and b.key[:16] in table and "KiB" in table
    assert "2 entries" in table

    assert cache.clear(a.key) == 1
    assert [i.key for i in cache.list_entries()] == [b.key]
    assert "Removed 1 entry" in _cli(["clear", "--root", str(tmp_path), "--key", b.key[:10]])
    assert cache.list_entries() == []
    assert cache.clear() == 0
    assert FeatureCache(tmp_path / "missing").clear() == 0


def test_cli_module_entry_point(tmp_path: Path) -> None:
    FeatureCache(tmp_path).get_or_compute(make_parts(), Counter())
    proc = subprocess.run(
        [sys.executable, "-m", "nlp_transfer.features.cache", "list", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "1 entry," in proc.stdout and "RuntimeWarning" not in proc.stderr
    argv = ["clear", "--root", str(tmp_path), "--key", "ffff"]
    bad = subprocess.run(
        [sys.executable, "-m", "nlp_transfer.features", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1 and "match key" in bad.stderr
