"""Train heads on cached frozen-encoder features: a datamodule wrapping a task datamodule.

:class:`CachedFeatureDataModule` has the wrapped datamodule's labels, task, examples and
splits, and its loaders yield what :meth:`TransferModule.encode` reads instead of running
the encoder: ``hidden_states`` ``[B, T', S, H]`` and ``feature_mask`` ``[B, T']`` (``T' = 1``
for pooled sentence vectors, tokens or words otherwise) plus ``labels`` (and ``example_id``
for classification); for sequence labeling also ``word_mask``, ``owned_mask``,
``word_offset``, ``sentence_id`` and ``sentence_words`` (every item is a whole sentence). Features are memory-mapped from the
cache entries (see :mod:`nlp_transfer.features.extract`).

Same results as the uncached run: the training loader is built like the wrapped one
(same batch size, ``shuffle=True`` drawing from the global RNG), extraction forks the RNG,
and a sentence head applies dropout after pooling, so pooling a length-1 "sequence" of
pooled vectors is the identity and every random draw happens in the same order. Metrics agree
to float rounding (about 1e-7): the cached features were computed in other batches, hence
with other padding, which may change the last bits of the encoder's float sums. Not
identical by design: sentences split into windows (merged into one item here) and
``concat_last_k`` with ``first_last`` subword pooling (the feature order differs).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from nlp_transfer.data.alignment import IGNORE_INDEX
from nlp_transfer.data.base import TransferDataModule, grouped_loader, overfitting
from nlp_transfer.data.batch import FeatureBatch
from nlp_transfer.data.sampler import DEFAULT_MEGABATCH_MULT, lengths_of
from nlp_transfer.encoders.base import Encoder
from nlp_transfer.errors import ConfigError
from nlp_transfer.features.cache import FeatureCache
from nlp_transfer.features.extract import (
    FEATURES,
    SENTENCE,
    WORD,
    FeatureArrays,
    FeatureSpec,
    cache_from_config,
    feature_spec,
    get_features,
    layer_pooling_mode,
    split_labels,
)

log = logging.getLogger(__name__)

_STAGE_SPLITS = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",)}


class _FeatureDataset(Dataset):
    """Item ``i``: ``(i, features, label)`` with features ``[S, H]`` or ragged ``[n_i, S, H]``."""

    def __init__(self, arrays: FeatureArrays, labels: list[Any], ragged: bool) -> None:
        self.arrays = arrays
        self.labels = labels
        self.ragged = ragged
        n = arrays.num_items(FEATURES) if ragged else len(arrays[FEATURES])
        if n != len(labels):
            raise RuntimeError(f"cached features hold {n} items for {len(labels)} examples")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray, Any]:
        if self.ragged:
            feats = self.arrays.ragged(FEATURES, index)
        else:
            feats = self.arrays[FEATURES][index]
        return index, np.array(feats, dtype=np.float32), self.labels[index]  # a copy


def _pad(items: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged ``[n_i, S, H]`` → zero-padded ``[B, max n, S, H]`` and lengths ``[B]``."""
    lengths = torch.tensor([len(x) for x in items], dtype=torch.long)
    width = int(lengths.max()) if len(items) else 0
    out = torch.zeros(len(items), width, *items[0].shape[1:], dtype=torch.float32)
    for i, x in enumerate(items):
        if len(x):
            out[i, : len(x)] = torch.from_numpy(x)
    return out, lengths


def collate_sentences(items: list[tuple[int, np.ndarray, int]]) -> FeatureBatch:
    """Pooled sentence vectors as a length-1 sequence each."""
    feats = torch.from_numpy(np.stack([x for _, x, _ in items]))
    return {
        "hidden_states": feats.unsqueeze(1),
        "feature_mask": torch.ones(len(items), 1, dtype=torch.long),
        "labels": torch.tensor([y for _, _, y in items], dtype=torch.long),
        "example_id": torch.tensor([i for i, _, _ in items], dtype=torch.long),
    }


def collate_tokens(items: list[tuple[int, np.ndarray, int]]) -> FeatureBatch:
    """Token vectors padded like the tokenized batch (mask as ``attention_mask``)."""
    feats, lengths = _pad([x for _, x, _ in items])
    mask = (torch.arange(feats.shape[1])[None, :] < lengths[:, None]).long()
    return {
        "hidden_states": feats,
        "feature_mask": mask,
        "labels": torch.tensor([y for _, _, y in items], dtype=torch.long),
        "example_id": torch.tensor([i for i, _, _ in items], dtype=torch.long),
    }


def collate_words(items: list[tuple[int, np.ndarray, list[int]]]) -> FeatureBatch:
    """Whole sentences of word vectors with the keys the module's NER metric reads."""
    feats, lengths = _pad([x for _, x, _ in items])
    word_mask = torch.arange(feats.shape[1])[None, :] < lengths[:, None]
    labels = torch.full(word_mask.shape, IGNORE_INDEX, dtype=torch.long)
    for i, (_, _, tags) in enumerate(items):
        if tags:
            labels[i, : len(tags)] = torch.as_tensor(tags, dtype=torch.long)
    return {
        "hidden_states": feats,
        "feature_mask": word_mask,
        "labels": labels,
        "word_mask": word_mask,
        "owned_mask": word_mask.clone(),
        "word_offset": torch.zeros(len(items), dtype=torch.long),
        "sentence_id": torch.tensor([i for i, _, _ in items], dtype=torch.long),
        "sentence_words": lengths,
    }


