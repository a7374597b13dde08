"""Shared machinery of the task datamodules: split files, slicing, validation carve-out,
tokenization caching through ``datasets`` and the dataloaders."""

from __future__ import annotations

import hashlib
import json
import logging
import operator
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from pytorch_lightning import LightningDataModule
from torch.utils.data import DataLoader

from nlp_transfer.data.batch import Batch
from nlp_transfer.data.labels import LabelVocab
from nlp_transfer.data.readers import find_split_file
from nlp_transfer.data.sampler import (
    DEFAULT_MEGABATCH_MULT,
    LengthGroupedBatchSampler,
    lengths_of,
)
from nlp_transfer.errors import ConfigError, DataError, config_flag

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


def default_cache_dir() -> Path:
    """The user cache folder (``paths.cache_dir``'s default; see ``resolvers.cache_root``)."""
    from nlp_transfer.utils.resolvers import cache_root

    return Path(cache_root())


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "lower": bool(getattr(tokenizer, "do_lower_case", False)),
    }


def check_megabatch_mult(value: Any) -> int:
    """``data.megabatch_mult`` as an int >= 1 (``100`` and ``100.0`` pass; ``2.5``, ``0``,
    ``true`` fail)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < 1:
        raise ConfigError(
            "data.megabatch_mult must be a whole number >= 1 (batches per length-sorted "
            f"megabatch, default {DEFAULT_MEGABATCH_MULT}), got {value!r}"
        )
    return number


def check_count(value: Any, key: str) -> int | None:
    """A whole number >= 1, or None (``100`` and ``100.0`` pass; ``0``, ``2.5``, ``true`` fail)."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a whole number >= 1 or null (all), got {value!r}")
    return value


