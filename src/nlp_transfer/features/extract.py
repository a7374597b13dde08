"""Frozen-encoder features of a datamodule split, computed once and optionally cached.

Every hidden state is kept (axis ``S = L+1``: index 0 the embeddings, ``-1`` the top layer),
so one entry serves every head, layer choice and layer pooling. Three layouts:

* ``sentence`` (classification): the head's token pooling (``cls`` / ``mean`` / ``max``)
  applied to each hidden state: array ``features`` ``[N, S, H]``.
* ``token`` (classification, only for ``max`` pooling over a summed or mixed layer pooling,
  where pooling each layer first would change the features): the token vectors of each
  example, ragged ``[T_i, S, H]``.
* ``word`` (sequence labeling): word vectors after subword pooling (``first`` / ``last`` /
  ``mean`` / ``first_last``), ragged per sentence ``[W_i, S, H']`` (``H' = 2H`` for
  ``first_last``, laid out ``[first, last]`` per hidden state). Windows of a long sentence are
  merged: each word appears once, with the features of the window that owns it.

Ragged arrays are written with :meth:`Writer.append_ragged` (items in split order). The key
holds the encoder identity, the tokenizer, the max length, the pooling, the layout, the
storage dtype, the encoder precision and a hash of the split's inputs (labels excluded, so a
relabelled split reuses the features). The encoder runs in eval mode under ``no_grad`` with a
forked RNG, so extraction never changes a seeded run's random stream.

Typical use::

    spec = feature_spec(cfg, datamodule.task)
    arrays = get_features(encoder, datamodule, "train", spec, cache_from_config(cfg))
    x = arrays["features"]              # sentence level: [N, S, H]
    x0 = arrays.ragged("features", 0)   # token/word level: [W_0, S, H']
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from omegaconf import DictConfig

from nlp_transfer.data.base import TransferDataModule
from nlp_transfer.encoders.base import Encoder
from nlp_transfer.encoders.subword_pooling import POOLING_MODES, SubwordPooling
from nlp_transfer.errors import ConfigError
from nlp_transfer.features.cache import (
    FeatureCache,
    _progress_bar,
    hash_examples,
    key_parts_from_encoder,
)
from nlp_transfer.heads.classification import POOLINGS, pool_tokens
from nlp_transfer.training.hardware import auto_precision, probe_hardware

log = logging.getLogger(__name__)

SENTENCE, TOKEN, WORD = "sentence", "token", "word"
LEVELS = (SENTENCE, TOKEN, WORD)
FEATURES = "features"
_OFFSETS = ".offsets"
_LABEL_COLUMNS = ("label", "tags", "sentence_id")
# layer poolings that mix hidden states: max over tokens does not commute with them
_MIXING = ("sum_last_k", "scalar_mix")
_DTYPES = ("float32", "float16")


class FeatureArrays(Protocol):
    """What :func:`get_features` returns: a cache :class:`~.cache.Entry` or a
    :class:`MemoryEntry`, both read the same way."""

    @property
    def meta(self) -> dict[str, Any]: ...

    def __getitem__(self, name: str) -> np.ndarray: ...

    def __contains__(self, name: object) -> bool: ...

    def num_items(self, name: str) -> int: ...

    def ragged(self, name: str, index: int) -> np.ndarray: ...


@dataclass(frozen=True)
class FeatureSpec:
    """What is extracted and how.

    Attributes:
        level: ``sentence``, ``token`` or ``word`` (see the module docstring).
        pooling: token pooling (``sentence``), subword pooling (``word``) or ``none``.
        dtype: storage dtype, ``float32`` or ``float16``.
        precision: encoder pass precision: ``32``, ``bf16`` or ``16`` (autocast).
        device: where the encoder runs for extraction (``cpu``, ``cuda``, ``cuda:1``...).
    """

    level: str
    pooling: str
    dtype: str = "float32"
    precision: str = "32"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ConfigError(f"feature level {self.level!r}: choose one of {list(LEVELS)}")
        valid = {SENTENCE: POOLINGS, WORD: POOLING_MODES, TOKEN: ("none",)}[self.level]
        if self.pooling not in valid:
            raise ConfigError(
                f"{self.level} features: pooling {self.pooling!r} is not one of {list(valid)}"
            )
        if self.dtype not in _DTYPES:
            raise ConfigError(f"features.dtype={self.dtype!r}: choose one of {list(_DTYPES)}")
        if self.precision not in ("32", "bf16", "16"):
            raise ConfigError(f"features.precision={self.precision!r}: choose 32, bf16 or 16")


# --------------------------------------------------------------------------------------
# In-memory store (features.cache=false): the same interface as a cache entry
# --------------------------------------------------------------------------------------


class MemoryEntry:
    """Arrays kept in memory, read like a cache :class:`~.cache.Entry`."""

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.arrays = arrays
        self.meta = meta

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __contains__(self, name: object) -> bool:
        return name in self.arrays

    def num_items(self, name: str) -> int:
        return len(self.arrays[name + _OFFSETS]) - 1

    def ragged(self, name: str, index: int) -> np.ndarray:
        offsets = self.arrays[name + _OFFSETS]
        return self.arrays[name][int(offsets[index]) : int(offsets[index + 1])]


class MemoryWriter:
    """The subset of :class:`~.cache.Writer` extraction uses, collecting into memory."""

    def __init__(self, progress: Any = None) -> None:
        self.meta: dict[str, Any] = {}
        self._progress = progress
        self._parts: dict[str, list[np.ndarray]] = {}
        self._ends: dict[str, list[int]] = {}

    def append(self, name: str, batch: Any) -> None:
        self._parts.setdefault(name, []).append(np.asarray(batch))

    def append_ragged(self, name: str, items: Sequence[Any]) -> None:
        arrays = [np.asarray(x) for x in items]
        if not arrays:
            return
        ends = self._ends.setdefault(name, [0])
        for a in arrays:
            ends.append(ends[-1] + len(a))
        self._parts.setdefault(name, []).append(np.concatenate(arrays, axis=0))

    def update(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.update(n)

    def entry(self) -> MemoryEntry:
        arrays = {name: np.concatenate(parts, axis=0) for name, parts in self._parts.items()}
        for name, ends in self._ends.items():
            arrays[name + _OFFSETS] = np.asarray(ends, dtype=np.int64)
        return MemoryEntry(arrays, dict(self.meta))


# --------------------------------------------------------------------------------------
# What to extract
# --------------------------------------------------------------------------------------


def layer_pooling_mode(cfg: DictConfig) -> str:
    """The configured layer pooling mode (``last`` when the group is unset)."""
    node = cfg.get("layer_pooling")
    return str(node.get("mode", "last")) if node else "last"


def resolve_precision(cfg: DictConfig) -> str:
    """``features.precision``, or the trainer's (``bf16-mixed`` → ``bf16``) when null."""
    features = cfg.get("features") or {}
    value = features.get("precision")
    if value is None:
        value = (cfg.get("trainer") or {}).get("precision", "32")
    if str(value).lower() == "auto":  # not resolved by a run yet: as a run would resolve it
        accelerator = "cpu" if resolve_device(cfg) == "cpu" else "cuda"
        value = auto_precision(probe_hardware(accelerator))[0]
    text = str(value).lower()
    if text.startswith("bf16"):
        return "bf16"
    if text.startswith("16") or text in ("half", "fp16"):
        return "16"
    return "32"