class CachedFeatureDataModule(LightningDataModule):
    """A task datamodule whose loaders yield frozen-encoder features instead of token ids.

    Args:
        datamodule: the task datamodule (its splits, labels, batch sizes and workers).
        encoder: the frozen encoder the features come from (run once per split).
        spec: what to extract (see :func:`~nlp_transfer.features.extract.feature_spec`).
        cache: the shared on-disk cache; ``None`` keeps the features in memory for this run.
    """

    def __init__(
        self,
        datamodule: TransferDataModule,
        encoder: Encoder,
        spec: FeatureSpec,
        cache: FeatureCache | None = None,
    ) -> None:
        super().__init__()
        self.wrapped = datamodule
        self.encoder = encoder
        self.spec = spec
        self.cache = cache
        self.features: dict[str, FeatureArrays] = {}
        self._datasets: dict[str, _FeatureDataset] = {}

    def __getattr__(self, name: str) -> Any:
        # everything else (vocab, tokenizer, encode_texts...) is the wrapped datamodule's
        wrapped = self.__dict__.get("wrapped")
        if wrapped is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(wrapped, name)

    # -- what the rest of the code reads ---------------------------------------------------
    @property
    def task(self) -> str:
        return self.wrapped.task

    @property
    def labels(self) -> list[str]:
        return self.wrapped.labels

    @property
    def examples(self) -> dict[str, list[Any]]:
        return self.wrapped.examples

    def state_dict(self) -> dict[str, Any]:
        return self.wrapped.state_dict()

    # -- setup -------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.wrapped.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """Load (or compute once) the features of the splits ``stage`` needs."""
        self.wrapped.setup(stage)
        for split in _STAGE_SPLITS.get(stage or "", ("train", "validation", "test")):
            if split in self.wrapped.examples:
                self.dataset(split)

    def dataset(self, split: str) -> _FeatureDataset:
        """The feature dataset of ``split`` (features extracted or read on first use)."""
        if split not in self._datasets:
            arrays = get_features(self.encoder, self.wrapped, split, self.spec, self.cache)
            self.features[split] = arrays
            self._datasets[split] = _FeatureDataset(
                arrays, split_labels(self.wrapped, split), ragged=self.spec.level != SENTENCE
            )
        return self._datasets[split]

    # -- loaders -----------------------------------------------------------------------------
    def _collate(self) -> Any:
        if self.spec.level == SENTENCE:
            return collate_sentences
        return collate_words if self.spec.level == WORD else collate_tokens

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        workers = self.wrapped.num_workers
        return DataLoader(
            self.dataset(split),
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=self._collate(),
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if getattr(self.wrapped, "length_grouping", False):
            # the batches of the uncached run (grouped by token length), so that a cached
            # run reproduces it exactly
            dataset = self.dataset("train")
            lengths = lengths_of(self.wrapped.tokenized("train"))
            if len(lengths) != len(dataset):
                raise RuntimeError(
                    f"feature rows ({len(dataset)}) do not match tokenized rows "
                    f"({len(lengths)}); run with data.length_grouping=false"
                )
            return grouped_loader(
                dataset,
                lengths,
                self.wrapped.batch_size,
                self._collate(),
                self.wrapped.num_workers,
                shuffle=not overfitting(self),
                megabatch_mult=getattr(self.wrapped, "megabatch_mult", DEFAULT_MEGABATCH_MULT),
            )
        return self._loader("train", True, self.wrapped.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", False, self.wrapped.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.wrapped.eval_batch_size)

    def split_dataloader(self, split: str) -> DataLoader:
        return self._loader(split, False, self.wrapped.eval_batch_size)


def wrap_with_feature_cache(
    cfg: DictConfig, encoder: Encoder, datamodule: TransferDataModule
) -> CachedFeatureDataModule:
    """``datamodule`` reading cached features; only for a frozen encoder (ConfigError else)."""
    strategy = instantiate(cfg.strategy)
    if strategy.encoder_training != "never":
        raise ConfigError(
            f"features.cache=true needs an encoder that never trains (strategy=frozen), not "
            f"strategy={strategy.name}, whose encoder trains {strategy.encoder_training}: it "
            "would no longer see the data it trains on. Drop features.cache=true or use "
            "strategy=frozen."
        )
    spec = feature_spec(cfg, datamodule.task)
    sub = (cfg.get("subword_pooling") or {}).get("mode")
    if spec.level == WORD and sub == "first_last" and layer_pooling_mode(cfg) == "concat_last_k":
        log.warning(
            "cached features with subword_pooling=first_last and concat_last_k order their "
            "channels per layer ([first, last] per layer), not [first of all, last of all]: "
            "the model is equivalent but its results differ from the uncached run"
        )
    cache = cache_from_config(cfg)
    log.info(
        "training on cached %s features (%s) from %s",
        spec.level,
        spec.pooling,
        cache.root if cache is not None else "memory",
    )
    return CachedFeatureDataModule(datamodule, encoder, spec, cache)