def check_fraction(value: Any) -> float | None:
    """``data.train_fraction`` in ``(0, 1]``, or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(f"data.train_fraction must be in (0, 1] or null (all), got {value!r}")
    return float(value)


def nested_subset(
    total: int, count: int | None, fraction: float | None, seed: int
) -> list[int] | None:
    """Indices (sorted) of a seeded subset of ``total`` examples, ``count`` of them or
    ``round(fraction * total)`` (at least 1); None when that is all of them.

    The subset is a prefix of one seeded permutation of ``range(total)``, so for one seed a
    smaller subset is always contained in a larger one.
    """
    if count is None and fraction is not None:
        count = max(1, round(fraction * total))
    if count is None or count >= total:
        return None
    order = torch.randperm(total, generator=torch.Generator().manual_seed(int(seed)))
    return sorted(order[:count].tolist())


def check_folds(folds: Any, fold: Any) -> tuple[int | None, int]:
    """``data.folds`` (null = no cross-validation, else >= 2) and ``data.fold`` in
    ``[0, folds)`` as ints."""

    def whole(value: Any) -> int | None:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        try:
            return None if isinstance(value, bool) else operator.index(value)
        except TypeError:
            return None

    if folds is None:
        if fold not in (None, 0):
            raise ConfigError(
                f"data.fold={fold!r} needs data.folds=<k> (k-fold cross-validation), "
                "e.g. data.folds=5 data.fold=0,1,2,3,4"
            )
        return None, 0
    k = whole(folds)
    if k is None or k < 2:
        raise ConfigError(f"data.folds must be a whole number >= 2 or null, got {folds!r}")
    i = whole(0 if fold is None else fold)
    if i is None or not 0 <= i < k:
        raise ConfigError(
            f"data.fold must be a whole number in 0..{k - 1} for data.folds={k}, got {fold!r}"
        )
    return k, i


def stable_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


class TransferDataModule(LightningDataModule):
    """Base class: subclasses implement :meth:`read_split`, :meth:`labels_of`,
    :meth:`to_columns` and :meth:`tokenize_batch`, and set ``task`` and ``suffixes``.

    Splits come from ``data_dir`` (``train.*``, optional ``validation.*``/``test.*``) or
    explicit ``<split>_file`` keys (an explicit key wins). Without a validation split a
    seeded ``val_fraction`` of train is carved out. ``length_grouping`` batches training
    examples of similar length together (shuffled megabatches, far less padding);
    ``megabatch_mult`` is the number of batches per length-sorted megabatch.

    Training subsets (learning curves): ``max_train_examples`` (a count) or ``train_fraction``
    (in ``(0, 1]``) keep a seeded random subset of train, in file order. The subset is the
    first ``n`` of one permutation drawn from ``subsample_seed`` (default ``split_seed``, a
    *data* seed: every training seed sees the same subset unless ``subsample_seed=${seed}``),
    so subsets are nested: the 500 examples include the 100. Validation (carved or read) is
    the same at every size. ``max_eval_examples`` keeps the first examples of val/test.
    """

    task: str = ""
    suffixes: tuple[str, ...] = ()

    def __init__(
        self,
        tokenizer: Any = None,
        data_dir: str | None = None,
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        labels: Sequence[str] | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        split_seed: int = 42,
        max_train_examples: int | None = None,
        max_eval_examples: int | None = None,
        train_fraction: float | None = None,
        subsample_seed: int | None = None,
        cache_dir: str | None = None,
        cache_tokenization: bool = True,
        length_grouping: bool = False,
        megabatch_mult: int = DEFAULT_MEGABATCH_MULT,
        folds: int | None = None,
        fold: int = 0,
    ) -> None:
        super().__init__()
        self.folds, self.fold = check_folds(folds, fold)
        self.tokenizer = tokenizer
        self.data_dir = Path(data_dir) if data_dir else None
        self.files = {"train": train_file, "validation": validation_file, "test": test_file}
        self.fixed_labels = list(labels) if labels else None
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.max_train_examples = check_count(max_train_examples, "data.max_train_examples")
        self.max_eval_examples = max_eval_examples
        self.train_fraction = check_fraction(train_fraction)
        if self.max_train_examples is not None and self.train_fraction is not None:
            raise ConfigError(
                f"data.max_train_examples={max_train_examples} and data.train_fraction="
                f"{train_fraction} are both set; set one of them (the other null)"
            )
        self.subsample_seed = int(split_seed if subsample_seed is None else subsample_seed)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir() / "tokenized"
        self.cache_tokenization = cache_tokenization
        self.length_grouping = config_flag(length_grouping, "data.length_grouping")
        self.megabatch_mult = check_megabatch_mult(megabatch_mult)
        self.vocab: LabelVocab | None = None
        self.examples: dict[str, list[Any]] = {}
        self.datasets: dict[str, Dataset] = {}
        self.sources: dict[str, str] = {}

    # -- to implement -------------------------------------------------------------------
    def read_split(self, path: Path) -> list[Any]:
        raise NotImplementedError

    def labels_of(self, example: Any) -> list[str]:
        """Every label string the example uses (one for classification, tags for NER)."""
        raise NotImplementedError

    def to_columns(self, examples: list[Any]) -> dict[str, list[Any]]:
        raise NotImplementedError

    def tokenize_batch(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        raise NotImplementedError

    def collate(self, features: list[dict[str, Any]]) -> Batch:
        raise NotImplementedError

    # -- split resolution -----------------------------------------------------------------
    def split_path(self, split: str) -> Path | None:
        explicit = self.files.get(split)
        if explicit:
            path = Path(explicit)
            if not path.is_file():
                raise DataError(f"{path}: file not found (data.{split}_file)")
            return path
        if self.data_dir is None:
            if split == "train":
                raise ConfigError(
                    "no training data: set data.data_dir=<dir with train.*> or data.train_file"
                )
            return None
        if not self.data_dir.is_dir():
            raise DataError(f"{self.data_dir}: data directory not found (data.data_dir)")
        path = find_split_file(self.data_dir, split, self.suffixes)
        # labels given (a checkpoint's): evaluating a folder with only a test file is fine
        if path is None and split == "train" and self.fixed_labels is None:
            raise DataError(
                f"{self.data_dir}: no train file; expected one of "
                f"{[f'train{s}' for s in self.suffixes]}"
            )
        return path

    def load_examples(self) -> None:
        """Read every split (once), slice, carve validation, build and check labels."""
        if self.vocab is not None:
            return
        for split in SPLITS:
            if split in self.examples:  # already read (e.g. from a hub dataset)
                continue
            path = self.split_path(split)
            if path is not None:
                self.examples[split] = self.read_split(path)
                self.sources[split] = str(path)
        if not self.examples:
            raise DataError(
                f"{self.data_dir}: no data files; expected {SPLITS[0]}/{SPLITS[1]}/{SPLITS[2]} "
                f"with one of {list(self.suffixes)}"
            )
        if self.folds and "train" in self.examples:
            self._fold_split()
        elif "validation" not in self.examples and "train" in self.examples:
            self._carve_validation()
        self._slice()
        if self.fixed_labels is not None:
            self.vocab = LabelVocab(self.fixed_labels)
        else:
            self.vocab = LabelVocab.from_labels(
                lab for ex in self.examples["train"] for lab in self.labels_of(ex)
            )
            if len(self.vocab) < 2:
                raise DataError(
                    f"{self.sources['train']}: the training data has {len(self.vocab)} "
                    f"label(s) {self.vocab.labels}; a model needs at least two to learn "
                    "anything. Check data.label_field / data.tag_column, or add examples."
                )
        for split in ("validation", "test"):
            for ex in self.examples.get(split, []):
                for lab in self.labels_of(ex):
                    if lab not in self.vocab:
                        self.vocab.encode(lab, source=self._label_source(ex, lab))
        counts = {k: len(v) for k, v in self.examples.items()}
        log.info("data %s: %s examples, %d labels", self.task, counts, len(self.vocab))

    def _example_source(self, example: Any) -> str:
        return str(getattr(example, "source", ""))

    def _label_source(self, example: Any, label: str) -> str:
        """Where ``label`` occurs in ``example`` (file:line), for error messages."""
        return self._example_source(example)

    def _carve_validation(self) -> None:
        train = self.examples["train"]
        if len(train) < 2:
            raise DataError(
                f"{self.sources['train']}: {len(train)} example(s) cannot be split into "
                "train and validation; add a validation file"
            )
        gen = torch.Generator().manual_seed(self.split_seed)
        order = torch.randperm(len(train), generator=gen).tolist()
        n_val = max(1, round(len(train) * self.val_fraction))
        self.examples["validation"] = [train[i] for i in sorted(order[:n_val])]
        self.examples["train"] = [train[i] for i in sorted(order[n_val:])]
        self.sources["validation"] = f"{self.sources['train']} (seeded {self.val_fraction:.0%})"
        log.info("no validation split: carved %d examples out of train", n_val)

    def _fold_split(self) -> None:
        """k-fold cross-validation: validation is fold ``fold`` of a seeded split of train
        (``split_seed``), stratified by label for classification and by sentence (plain
        shuffled folds) for sequence labeling; a validation file is set aside."""
        from sklearn.model_selection import KFold, StratifiedKFold

        train = self.examples["train"]
        if len(train) < self.folds:
            raise DataError(
                f"{self.sources['train']}: {len(train)} example(s) cannot be split into "
                f"data.folds={self.folds} folds"
            )
        if "validation" in self.examples:
            log.warning(
                "data.folds=%d: validation is fold %d of train; %s is not used",
                self.folds,
                self.fold,
                self.sources.get("validation", "the validation split"),
            )
        strata = (
            ["|".join(self.labels_of(ex)) for ex in train]
            if self.task == "classification"
            else None
        )
        splitter = (StratifiedKFold if strata else KFold)(
            n_splits=self.folds, shuffle=True, random_state=self.split_seed
        )
        keep, held_out = list(splitter.split(train, strata))[self.fold]
        self.examples["validation"] = [train[i] for i in sorted(held_out)]
        self.examples["train"] = [train[i] for i in sorted(keep)]
        how = "stratified by label" if strata else "by sentence"
        self.sources["validation"] = (
            f"{self.sources['train']} (fold {self.fold} of {self.folds}, {how}, "
            f"seed {self.split_seed})"
        )
        log.info(
            "data.folds=%d data.fold=%d: %d train / %d validation examples (%s)",
            self.folds,
            self.fold,
            len(keep),
            len(held_out),
            how,
        )

    def _slice(self) -> None:
        """Seeded nested train subset; eval prefixes. The same in every run and process."""
        train = self.examples.get("train")
        keep = None
        if train is not None:
            keep = nested_subset(
                len(train), self.max_train_examples, self.train_fraction, self.subsample_seed
            )
        if train is not None and keep is not None:
            self.examples["train"] = [train[i] for i in keep]
            log.info(
                "training on a seeded subset: %d of %d examples (subsample_seed=%d)",
                len(keep),
                len(train),
                self.subsample_seed,
            )
        if self.max_eval_examples:
            for split in ("validation", "test"):
                if split in self.examples:
                    self.examples[split] = self.examples[split][: self.max_eval_examples]

    @property
    def labels(self) -> list[str]:
        self.load_examples()
        assert self.vocab is not None
        return self.vocab.labels

    # -- tokenization -----------------------------------------------------------------------
    def cache_key(self, split: str) -> str:
        return stable_hash(
            {
                "task": self.task,
                "columns": self.to_columns(self.examples[split]),
                "labels": self.vocab.labels if self.vocab else None,
                "tokenizer": tokenizer_identity(self.tokenizer),
                "max_length": self.max_length,
                "options": self.tokenization_options(),
            }
        )

    def tokenization_options(self) -> dict[str, Any]:
        return {}

    def tokenized(self, split: str) -> Dataset:
        if split in self.datasets:
            return self.datasets[split]
        self.load_examples()
        if split not in self.examples:
            raise DataError(
                f"no '{split}' split: add {split}.* to data.data_dir or data.{split}_file"
            )
        ds = Dataset.from_dict(self.to_columns(self.examples[split]))
        kw: dict[str, Any] = {"batched": True, "remove_columns": ds.column_names}
        if self.cache_tokenization:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            kw["cache_file_name"] = str(
                self.cache_dir / f"{self.task}-{self.cache_key(split)}.arrow"
            )
            kw["load_from_cache_file"] = True
            kw["new_fingerprint"] = self.cache_key(split)  # our key; skips datasets' hashing
        ds = ds.map(self.tokenize_batch, desc=f"tokenizing {split}", **kw)
        self.datasets[split] = ds
        return ds

    def setup(self, stage: str | None = None) -> None:
        self.load_examples()
        wanted = {"fit": ["train", "validation"], "validate": ["validation"], "test": ["test"]}
        for split in wanted.get(stage or "", list(SPLITS)):
            if split in self.examples:
                self.tokenized(split)

    # -- loaders ----------------------------------------------------------------------------
    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(
            self.tokenized(split),
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.length_grouping:
            return self._grouped_loader("train", self.batch_size)
        return self._loader("train", True, self.batch_size)

    def _grouped_loader(self, split: str, batch_size: int) -> DataLoader:
        dataset = self.tokenized(split)
        return grouped_loader(
            dataset,
            lengths_of(dataset),
            batch_size,
            self.collate,
            self.num_workers,
            shuffle=not overfitting(self),
            megabatch_mult=self.megabatch_mult,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def split_dataloader(self, split: str) -> DataLoader:
        return self._loader(split, False, self.eval_batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"labels": self.labels, "task": self.task}


def overfitting(datamodule: LightningDataModule) -> bool:
    """Whether the attached trainer overfits a few batches (``trainer.overfit_batches``)."""
    trainer = getattr(datamodule, "trainer", None)
    return bool(trainer is not None and trainer.overfit_batches)


def grouped_loader(
    dataset: Any,
    lengths: Sequence[int],
    batch_size: int,
    collate: Collate,
    num_workers: int = 0,
    shuffle: bool = True,
    megabatch_mult: int = DEFAULT_MEGABATCH_MULT,
) -> DataLoader:
    """Batches of similar-length examples in a seeded random order (less padding); DDP-aware
    and resumable mid-epoch (see :mod:`nlp_transfer.data.sampler`). The seed defaults to the
    run's (``PL_GLOBAL_SEED``); :class:`~nlp_transfer.training.loop_state.ResumeState` sets
    it to the seed it keeps in checkpoints. ``shuffle=False`` gives the same batches every
    epoch: used under ``trainer.overfit_batches``, where Lightning turns plain shuffling off
    but cannot reach into a batch sampler. ``megabatch_mult``: batches per length-sorted
    megabatch (see :class:`~nlp_transfer.data.sampler.LengthGroupedBatchSampler`)."""
    return DataLoader(
        dataset,
        batch_sampler=LengthGroupedBatchSampler(
            lengths=lengths,
            batch_size=batch_size,
            shuffle=shuffle,
            megabatch_mult=megabatch_mult,
        ),
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


Collate = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
