"""On-disk cache of frozen-encoder features.

Features computed by a frozen encoder depend only on the encoder weights, the tokenizer,
the maximum length, the subword pooling, the chosen layers and the data. Those parts are
hashed into a key (:func:`cache_key`); an entry is a directory ``<root>/<key>/`` holding
one ``.npy`` file per array plus a ``manifest.json`` (shapes, dtypes, sizes, checksums).

Writing is crash-safe: a :class:`Writer` streams arrays into a private temporary
directory under ``<root>/.tmp/``, writes the manifest, and only then renames the whole
directory to its final name. A reader therefore never sees a half-written entry; if the
final directory is nevertheless damaged (missing/unparsable manifest, missing or
truncated arrays), it is moved aside, removed and recomputed, with a warning.
Concurrent writers of one key are serialised by an advisory lock where the platform
offers one; without it both compute, the first rename wins and the other uses it.

Typical use::

    cache = FeatureCache(cfg.features.cache_dir)
    parts = key_parts_from_encoder(encoder, data=hash_examples(rows), pooling="mean",
                                   layers=[-1])

    def compute(writer: Writer) -> None:
        for batch in loader:
            writer.append("features", encode(batch))  # [batch, hidden] float32
            writer.update()

    entry = cache.get_or_compute(parts, compute, total=len(loader))
    features = entry["features"]  # read-only np.memmap

Command line: ``python -m nlp_transfer.features.cache list|clear [--root DIR] [--key K]``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import string
import struct
import sys
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

try:  # POSIX advisory locks; absent on Windows, where concurrent writers just race.
    import fcntl
except ImportError:  # pragma: no cover - platform dependent
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG_KEY = "features.cache_dir"
ENV_ROOT = "NLP_TRANSFER_FEATURE_CACHE"
# the default of ``features.cache_dir``: ${paths.cache_dir}/features, where
# paths.cache_dir is $NLP_TRANSFER_CACHE, else the user cache folder
ENV_CACHE = "NLP_TRANSFER_CACHE"
DEFAULT_ROOT = "$NLP_TRANSFER_CACHE/features, else ~/.cache/nlp_transfer/features"

_TMP = ".tmp"
_TRASH = ".trash"
_LOCKS = ".locks"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,127}$")
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_OFFSETS = ".offsets"
_HEADER_BYTES = 256  # fixed .npy header size of appended arrays, rewritten on close
_CHUNK = 1 << 22
_FOREIGN_STALE_S = 7 * 24 * 3600.0

Verify = Literal["once", "size", "checksum"]
# entries whose checksums this process verified: (directory, (file, size, mtime_ns)...)
_VERIFIED: set[tuple[str, tuple[tuple[str, int, int], ...]]] = set()


class CacheNotWritableError(PermissionError):
    """The cache root cannot be created or written to."""


class CorruptEntryError(RuntimeError):
    """An entry directory exists but fails validation."""


# --------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable for a cache key")


def canonical_json(obj: Any) -> str:
    """Serialise ``obj`` deterministically: sorted keys, no spaces, tuples as lists."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default
    )


def hash_examples(examples: Iterable[Any]) -> str:
    """SHA-256 over the canonical JSON of each example, in order (streams the iterable).

    Order matters because cached features are aligned with example indices.
    """
    h = hashlib.sha256()
    for example in examples:
        h.update(canonical_json(example).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def cache_key(key_parts: Mapping[str, Any]) -> str:
    """The entry key: SHA-256 (hex) of the canonical JSON of the parts and format version."""
    payload = {"format": FORMAT_VERSION, "parts": dict(key_parts)}
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def feature_key_parts(
    *,
    encoder: Mapping[str, Any],
    tokenizer: str,
    vocab_size: int,
    max_length: int,
    pooling: str,
    layers: Sequence[int] | str,
    data: str,
    **extra: Any,
) -> dict[str, Any]:
    """Assemble the standard key parts of frozen features.

    Args:
        encoder: ``encoder.identity()`` (name/path, revision, weights hash).
        tokenizer: tokenizer name or path.
        vocab_size: tokenizer vocabulary size (``len(tokenizer)``).
        max_length: truncation length in subword tokens.
        pooling: how subwords/tokens are pooled (e.g. ``"first"``, ``"mean"``, ``"cls"``).
        layers: hidden-state indices used (0 = embeddings) or a named mix.
        data: content hash of the split, from :func:`hash_examples`.
        **extra: anything else that changes the features (e.g. ``split="train"``).
    """
    parts: dict[str, Any] = {
        "encoder": dict(encoder),
        "tokenizer": {"name": str(tokenizer), "vocab_size": int(vocab_size)},
        "max_length": int(max_length),
        "pooling": str(pooling),
        "layers": layers if isinstance(layers, str) else [int(i) for i in layers],
        "data": str(data),
    }
    clash = set(parts) & set(extra)
    if clash:
        raise ValueError(f"extra key parts clash with standard ones: {sorted(clash)}")
    parts.update(extra)
    return parts


# weights digests of live modules: module -> (stamp of its tensors, digest)
_WEIGHT_DIGESTS: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], str]] = (
    weakref.WeakKeyDictionary()
)


