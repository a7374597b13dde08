"""Sequence labeling (NER) datamodule: CoNLL files or HF token datasets, aligned to subwords.

Tags are read in the file's scheme (``tag_scheme``), checked (``invalid_tags``: convert,
reject or warn), and converted to the scheme the model trains in (``train_scheme``: IOB2
or BIOES). Entities, and therefore scores, are the same in every scheme.

Each sentence becomes one or more encoder windows (see :mod:`nlp_transfer.data.alignment`);
labels stay at word level, so metrics are never computed on subtokens.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from nlp_transfer.data.alignment import align_sentences, collate_aligned, subtoken_label_map_iob2
from nlp_transfer.data.base import TransferDataModule
from nlp_transfer.data.batch import WordBatch
from nlp_transfer.data.conll import Sentence, read_conll, read_hf_token_dataset
from nlp_transfer.errors import ConfigError, DataError
from nlp_transfer.tagging import POLICIES, convert_tags, normalize_scheme, validate_tags

WORD_RE = re.compile(r"\w+(?:[-'’.]\w+)*|[^\w\s]", re.UNICODE)


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Split raw text into words and punctuation, with character offsets."""
    words, spans = [], []
    for m in WORD_RE.finditer(text):
        words.append(m.group())
        spans.append((m.start(), m.end()))
    return words, spans


def _scheme(name: str, key: str) -> str:
    try:
        return normalize_scheme(name)
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None