def resolve_device(cfg: DictConfig) -> str:
    """``features.device``, or ``cuda`` when available and the trainer is not on the CPU."""
    features = cfg.get("features") or {}
    device = features.get("device")
    if device:
        return str(device)
    accelerator = str((cfg.get("trainer") or {}).get("accelerator", "auto"))
    return "cuda" if accelerator != "cpu" and torch.cuda.is_available() else "cpu"


def feature_spec(cfg: DictConfig, task: str, *, level: str | None = None) -> FeatureSpec:
    """The features a run needs: word vectors for sequence labeling, sentence vectors
    pooled like ``head.pooling`` for classification (token vectors where ``max`` pooling
    meets a mixing layer pooling, unless ``level`` is given)."""
    features = cfg.get("features") or {}
    common = {
        "dtype": str(features.get("dtype", "float32")),
        "precision": resolve_precision(cfg),
        "device": resolve_device(cfg),
    }
    if task == "sequence_labeling":
        sub = cfg.get("subword_pooling") or {}
        return FeatureSpec(level=WORD, pooling=str(sub.get("mode", "first")), **common)
    pooling = str(cfg.head.get("pooling", "cls"))
    if level is None:
        mixing = pooling == "max" and layer_pooling_mode(cfg) in _MIXING
        level = TOKEN if mixing else SENTENCE
    return FeatureSpec(level=level, pooling="none" if level == TOKEN else pooling, **common)


def cache_from_config(cfg: DictConfig) -> FeatureCache | None:
    """The shared cache at ``features.cache_dir`` when ``features.cache`` is on, else None."""
    features = cfg.get("features") or {}
    if not features.get("cache"):
        return None
    return FeatureCache(str(features.cache_dir))