def weights_digest(module: Any) -> str:
    """BLAKE2b over every state-dict tensor of ``module`` (name, dtype, shape, bytes).

    Covers whatever makes weights differ (random init seeds, hub downloads in any file
    format, in-process edits). Memoised per module object: it is hashed again only when a
    tensor was replaced or modified in place since (autograd's version counters; edits
    through ``tensor.data`` bypass them), so a process hashes its encoder once.
    """
    import torch

    state = module.state_dict(keep_vars=True)
    stamp = tuple(
        (name, t.data_ptr(), t._version, str(t.dtype), tuple(t.shape)) for name, t in state.items()
    )
    cached = _WEIGHT_DIGESTS.get(module)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    start = time.perf_counter()
    h = hashlib.blake2b(digest_size=20)
    with torch.no_grad():
        for name, t in state.items():
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
            if t.device.type == "meta" or t.numel() == 0:
                continue
            flat = t.detach().reshape(-1).contiguous().cpu().view(torch.uint8)
            h.update(memoryview(flat.numpy()))
    digest = h.hexdigest()
    _WEIGHT_DIGESTS[module] = (stamp, digest)
    log.debug(
        "weights digest %s of %s in %.2fs",
        digest[:12],
        type(module).__name__,
        time.perf_counter() - start,
    )
    return digest