class SequenceLabelingDataModule(TransferDataModule):
    """CoNLL-style files (``train.conll`` [``validation.conll``] [``test.conll``]) or a HF
    token-classification dataset (``hf_dataset``).

    Args beyond :class:`TransferDataModule`:
        token_column / tag_column / separator / comment_prefix / docstart / encoding: file
            format (see :func:`~nlp_transfer.data.conll.read_conll`; columns count from 0).
        tag_scheme: scheme of the files (IOB1, IOB2/BIO, BIOES).
        train_scheme: scheme the model predicts (IOB2 or BIOES).
        invalid_tags: ``convert`` (repair ``I-X`` after ``O`` into ``B-X``), ``reject``, ``warn``.
        label_all_subtokens: also give every subtoken a label (for subtoken-level losses);
            evaluation is at word level regardless.
        stride: subword tokens of left context repeated between windows of a long sentence.
    """

    task = "sequence_labeling"
    suffixes = (".conll", ".txt", ".bio", ".tsv")

    def __init__(
        self,
        *args: Any,
        token_column: int = 0,
        tag_column: int = -1,
        separator: str | None = None,
        comment_prefix: str | None = "#",
        docstart: str | None = "-DOCSTART-",
        tag_scheme: str = "IOB2",
        train_scheme: str = "IOB2",
        invalid_tags: str = "convert",
        label_all_subtokens: bool = False,
        stride: int | None = None,
        hf_dataset: str | None = None,
        hf_config: str | None = None,
        hf_data_files: dict[str, str] | None = None,
        hf_splits: dict[str, str] | None = None,
        tokens_field: str = "tokens",
        tags_field: str = "ner_tags",
        encoding: str = "utf-8-sig",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.encoding = encoding
        self.token_column, self.tag_column = token_column, tag_column
        self.separator, self.comment_prefix, self.docstart = separator, comment_prefix, docstart
        self.tag_scheme = _scheme(tag_scheme, "data.tag_scheme")
        self.train_scheme = _scheme(train_scheme, "data.train_scheme")
        if self.train_scheme == "IOB1":
            raise ConfigError("data.train_scheme must be IOB2 or BIOES (IOB1 is for reading files)")
        if invalid_tags not in POLICIES:
            raise ConfigError(f"data.invalid_tags={invalid_tags!r}: choose one of {list(POLICIES)}")
        self.invalid_tags = invalid_tags
        self.label_all_subtokens = label_all_subtokens
        self.stride = stride
        self.hf_dataset, self.hf_config = hf_dataset, hf_config
        self.hf_data_files = dict(hf_data_files) if hf_data_files else None
        self.hf_splits = dict(
            hf_splits or {"train": "train", "validation": "validation", "test": "test"}
        )
        self.tokens_field, self.tags_field = tokens_field, tags_field

    # -- reading ---------------------------------------------------------------------------
    def read_split(self, path: Path) -> list[Sentence]:
        sentences = read_conll(
            path,
            token_column=self.token_column,
            tag_column=self.tag_column,
            separator=self.separator,
            comment_prefix=self.comment_prefix,
            docstart=self.docstart,
            encoding=self.encoding,
        )
        return [self._normalise(s) for s in sentences]

    def _normalise(self, sentence: Sentence) -> Sentence:
        if sentence.tags is None:
            raise DataError(f"{sentence.source}:{sentence.line}: sentence has no tags")
        tags = validate_tags(
            sentence.tags,
            self.tag_scheme,
            policy=self.invalid_tags,
            source=sentence.source,
            line_numbers=sentence.line_numbers,
        )
        if self.tag_scheme != self.train_scheme:
            tags = convert_tags(tags, self.tag_scheme, self.train_scheme)
        sentence.tags = tags
        return sentence

    def load_examples(self) -> None:
        if self.hf_dataset and self.vocab is None and not self.examples:
            kw: dict[str, Any] = {}
            if self.hf_config:
                kw["name"] = self.hf_config
            if self.hf_data_files:
                kw["data_files"] = {
                    self.hf_splits.get(k, k): v for k, v in self.hf_data_files.items()
                }
            for split, hf_split in self.hf_splits.items():
                try:
                    sents = read_hf_token_dataset(
                        self.hf_dataset, hf_split, self.tokens_field, self.tags_field, **kw
                    )
                except (KeyError, ValueError) as e:
                    if split == "train":
                        raise DataError(
                            f"{self.hf_dataset}: cannot read split '{hf_split}' ({e})"
                        ) from e
                    continue
                if not sents:
                    raise DataError(f"{self.hf_dataset}[{hf_split}]: the split is empty")
                self.examples[split] = [self._normalise(s) for s in sents]
                self.sources[split] = f"{self.hf_dataset}[{hf_split}]"
        super().load_examples()

    def split_path(self, split: str) -> Path | None:
        return None if self.hf_dataset else super().split_path(split)

    def labels_of(self, example: Sentence) -> list[str]:
        return list(example.tags or [])

    def _example_source(self, example: Sentence) -> str:
        return f"{example.source}:{example.line}"

    def _label_source(self, example: Sentence, label: str) -> str:
        lines, tags = example.line_numbers, example.tags or []
        if lines is None or label not in tags:
            return self._example_source(example)
        return f"{example.source}:{lines[tags.index(label)]}"

    # -- tokenization ------------------------------------------------------------------------
    def to_columns(self, examples: list[Sentence]) -> dict[str, list[Any]]:
        assert self.vocab is not None
        tags = []
        for s in examples:
            tags.append([self.vocab.encode(t, f"{s.source}:{s.line}") for t in s.tags or []])
        return {
            "tokens": [s.tokens for s in examples],
            "tags": tags,
            "sentence_id": list(range(len(examples))),
        }

    def tokenization_options(self) -> dict[str, Any]:
        return {"label_all_subtokens": self.label_all_subtokens, "stride": self.stride, "v": 2}

    def tokenize_batch(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        assert self.vocab is not None
        windows = align_sentences(
            self.tokenizer,
            batch["tokens"],
            batch["tags"],
            max_length=self.max_length,
            stride=self.stride,
            label_all_subtokens=self.label_all_subtokens,
            subtoken_label_map=subtoken_label_map_iob2(self.vocab.labels)
            if self.label_all_subtokens
            else None,
            sentence_ids=batch["sentence_id"],
        )
        fields = [
            "input_ids",
            "attention_mask",
            "word_map",
            "labels",
            "sentence_id",
            "word_offset",
            "owned_start",
            "owned_end",
        ]
        if windows and windows[0].token_type_ids is not None:
            fields.append("token_type_ids")
        if self.label_all_subtokens:
            fields.append("subtoken_labels")
        out = {f: [getattr(w, f) for w in windows] for f in fields}
        length = dict(zip(batch["sentence_id"], (len(t) for t in batch["tokens"])))
        out["sentence_words"] = [length[w.sentence_id] for w in windows]
        return out

    def collate(self, features: list[dict[str, Any]]) -> WordBatch:
        batch = collate_aligned(features, pad_token_id=self.tokenizer.pad_token_id or 0)
        if "sentence_words" in features[0]:  # words of the whole sentence, not the window
            batch["sentence_words"] = torch.tensor([f["sentence_words"] for f in features])
        return batch

    def encode_words(self, sentences: list[list[str]]) -> list[dict[str, Any]]:
        """Windows for unlabelled pre-split sentences (prediction)."""
        windows = align_sentences(
            self.tokenizer, sentences, None, max_length=self.max_length, stride=self.stride
        )
        return [w.__dict__ for w in windows]