def split_fingerprint(datamodule: TransferDataModule, split: str) -> str:
    """Content hash of a split's encoder inputs (texts / words, not labels), in order."""
    datamodule.load_examples()
    columns = datamodule.to_columns(datamodule.examples[split])
    inputs = {k: v for k, v in columns.items() if k not in _LABEL_COLUMNS}
    names = sorted(inputs)
    rows = (dict(zip(names, values)) for values in zip(*(inputs[n] for n in names)))
    return hash_examples(rows)


def split_labels(datamodule: TransferDataModule, split: str) -> list[Any]:
    """Label ids per example: an int (classification) or a list per sentence (NER)."""
    datamodule.load_examples()
    columns = datamodule.to_columns(datamodule.examples[split])
    return list(columns["tags"] if "tags" in columns else columns["label"])


def key_parts_for(
    encoder: Encoder, datamodule: TransferDataModule, split: str, spec: FeatureSpec
) -> dict[str, Any]:
    """Cache key parts of ``split``'s features under ``spec``."""
    extra: dict[str, Any] = {
        "task": datamodule.task,
        "level": spec.level,
        "dtype": spec.dtype,
        "precision": spec.precision,
    }
    if spec.level == WORD:
        extra["stride"] = getattr(datamodule, "stride", None)  # changes window context
    return key_parts_from_encoder(
        encoder,
        data=split_fingerprint(datamodule, split),
        pooling=spec.pooling,
        layers="all",
        max_length=datamodule.max_length,
        **extra,
    )


# --------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------


def _autocast(device: torch.device, precision: str) -> Any:
    if precision == "32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _hidden_states(
    encoder: Encoder, batch: Mapping[str, torch.Tensor], device: torch.device, precision: str
) -> torch.Tensor:
    """All hidden states of a batch stacked as ``[B, T, S, H]``."""
    with _autocast(device, precision):
        hidden = encoder(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            batch["token_type_ids"].to(device) if "token_type_ids" in batch else None,
        )
    return torch.stack(hidden, dim=2)


def _to_numpy(x: torch.Tensor, dtype: str) -> np.ndarray:
    return x.detach().float().cpu().numpy().astype(dtype, copy=False)