def key_parts_from_encoder(
    encoder: Any,
    *,
    data: str,
    pooling: str,
    layers: Sequence[int] | str,
    max_length: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """:func:`feature_key_parts` filled in from an ``nlp_transfer`` encoder.

    Uses ``encoder.identity()`` plus a digest of the encoder's weights
    (:func:`weights_digest`), ``encoder.tokenizer`` and ``encoder.max_length``.
    Negative layer indices are resolved against ``encoder.num_layers + 1`` hidden states,
    so ``[-1]`` and ``[num_layers]`` give the same key.
    """
    tok = getattr(encoder, "tokenizer", None)
    tok_name = str(getattr(tok, "name_or_path", "") or type(tok).__name__)
    vocab = len(tok) if tok is not None else 0
    length = int(max_length if max_length is not None else encoder.max_length)
    if not isinstance(layers, str):
        n_states = int(getattr(encoder, "num_layers", -2)) + 1
        resolved = []
        for i in layers:
            i = int(i)
            if n_states > 0:
                if not -n_states <= i < n_states:
                    raise ValueError(f"layer {i} out of range for {n_states} hidden states")
                i %= n_states
            resolved.append(i)
        layers = resolved
    ident = dict(encoder.identity())
    if callable(getattr(encoder, "state_dict", None)):
        ident["weights_hash"] = weights_digest(encoder)
    return feature_key_parts(
        encoder=ident,
        tokenizer=tok_name,
        vocab_size=vocab,
        max_length=length,
        pooling=pooling,
        layers=layers,
        data=data,
        **extra,
    )


def describe_key_parts(parts: Mapping[str, Any]) -> str:
    """A one-line human summary of key parts (hashes shortened to 8 characters)."""

    def short(value: Any) -> str:
        if isinstance(value, str):
            hexlike = len(value) >= 32 and all(c in string.hexdigits for c in value)
            return value[:8] if hexlike else value
        if isinstance(value, Mapping):
            for name_key in ("name_or_path", "name", "path", "class"):
                if name_key in value:
                    digest = next(
                        (str(v) for k, v in value.items() if "sha" in k or "hash" in k), ""
                    )
                    return str(value[name_key]) + (f"@{digest[:8]}" if digest else "")
            return canonical_json(value)[:40]
        if isinstance(value, list | tuple):
            return ",".join(short(v) for v in value)
        return str(value)

    return " ".join(f"{k}={short(v)}" for k, v in parts.items())


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _check_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise TypeError(f"only plain numeric dtypes can be cached, got {dt}")
    return dt


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """A version-1.0 ``.npy`` header padded to exactly ``_HEADER_BYTES`` bytes."""
    meta = {"descr": dtype.str, "fortran_order": False, "shape": tuple(int(s) for s in shape)}
    body = repr(meta).encode("latin1")
    pad = _HEADER_BYTES - 10 - len(body) - 1
    if pad < 0:
        raise ValueError(f"shape {shape} too long for a fixed-size .npy header")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", _HEADER_BYTES - 10) + body + b" " * pad + b"\n"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Appender:
    """Streams rows of one array to a ``.npy`` file whose header is fixed on close."""

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...]) -> None:
        self.path = path
        self.dtype = dtype
        self.row_shape = row_shape
        self.rows = 0
        self.file: BinaryIO = path.open("wb")
        self.file.write(_npy_header((0, *row_shape), dtype))

    def append(self, batch: np.ndarray) -> None:
        if batch.shape[1:] != self.row_shape:
            raise ValueError(
                f"{self.path.stem}: rows of shape {batch.shape[1:]} appended to an array "
                f"of rows {self.row_shape}"
            )
        data = np.ascontiguousarray(batch.astype(self.dtype, casting="same_kind", copy=False))
        self.file.write(data.tobytes())
        self.rows += len(data)

    def close(self, durable: bool) -> None:
        self.file.flush()
        self.file.seek(0)
        self.file.write(_npy_header((self.rows, *self.row_shape), self.dtype))
        self.file.flush()
        if durable:
            os.fsync(self.file.fileno())
        self.file.close()


