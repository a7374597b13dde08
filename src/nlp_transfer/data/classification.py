"""Text classification datamodule: single sentences or sentence pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from nlp_transfer.data.base import TransferDataModule
from nlp_transfer.data.batch import TokenBatch
from nlp_transfer.data.padding import pad_to
from nlp_transfer.data.readers import (
    DEFAULT_ENCODING,
    FORMATS,
    Example,
    read_classification_file,
)
from nlp_transfer.errors import DataError


class ClassificationDataModule(TransferDataModule):
    """Reads JSONL/CSV/TSV files or a Hugging Face dataset by name.

    Args beyond :class:`TransferDataModule`:
        text_field / text_pair_field / label_field: column names.
        hf_dataset: a hub dataset name, or a builder such as ``"json"``/``"csv"`` together
            with ``hf_data_files`` (a dict split → file) for local files.
        hf_config: the hub dataset's configuration name.
        hf_splits: our split name → the dataset's split name.
        encoding: text encoding of local files (default ``utf-8-sig``: UTF-8 with or
            without a byte-order mark).
    """

    task = "classification"

    @property
    def suffixes(self) -> tuple[str, ...]:  # type: ignore[override]
        """Every registered file format (:func:`~nlp_transfer.data.readers.register_format`)."""
        return tuple(FORMATS)

    def __init__(
        self,
        *args: Any,
        text_field: str = "text",
        text_pair_field: str | None = None,
        label_field: str = "label",
        hf_dataset: str | None = None,
        hf_config: str | None = None,
        hf_data_files: dict[str, str] | None = None,
        hf_splits: dict[str, str] | None = None,
        encoding: str = DEFAULT_ENCODING,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.encoding = encoding
        self.text_field = text_field
        self.text_pair_field = text_pair_field
        self.label_field = label_field
        self.hf_dataset = hf_dataset
        self.hf_config = hf_config
        self.hf_data_files = dict(hf_data_files) if hf_data_files else None
        self.hf_splits = dict(
            hf_splits or {"train": "train", "validation": "validation", "test": "test"}
        )

    def read_split(self, path: Path) -> list[Example]:
        return read_classification_file(
            path, self.text_field, self.label_field, self.text_pair_field, self.encoding
        )

    def load_examples(self) -> None:
        if self.hf_dataset and self.vocab is None and not self.examples:
            self._load_hf()
        super().load_examples()

    def split_path(self, split: str) -> Path | None:
        if self.hf_dataset:
            return None  # already loaded by _load_hf
        return super().split_path(split)

    def _load_hf(self) -> None:
        from datasets import load_dataset

        kw: dict[str, Any] = {}
        if self.hf_data_files:
            kw["data_files"] = {self.hf_splits.get(k, k): v for k, v in self.hf_data_files.items()}
        dsd = load_dataset(self.hf_dataset, self.hf_config, **kw)
        for split, hf_split in self.hf_splits.items():
            if hf_split not in dsd:
                if split == "train":
                    raise DataError(f"{self.hf_dataset}: no split '{hf_split}'; has {list(dsd)}")
                continue
            ds = dsd[hf_split]
            names = None
            feat = ds.features.get(self.label_field)
            if feat is not None and hasattr(feat, "names"):
                names = feat.names
            src = f"{self.hf_dataset}[{hf_split}]"
            for col in [c for c in (self.text_field, self.label_field, self.text_pair_field) if c]:
                if col not in ds.column_names:
                    raise DataError(f"{src}: no column '{col}'; columns: {ds.column_names}")
            exs = []
            for i, row in enumerate(ds):
                where = f"{src} row {i}"
                label = row[self.label_field]
                if names is None and (isinstance(label, bool) or not isinstance(label, str | int)):
                    raise DataError(
                        f"{where}: label {label!r:.60} ({type(label).__name__}) is not a string "
                        f"or an integer; refusing to turn it into a class name"
                    )
                for field in (self.text_field, self.text_pair_field):
                    if field and not isinstance(row[field], str):
                        raise DataError(
                            f"{where}: field '{field}' is {type(row[field]).__name__}, not a string"
                        )
                exs.append(
                    Example(
                        text=row[self.text_field],
                        label=names[label] if names is not None else str(label),
                        text_pair=row[self.text_pair_field] if self.text_pair_field else None,
                        source=where,
                    )
                )
            if not exs:
                raise DataError(f"{src}: the split is empty")
            self.examples[split] = exs
            self.sources[split] = src

    def labels_of(self, example: Example) -> list[str]:
        return [example.label] if example.label is not None else []

    def to_columns(self, examples: list[Example]) -> dict[str, list[Any]]:
        assert self.vocab is not None
        cols: dict[str, list[Any]] = {
            "text": [e.text for e in examples],
            "label": [
                self.vocab.encode(e.label, e.source) if e.label is not None else -1
                for e in examples
            ],
        }
        if self.text_pair_field:
            cols["text_pair"] = [e.text_pair for e in examples]
        return cols

    def tokenize_batch(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        enc = self.tokenizer(
            batch["text"],
            batch.get("text_pair"),
            truncation=True,
            max_length=self.max_length,
        )
        out = {"input_ids": enc["input_ids"], "labels": batch["label"]}
        if "token_type_ids" in enc:
            out["token_type_ids"] = enc["token_type_ids"]
        return out

    def tokenized(self, split: str) -> Dataset:
        """The tokenized split with ``example_id``, the example's position in the split (the
        index of its per-example predictions); added after the tokenization cache, so cached
        files and their keys stay as they were."""
        ds = super().tokenized(split)
        if "example_id" not in ds.column_names:
            ds = ds.add_column("example_id", list(range(len(ds))))
            self.datasets[split] = ds
        return ds

    def collate(self, features: list[dict[str, Any]]) -> TokenBatch:
        """Dynamic padding: pad to the longest sequence of the batch."""
        pad_id = self.tokenizer.pad_token_id or 0
        ids = pad_to([f["input_ids"] for f in features], pad_id)
        batch: TokenBatch = {
            "input_ids": ids,
            "attention_mask": pad_to([[1] * len(f["input_ids"]) for f in features], 0),
            "labels": torch.tensor([f["labels"] for f in features], dtype=torch.long),
        }
        if "token_type_ids" in features[0]:
            batch["token_type_ids"] = pad_to([f["token_type_ids"] for f in features], 0)
        if "example_id" in features[0]:
            batch["example_id"] = torch.tensor(
                [f["example_id"] for f in features], dtype=torch.long
            )
        return batch

    def encode_texts(
        self, texts: list[str], pairs: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Tokenize raw texts for prediction (no labels)."""
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length)
        feats = []
        for i in range(len(texts)):
            f = {"input_ids": enc["input_ids"][i], "labels": -1}
            if "token_type_ids" in enc:
                f["token_type_ids"] = enc["token_type_ids"][i]
            feats.append(f)
        return feats