def _sentence_batch(stacked: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[B, T, S, H]`` → ``[B, S, H]``: the head's pooling applied to every hidden state."""
    b, _, s, h = stacked.shape
    return pool_tokens(stacked.flatten(2), mask.to(stacked.device), pooling).view(b, s, h)


def _word_batch(
    stacked: torch.Tensor, word_map: torch.Tensor, words: int, mode: str
) -> torch.Tensor:
    """``[B, T, S, H]`` → ``[B, W, S, H']``: subword pooling applied to every hidden state."""
    b, t, s, h = stacked.shape
    pooled = SubwordPooling(mode)(stacked.reshape(b, t, s * h), word_map, words)
    if mode == "first_last":
        first, last = pooled.split(s * h, dim=-1)
        return torch.cat([first.view(b, words, s, h), last.view(b, words, s, h)], dim=-1)
    return pooled.view(b, words, s, h)


class _SentenceMerger:
    """Collects the owned words of consecutive windows into whole sentences, in order."""

    def __init__(self) -> None:
        self.expected = 0
        self.current: int | None = None
        self.rows: list[np.ndarray] = []
        self.count = 0

    def add(self, sentence_id: int, total_words: int, rows: np.ndarray) -> np.ndarray | None:
        if self.current is None:
            if sentence_id != self.expected:
                raise RuntimeError(
                    f"feature extraction: windows out of order (sentence {sentence_id}, "
                    f"expected {self.expected})"
                )
            self.current = sentence_id
        elif sentence_id != self.current:
            raise RuntimeError(
                f"feature extraction: sentence {self.current} is incomplete "
                f"({self.count} words) when sentence {sentence_id} starts"
            )
        self.rows.append(rows)
        self.count += len(rows)
        if self.count < total_words:
            return None
        if self.count > total_words:
            raise RuntimeError(
                f"sentence {sentence_id}: {self.count} words, expected {total_words}"
            )
        done = np.concatenate(self.rows, axis=0)
        self.expected += 1
        self.current, self.rows, self.count = None, [], 0
        return done


def extract_split(
    writer: Any,
    encoder: Encoder,
    datamodule: TransferDataModule,
    split: str,
    spec: FeatureSpec,
) -> None:
    """Run the frozen encoder over ``split`` and write array ``features`` into ``writer``
    (a cache :class:`~.cache.Writer` or a :class:`MemoryWriter`)."""
    device = torch.device(spec.device)
    loader = datamodule.split_dataloader(split)
    states, hidden = encoder.num_layers + 1, encoder.hidden_size
    was_training = encoder.training
    first = next(iter(encoder.parameters()), None)
    origin = first.device if first is not None else torch.device("cpu")
    merger = _SentenceMerger()
    items = 0
    encoder.eval()
    encoder.to(device)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for batch in loader:
                stacked = _hidden_states(encoder, batch, device, spec.precision)
                if spec.level == SENTENCE:
                    pooled = _sentence_batch(stacked, batch["attention_mask"], spec.pooling)
                    writer.append(FEATURES, _to_numpy(pooled, spec.dtype))
                    items += len(pooled)
                elif spec.level == TOKEN:
                    lengths = batch["attention_mask"].sum(1).tolist()
                    arr = _to_numpy(stacked, spec.dtype)
                    writer.append_ragged(FEATURES, [arr[i, :n] for i, n in enumerate(lengths)])
                    items += len(lengths)
                else:
                    words = batch["word_mask"].shape[1]
                    pooled = _word_batch(stacked, batch["word_map"].to(device), words, spec.pooling)
                    arr = _to_numpy(pooled, spec.dtype)
                    owned = (batch["owned_mask"] & batch["word_mask"]).numpy()
                    done = []
                    for i in range(len(arr)):
                        sentence = merger.add(
                            int(batch["sentence_id"][i]),
                            int(batch["sentence_words"][i]),
                            arr[i][owned[i]],
                        )
                        if sentence is not None:
                            done.append(sentence)
                    if done:
                        writer.append_ragged(FEATURES, done)
                    items += len(done)
                writer.update()
    finally:
        encoder.to(origin)
        encoder.train(was_training)
    if merger.current is not None:
        raise RuntimeError(f"sentence {merger.current} was left incomplete by its windows")
    expected = len(datamodule.examples[split])
    if items != expected:
        raise RuntimeError(f"{split}: extracted {items} items for {expected} examples")
    feature_size = hidden * (2 if spec.pooling == "first_last" else 1)
    writer.meta.update(
        {
            "split": split,
            "items": items,
            "level": spec.level,
            "pooling": spec.pooling,
            "num_hidden_states": states,
            "feature_size": feature_size,
        }
    )


def get_features(
    encoder: Encoder,
    datamodule: TransferDataModule,
    split: str,
    spec: FeatureSpec,
    cache: FeatureCache | None = None,
) -> FeatureArrays:
    """``split``'s features: read from ``cache`` (computed and stored on a miss), or
    computed into memory when ``cache`` is None."""
    datamodule.load_examples()
    if split not in datamodule.examples:
        raise ConfigError(f"no '{split}' split to extract features from")
    datamodule.tokenized(split)
    label = f"features {split}"
    if cache is None:
        total = len(datamodule.split_dataloader(split))
        bar = _progress_bar(total, label)
        writer = MemoryWriter(progress=bar)
        try:
            extract_split(writer, encoder, datamodule, split, spec)
        finally:
            if bar is not None:
                bar.close()
        return writer.entry()
    parts = key_parts_for(encoder, datamodule, split, spec)
    name = "/".join(Path(str(getattr(encoder, "name_or_path", ""))).parts[-2:])
    random = " (random init)" if getattr(encoder, "random_init", False) else ""
    description = (
        f"{datamodule.task} {split} n={len(datamodule.examples[split])} "
        f"{spec.level}/{spec.pooling} {spec.dtype} p{spec.precision} | "
        f"{type(encoder).__name__} {name}{random}"
    )
    entry = cache.get_or_compute(
        parts,
        lambda writer: extract_split(writer, encoder, datamodule, split, spec),
        description=description,
        total=len(datamodule.split_dataloader(split)),
        progress_desc=label,
    )
    return entry


def select_layers(
    features: np.ndarray, layers: Sequence[int], combine: str = "concat"
) -> np.ndarray:
    """``[..., S, H]`` → ``[..., D]``: hidden states ``layers`` concatenated (in the given
    order), summed or averaged."""
    if not layers:
        raise ConfigError("select at least one layer")
    states = features.shape[-2]
    for i in layers:
        if not -states <= int(i) < states:
            raise ConfigError(f"layer {i} out of range for {states} hidden states")
    picked = np.asarray(features[..., [int(i) for i in layers], :], dtype=np.float32)
    if combine == "concat":
        return picked.reshape(*picked.shape[:-2], -1)
    if combine == "sum":
        return picked.sum(axis=-2)
    if combine == "mean":
        return picked.mean(axis=-2)
    raise ConfigError(f"layer_combine={combine!r}: choose concat, sum or mean")