class Writer:
    """Receives the arrays of one entry and streams them into its temporary directory.

    Two ways to write an array (each name is used by exactly one of them):

    * :meth:`allocate` (or :meth:`write`) when the final shape is known: returns a
      writable memory map to fill slice by slice;
    * :meth:`append` when it is not: batches are appended along axis 0. For ragged
      data (e.g. token vectors per sentence) use :meth:`append_ragged`.

    Names match ``[A-Za-z0-9_-]+``. Arrays must be NumPy (call ``tensor.cpu().numpy()``).
    """

    def __init__(self, directory: Path, progress: Any = None, durable: bool = True) -> None:
        self.directory = directory
        self.meta: dict[str, Any] = {}
        self._durable = durable
        self._progress = progress
        self._allocated: dict[str, np.memmap] = {}
        self._appenders: dict[str, _Appender] = {}
        self._ragged: set[str] = set()
        self._closed = False

    def _new_name(self, name: str) -> Path:
        if self._closed:
            raise RuntimeError("the writer is closed; write only inside the compute callback")
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid array name {name!r} (allowed: [A-Za-z0-9_-], max 128)")
        if name in self._allocated or name in self._appenders:
            raise ValueError(f"array {name!r} already exists in this entry")
        return self.directory / f"{name}.npy"

    def allocate(self, name: str, shape: Sequence[int], dtype: Any = np.float32) -> np.memmap:
        """Create array ``name`` with its final ``shape``; returns a writable memory map."""
        path = self._new_name(name)
        arr = np.lib.format.open_memmap(
            path, mode="w+", dtype=_check_dtype(dtype), shape=tuple(int(s) for s in shape)
        )
        self._allocated[name] = arr
        return arr

    def write(self, name: str, array: Any) -> None:
        """Store a whole (small) array at once, e.g. labels."""
        arr = np.asarray(array)
        self.allocate(name, arr.shape, arr.dtype)[...] = arr

    def append(self, name: str, batch: Any) -> None:
        """Append ``batch`` along axis 0; the first batch fixes dtype and row shape."""
        if name in self._ragged:
            raise ValueError(f"{name!r} is ragged; use append_ragged()")
        self._append(name, np.asarray(batch), internal=False)

    def _append(self, name: str, arr: np.ndarray, internal: bool) -> None:
        if arr.ndim == 0:
            raise ValueError(f"{name}: append needs at least one dimension")
        appender = self._appenders.get(name)
        if appender is None:
            path = self.directory / f"{name}.npy" if internal else self._new_name(name)
            appender = _Appender(path, _check_dtype(arr.dtype), tuple(arr.shape[1:]))
            self._appenders[name] = appender
        appender.append(arr)

    def append_ragged(self, name: str, items: Sequence[Any]) -> None:
        """Append variable-length items (each ``[n_i, ...]``) to ragged array ``name``.

        Rows are concatenated into ``name``; item boundaries go to ``name + ".offsets"``
        (``int64``, starts with 0). Read them back with :meth:`Entry.ragged`.
        """
        if name in self._appenders and name not in self._ragged:
            raise ValueError(f"{name!r} was written with append(), not append_ragged()")
        arrays = [np.asarray(x) for x in items]
        if name not in self._ragged:
            if not arrays:
                raise ValueError(f"{name}: the first append_ragged call needs items")
            self._append(name, arrays[0][:0], internal=False)
            self._append(name + _OFFSETS, np.zeros(1, dtype=np.int64), internal=True)
            self._ragged.add(name)
        if not arrays:
            return
        start = self._appenders[name].rows
        ends = start + np.cumsum([len(a) for a in arrays], dtype=np.int64)
        self._append(name, np.concatenate(arrays, axis=0), internal=False)
        self._append(name + _OFFSETS, ends, internal=True)

    def update(self, n: int = 1) -> None:
        """Advance the progress bar (if ``total`` was given) by ``n`` batches."""
        if self._progress is not None:
            self._progress.update(n)

    def _close(self, checksum: bool) -> dict[str, dict[str, Any]]:
        """Flush everything and describe the arrays for the manifest."""
        self._closed = True
        shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for name, mm in self._allocated.items():
            mm.flush()
            shapes[name] = (tuple(mm.shape), mm.dtype)
        for name, app in self._appenders.items():
            app.close(self._durable)
            shapes[name] = ((app.rows, *app.row_shape), app.dtype)
        self._allocated.clear()
        records: dict[str, dict[str, Any]] = {}
        for name, (shape, dtype) in sorted(shapes.items()):
            path = self.directory / f"{name}.npy"
            if self._durable and name not in self._appenders:
                with path.open("rb+") as f:
                    os.fsync(f.fileno())
            records[name] = {
                "file": path.name,
                "shape": list(shape),
                "dtype": dtype.str,
                "file_size": path.stat().st_size,
                "sha256": _sha256_file(path) if checksum else None,
            }
        return records

    def _abort(self) -> None:
        self._closed = True
        self._allocated.clear()
        for app in self._appenders.values():
            with contextlib.suppress(OSError):
                app.file.close()


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A complete, validated cache entry; arrays are read-only memory maps."""

    key: str
    path: Path
    manifest: dict[str, Any]
    arrays: Mapping[str, np.ndarray]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __contains__(self, name: object) -> bool:
        return name in self.arrays

    @property
    def key_parts(self) -> dict[str, Any]:
        return self.manifest["key_parts"]

    @property
    def meta(self) -> dict[str, Any]:
        """Free-form metadata the compute callback put in ``writer.meta``."""
        return self.manifest.get("meta", {})

    @property
    def nbytes(self) -> int:
        return sum(int(r["file_size"]) for r in self.manifest["arrays"].values())

    def num_items(self, name: str) -> int:
        """Number of items in ragged array ``name``."""
        return len(self.arrays[name + _OFFSETS]) - 1

    def ragged(self, name: str, index: int) -> np.ndarray:
        """Item ``index`` of a ragged array written with :meth:`Writer.append_ragged`."""
        offsets = self.arrays[name + _OFFSETS]
        return self.arrays[name][int(offsets[index]) : int(offsets[index + 1])]


def _read_manifest(directory: Path) -> dict[str, Any]:
    try:
        text = (directory / MANIFEST).read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise CorruptEntryError("manifest.json is missing") from err
    except OSError as err:
        raise CorruptEntryError(f"manifest.json is unreadable: {err}") from err
    try:
        manifest = json.loads(text)
    except ValueError as err:
        raise CorruptEntryError(f"manifest.json is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("arrays"), dict):
        raise CorruptEntryError("manifest.json has no 'arrays' table")
    if manifest.get("format") != FORMAT_VERSION:
        raise CorruptEntryError(f"unsupported format {manifest.get('format')!r}")
    return manifest


def _open_entry(directory: Path, key: str, verify: Verify) -> Entry:
    """Validate and memory-map an entry; raises :class:`CorruptEntryError`."""
    manifest = _read_manifest(directory)
    if manifest.get("key") != key:
        raise CorruptEntryError(f"manifest is for key {manifest.get('key')!r}")
    arrays: dict[str, np.ndarray] = {}
    stamp: list[tuple[str, int, int]] = []
    for name, rec in manifest["arrays"].items():
        try:
            path = directory / rec["file"]
            if path.parent != directory:
                raise CorruptEntryError(f"{name}: file outside the entry")
            if not path.is_file():
                raise CorruptEntryError(f"array file {rec['file']} is missing")
            size = path.stat().st_size
            if size != rec["file_size"]:
                raise CorruptEntryError(
                    f"{rec['file']} has {size} bytes, manifest says {rec['file_size']}"
                )
            stat = path.stat()
            stamp.append((str(rec["file"]), stat.st_size, stat.st_mtime_ns))
            if verify == "checksum" and rec.get("sha256"):
                digest = _sha256_file(path)
                if digest != rec["sha256"]:
                    raise CorruptEntryError(f"{rec['file']}: sha256 mismatch")
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            if list(arr.shape) != list(rec["shape"]) or arr.dtype.str != rec["dtype"]:
                raise CorruptEntryError(
                    f"{rec['file']}: {arr.dtype.str}{list(arr.shape)} on disk, manifest says "
                    f"{rec['dtype']}{rec['shape']}"
                )
        except CorruptEntryError:
            raise
        except (KeyError, TypeError, ValueError, OSError) as err:
            raise CorruptEntryError(f"array {name!r}: {err!r}") from err
        arrays[name] = arr
    if verify == "once":
        _verify_once(directory, manifest, tuple(stamp))
    return Entry(key=key, path=directory, manifest=manifest, arrays=arrays)


def _verify_once(
    directory: Path, manifest: dict[str, Any], stamp: tuple[tuple[str, int, int], ...]
) -> None:
    """Check every recorded SHA-256 the first time this process opens the entry (and again
    if a file's size or mtime changed since): bytes changed in place are caught at the
    first read of each run, and later reads cost a ``stat`` only."""
    memo = (str(directory), stamp)
    if memo in _VERIFIED:
        return
    for rec in manifest["arrays"].values():
        if rec.get("sha256") and _sha256_file(directory / rec["file"]) != rec["sha256"]:
            raise CorruptEntryError(f"{rec['file']}: sha256 mismatch (same size, other bytes)")
    _VERIFIED.add(memo)


@dataclass(frozen=True)
class EntryInfo:
    """One row of :meth:`FeatureCache.list_entries`."""

    key: str
    path: Path
    size_bytes: int
    created: float
    description: str
    key_parts: dict[str, Any] | None
    status: str  # "ok" or "corrupt: <reason>"


# --------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------


def default_root() -> Path:
    """The root runs use by default (``features.cache_dir`` = ``${paths.cache_dir}/features``).

    ``$NLP_TRANSFER_FEATURE_CACHE`` if set, else ``<cache root>/features``: the cache root
    is ``$NLP_TRANSFER_CACHE``, else ``$XDG_CACHE_HOME/nlp_transfer``, else
    ``~/.cache/nlp_transfer`` (:func:`nlp_transfer.utils.resolvers.cache_root`).
    """
    explicit = os.environ.get(ENV_ROOT)
    if explicit:
        return Path(explicit).expanduser()
    from nlp_transfer.utils.resolvers import cache_root

    return Path(cache_root()) / "features"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dir_size(path: Path) -> int:
    total = 0
    for f in path.rglob("*"):
        with contextlib.suppress(OSError):
            if f.is_file():
                total += f.stat().st_size
    return total


class FeatureCache:
    """A directory of feature entries addressed by :func:`cache_key`.

    Args:
        root: cache directory (created on first write); config key ``features.cache_dir``.
        checksum: record each array's SHA-256 in the manifest when writing.
        verify: ``"once"`` (default: files, sizes, shapes, dtypes on every read, and the
            recorded SHA-256 on the first read of an entry in this process), ``"size"``
            (no hashing) or ``"checksum"`` (re-hash every array on each read).
        lock: serialise writers of one key with an advisory file lock (POSIX).
        durable: fsync arrays, manifest and directories before publishing an entry.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        checksum: bool = True,
        verify: Verify = "once",
        lock: bool = True,
        durable: bool = True,
    ) -> None:
        if verify not in ("once", "size", "checksum"):
            raise ValueError(f"verify must be 'once', 'size' or 'checksum', got {verify!r}")
        self.root = Path(root).expanduser().absolute()
        self.checksum = checksum
        self.verify: Verify = verify
        self.lock = lock
        self.durable = durable
        self._host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.root)!r})"

    # -- keys and paths ----------------------------------------------------------------

    @staticmethod
    def key(key_parts: Mapping[str, Any]) -> str:
        """See :func:`cache_key`."""
        return cache_key(key_parts)

    def path(self, key: str) -> Path:
        """Directory of entry ``key`` (whether or not it exists)."""
        if not _KEY_RE.match(key):
            raise ValueError(f"not a cache key: {key!r}")
        return self.root / key

    def resolve(self, key_prefix: str) -> str:
        """The unique existing key starting with ``key_prefix``; ``KeyError`` otherwise."""
        matches = [k for k in self._keys() if k.startswith(key_prefix.lower())]
        if len(matches) != 1:
            found = "no entry" if not matches else f"{len(matches)} entries"
            raise KeyError(f"{found} in {self.root} match key {key_prefix!r}")
        return matches[0]

    def _keys(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _KEY_RE.match(p.name))

    # -- reading -----------------------------------------------------------------------

    def get(self, key_parts: Mapping[str, Any]) -> Entry | None:
        """The valid entry for ``key_parts``, or ``None`` (a corrupt one is removed)."""
        return self._load(cache_key(key_parts), self.verify)

    def _load(self, key: str, verify: Verify) -> Entry | None:
        directory = self.path(key)
        if not directory.exists():
            return None
        try:
            return _open_entry(directory, key, verify)
        except CorruptEntryError as err:
            log.warning(
                "Feature cache entry %s is corrupt (%s); removing it and recomputing.",
                directory,
                err,
            )
            self._discard(directory)
            return None

    # -- writing -----------------------------------------------------------------------

    def check_writable(self) -> None:
        """Create the root if needed and prove it writable; raises CacheNotWritableError."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for sub in (_TMP, _TRASH, _LOCKS):
                (self.root / sub).mkdir(exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix="probe-", dir=self.root / _TMP)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            reason = err.strerror or str(err)
            raise CacheNotWritableError(
                f"Feature cache directory {self.root} is not writable ({reason}). "
                f"Set the config key `{CONFIG_KEY}` to a writable directory, e.g. "
                f"`{CONFIG_KEY}=/tmp/nlp_transfer_features` on the command line "
                f"(or set ${ENV_ROOT} for the CLI)."
            ) from err

    def get_or_compute(
        self,
        key_parts: Mapping[str, Any],
        compute: Callable[[Writer], None],
        *,
        description: str | None = None,
        total: int | None = None,
        progress_desc: str = "caching features",
    ) -> Entry:
        """Return the entry for ``key_parts``, computing it with ``compute`` on a miss.

        Args:
            key_parts: JSON-able dict (see :func:`feature_key_parts`).
            compute: called with a :class:`Writer` on a miss; must write every array.
            description: human-readable note stored in the manifest and shown by ``list``.
            total: number of batches; when given, a progress bar advances on
                :meth:`Writer.update`.
            progress_desc: progress bar label.
        """
        key = cache_key(key_parts)
        entry = self._load(key, self.verify)
        if entry is not None:
            _log_hit(entry)
            return entry
        self.check_writable()
        self._reap()
        with self._locked(key):
            entry = self._load(key, self.verify)  # another process may have finished it
            if entry is not None:
                _log_hit(entry)
                return entry
            log.info("feature cache miss %s: computing (%s)", key[:12], self.root)
            tmp = self.root / _TMP / f"{key}__{self._host}__{os.getpid()}__{uuid.uuid4().hex}"
            tmp.mkdir()
            bar = _progress_bar(total, progress_desc)
            writer = Writer(tmp, progress=bar, durable=self.durable)
            try:
                compute(writer)
                records = writer._close(self.checksum)
                manifest = {
                    "format": FORMAT_VERSION,
                    "key": key,
                    "key_parts": json.loads(canonical_json(dict(key_parts))),
                    "description": description,
                    "created": time.time(),
                    "arrays": records,
                    "meta": json.loads(canonical_json(writer.meta)),
                }
                self._write_manifest(tmp, manifest)
                return self._publish(key, tmp)
            except BaseException:
                writer._abort()
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            finally:
                if bar is not None:
                    bar.close()

    def _write_manifest(self, directory: Path, manifest: dict[str, Any]) -> None:
        with (directory / MANIFEST).open("w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            if self.durable:
                os.fsync(f.fileno())
        if self.durable:
            _fsync_dir(directory)

    def _publish(self, key: str, tmp: Path) -> Entry:
        """Atomically rename ``tmp`` to the final name, or adopt a winner's entry."""
        final = self.path(key)
        for _ in range(3):
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.exists():
                    raise
                theirs = self._load(key, "size")  # a corrupt one is discarded here
                if theirs is not None:
                    log.info("another writer published %s first; using its entry", key[:12])
                    shutil.rmtree(tmp, ignore_errors=True)
                    return theirs
                continue
            if self.durable:
                _fsync_dir(self.root)
            try:
                return _open_entry(final, key, "size")
            except CorruptEntryError as err:  # pragma: no cover - would be a bug
                raise RuntimeError(f"freshly written entry {final} is invalid: {err}") from err
        raise RuntimeError(f"could not publish cache entry {final}")

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        if not self.lock or fcntl is None:
            yield
            return
        with (self.root / _LOCKS / f"{key}.lock").open("a+b") as f:
            locked = False
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                locked = True
            except OSError as err:  # e.g. a file system without flock
                log.debug("no lock for %s (%s); concurrent writers will race", key, err)
            try:
                yield
            finally:
                if locked:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # -- housekeeping ------------------------------------------------------------------

    def _discard(self, directory: Path) -> bool:
        """Move ``directory`` aside (so it vanishes atomically), then delete it."""
        trash = self.root / _TRASH / f"{directory.name}__{uuid.uuid4().hex}"
        try:
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.rename(directory, trash)
        except FileNotFoundError:
            return False  # someone else removed it
        except OSError as err:
            log.warning("could not move %s aside (%s); deleting in place", directory, err)
            trash = directory
        shutil.rmtree(trash, ignore_errors=True)
        if trash.exists():
            log.warning("could not delete %s", trash)
        return True

    def _reap(self) -> int:
        """Delete temporary dirs of dead writers and leftovers in the trash."""
        removed = 0
        tmp_root = self.root / _TMP
        if tmp_root.is_dir():
            for d in tmp_root.iterdir():
                if d.is_dir() and self._is_stale(d):
                    log.info("removing stale temporary cache directory %s", d)
                    shutil.rmtree(d, ignore_errors=True)
                    removed += 1
        trash = self.root / _TRASH
        if trash.is_dir():
            for d in trash.iterdir():
                shutil.rmtree(d, ignore_errors=True)
        return removed

    def _is_stale(self, directory: Path) -> bool:
        parts = directory.name.split("__")
        if len(parts) == 4 and parts[1] == self._host and parts[2].isdigit():
            return not _pid_alive(int(parts[2]))
        try:
            newest = max(
                [directory.stat().st_mtime] + [f.stat().st_mtime for f in directory.iterdir()]
            )
        except OSError:
            return False
        return time.time() - newest > _FOREIGN_STALE_S

    def list_entries(self) -> list[EntryInfo]:
        """Describe every entry (valid or corrupt), oldest first."""
        infos = []
        for key in self._keys():
            directory = self.root / key
            parts: dict[str, Any] | None = None
            created = 0.0
            try:
                entry = _open_entry(directory, key, "size")
            except CorruptEntryError as err:
                with contextlib.suppress(OSError):
                    created = directory.stat().st_mtime
                status, description = f"corrupt: {err}", "(corrupt)"
            else:
                parts = entry.key_parts
                created = float(entry.manifest.get("created") or directory.stat().st_mtime)
                description = entry.manifest.get("description") or describe_key_parts(parts)
                status = "ok"
            infos.append(
                EntryInfo(
                    key=key,
                    path=directory,
                    size_bytes=_dir_size(directory),
                    created=created,
                    description=description,
                    key_parts=parts,
                    status=status,
                )
            )
        return sorted(infos, key=lambda i: i.created)

    def clear(self, key: str | None = None) -> int:
        """Delete entry ``key`` (exact key), or every entry; returns how many were removed.

        With no key, leftovers of dead writers are removed too; temporary directories
        of live writers are left alone.
        """
        if not self.root.exists():
            return 0
        self.check_writable()
        keys = [key] if key is not None else self._keys()
        removed = sum(self._discard(self.path(k)) for k in keys if self.path(k).exists())
        if key is None:
            self._reap()
        return removed


def _log_hit(entry: Entry) -> None:
    log.info(
        "feature cache hit %s (%s in %s): %s",
        entry.key[:12],
        human_size(entry.nbytes),
        entry.path,
        entry.manifest.get("description") or describe_key_parts(entry.key_parts),
    )


def _progress_bar(total: int | None, desc: str) -> Any:
    if total is None:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with transformers
        return None
    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def human_size(n: float) -> str:
    """Bytes as ``B``, ``KiB``, ``MiB``... with one decimal above bytes."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_table(entries: Sequence[EntryInfo]) -> str:
    """Render entries as an aligned text table with a total line."""
    header = ("KEY", "SIZE", "CREATED", "STATUS", "DESCRIPTION")
    rows = [
        (
            e.key[:16],
            human_size(e.size_bytes),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created)),
            "ok" if e.status == "ok" else "CORRUPT",
            e.description,
        )
        for e in entries
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = []
    for r in [header, *rows]:
        cells = [c.rjust(w) if i == 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join([*cells, r[4]]).rstrip())
    total = sum(e.size_bytes for e in entries)
    noun = "entry" if len(entries) == 1 else "entries"
    lines.append(f"{len(entries)} {noun}, {human_size(total)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nlp_transfer.features.cache list|clear [--root DIR] [--key K]``."""
    parser = argparse.ArgumentParser(
        prog="python -m nlp_transfer.features.cache",
        description="List or clear the frozen-feature cache.",
    )
    parser.add_argument("command", choices=["list", "clear"])
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help=f"cache directory (default: ${ENV_ROOT} or {DEFAULT_ROOT})",
    )
    parser.add_argument("--key", default=None, help="a key or unique key prefix")
    args = parser.parse_args(argv)
    cache = FeatureCache(args.root if args.root is not None else default_root())
    try:
        if args.command == "list":
            entries = cache.list_entries()
            if args.key:
                entries = [e for e in entries if e.key.startswith(args.key.lower())]
            print(f"Feature cache {cache.root}")
            print(format_table(entries))
            return 0
        key = cache.resolve(args.key) if args.key else None
        removed = cache.clear(key)
        noun = "entry" if removed == 1 else "entries"
        print(f"Removed {removed} {noun} from {cache.root}")
        return 0
    except (KeyError, CacheNotWritableError) as err:
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
