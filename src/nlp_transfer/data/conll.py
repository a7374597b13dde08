"""Readers for token-level (NER-style) data: CoNLL column files and HF token datasets.

Public API::

    Sentence(tokens, tags, source, line, line_numbers)      # dataclass
    read_conll(path, *, token_column=0, tag_column=-1, separator=None, comment_prefix="#",
               docstart="-DOCSTART-", num_columns=None, encoding="utf-8-sig",
               encoding_option="data.encoding") -> list[Sentence]
    write_conll(path, sentences, separator=" ") -> None
    read_hf_token_dataset(name_or_path, split, tokens_field="tokens", tags_field="ner_tags",
                          *, label_names=None, **load_kwargs) -> list[Sentence]

CoNLL format: one token per line, columns split by ``separator`` (``None`` = any run of
whitespace, or e.g. ``"\\t"``); blank lines separate sentences; ``-DOCSTART-`` lines (first
column) are skipped and also end a sentence. Every token line must have the same number of
columns as the first token line (or ``num_columns``). A comment is a line that starts with
``comment_prefix``, comes *between* sentences (as in CoNLL-U) and cannot be a token line
because its number of columns differs from the token lines' (``# sent_id = 3`` in a
two-column file). Any other line is data: a sentence-initial ``#hashtag O`` stays a token.
Skipped comment lines are counted and logged as a warning with the first ``file:line``;
``comment_prefix=None`` disables comments. Columns are numbered from 0 (negative numbers count
from the end); line numbers are 1-based. Errors are
:class:`~nlp_transfer.errors.DataError` naming ``file:line``.

Tags are returned as they are in the file; check/repair them with
:func:`nlp_transfer.tagging.validate_tags`, passing ``sentence.source`` and
``sentence.line_numbers`` so that messages point at the right line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nlp_transfer.data.readers import decode_text
from nlp_transfer.errors import DataError, where

log = logging.getLogger(__name__)


@dataclass
class Sentence:
    """One sentence of a token-level dataset.

    ``tags`` is ``None`` when the data has no tag column. ``line`` is the 1-based line of the
    first token and ``line_numbers`` one line per token (CoNLL files); for HF datasets ``line``
    is the 0-based row index and ``line_numbers`` is ``None``.
    """

    tokens: list[str]
    tags: list[str] | None
    source: str | None = None
    line: int | None = None
    line_numbers: list[int] | None = field(default=None)

    def __len__(self) -> int:
        return len(self.tokens)


def _split(line: str, separator: str | None) -> list[str]:
    return line.split() if separator is None else line.split(separator)


def read_conll(
    path: str | os.PathLike[str],
    *,
    token_column: int = 0,
    tag_column: int | None = -1,
    separator: str | None = None,
    comment_prefix: str | None = "#",
    docstart: str | None = "-DOCSTART-",
    num_columns: int | None = None,
    encoding: str = "utf-8-sig",
    encoding_option: str = "data.encoding",
) -> list[Sentence]:
    """Read a CoNLL-style column file into sentences (see the module docstring for the format).

    ``token_column`` / ``tag_column`` index the columns (negative counts from the end);
    ``tag_column=None`` reads tokens only. Raises :class:`DataError` for a line with the wrong
    number of columns, an empty token or tag, undecodable bytes (naming ``encoding_option``),
    or a file without any sentence.
    """
    source = str(path)
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    lines: list[int] = []
    expected = num_columns

    def flush() -> None:
        if tokens:
            sentences.append(
                Sentence(
                    tokens=list(tokens),
                    tags=list(tags) if tag_column is not None else None,
                    source=source,
                    line=lines[0],
                    line_numbers=list(lines),
                )
            )
        tokens.clear()
        tags.clear()
        lines.clear()

    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise DataError(f"{source}: cannot read CoNLL file ({err.strerror})") from None
    text = decode_text(data, source, encoding, encoding_option)
    # split on "\n" only: str.splitlines() would also split on characters such as U+2028
    raw_lines = [raw.rstrip("\r\n") for raw in text.split("\n")]
    if expected is None and comment_prefix:  # the token lines' width decides what a comment is
        expected = _first_token_width(raw_lines, separator, comment_prefix, docstart)
    comments: list[int] = []
    width_line = ""  # the line that set the expected number of columns
    for number, line in enumerate(raw_lines, start=1):
        if not line.strip():
            flush()
            continue
        columns = _split(line, separator)
        if (
            not tokens
            and comment_prefix
            and line.startswith(comment_prefix)
            and len(columns) != expected
        ):
            comments.append(number)
            continue
        if docstart is not None and columns and columns[0].strip() == docstart:
            flush()
            continue
        if expected is None:
            expected, width_line = len(columns), line
        if len(columns) != expected:
            looks_commented = [x for x in (width_line, line) if x.lstrip()[:1] in "#%;"]
            hint = (
                f"; if {looks_commented[0]!r} is a comment, set data.comment_prefix to its "
                "first character"
                if looks_commented and not comment_prefix
                else ""
            )
            raise DataError(
                f"{where(source, number)}: expected {expected} columns "
                f"(separator={separator!r}), found {len(columns)} in {line!r}{hint}"
            )
        wanted = [token_column] + ([tag_column] if tag_column is not None else [])
        for column in wanted:
            if not -expected <= column < expected:
                raise DataError(
                    f"{where(source, number)}: column {column} does not exist; "
                    f"lines have {expected} columns (separator={separator!r})"
                )
        token = columns[token_column].strip()
        if not token:
            raise DataError(
                f"{where(source, number)}: empty token in column {token_column} of {line!r}"
            )
        tokens.append(token)
        if tag_column is not None:
            tag = columns[tag_column].strip()
            if not tag:
                raise DataError(
                    f"{where(source, number)}: empty tag in column {tag_column} of {line!r}"
                )
            tags.append(tag)
        lines.append(number)
    flush()
    if comments:
        log.warning(
            "%s: skipped %d comment line(s) starting with %r (first: %s); they cannot be "
            "token lines (not %s columns). data.comment_prefix=null reads every line as data",
            source,
            len(comments),
            comment_prefix,
            where(source, comments[0]),
            expected,
        )
    if not sentences:
        raise DataError(f"{source}: no sentences found (is this a CoNLL column file?)")
    return sentences


def _first_token_width(
    lines: list[str], separator: str | None, comment_prefix: str, docstart: str | None
) -> int | None:
    """Columns of the first line that is neither blank, a comment candidate nor -DOCSTART-."""
    for line in lines:
        if not line.strip() or line.startswith(comment_prefix):
            continue
        columns = _split(line, separator)
        if docstart is not None and columns and columns[0].strip() == docstart:
            continue
        return len(columns)
    return None


def write_conll(
    path: str | os.PathLike[str],
    sentences: Iterable[Sentence],
    separator: str = " ",
) -> None:
    """Write sentences as ``token<sep>tag`` lines (token only when ``tags`` is None)."""
    out: list[str] = []
    for sentence in sentences:
        if sentence.tags is not None and len(sentence.tags) != len(sentence.tokens):
            raise ValueError(
                f"sentence at {where(sentence.source, sentence.line)} has "
                f"{len(sentence.tokens)} tokens but {len(sentence.tags)} tags"
            )
        for i, token in enumerate(sentence.tokens):
            if sentence.tags is None:
                out.append(token)
            else:
                out.append(f"{token}{separator}{sentence.tags[i]}")
        out.append("")
    Path(path).write_text("\n".join(out) + ("\n" if out else ""), encoding="utf-8")


def _label_names(feature: Any) -> list[str] | None:
    """Names of a ``Sequence``/``List`` of ``ClassLabel`` feature, else None."""
    inner = getattr(feature, "feature", None)
    names = getattr(inner, "names", None)
    return list(names) if names is not None else None


def read_hf_token_dataset(
    name_or_path: str,
    split: str,
    tokens_field: str = "tokens",
    tags_field: str | None = "ner_tags",
    *,
    label_names: Sequence[str] | None = None,
    **load_kwargs: Any,
) -> list[Sentence]:
    """Load a token-classification split with :func:`datasets.load_dataset` as sentences.

    ``name_or_path`` is a hub id or a local builder/path, e.g.
    ``read_hf_token_dataset("json", "train", data_files={"train": "train.jsonl"})``.
    Integer tags are mapped to names through the ``ClassLabel`` feature of ``tags_field``, or
    ``label_names`` when the dataset has plain integers; string tags are kept.
    ``tags_field=None`` reads tokens only.
    """
    from datasets import load_dataset

    dataset = load_dataset(name_or_path, split=split, **load_kwargs)
    source = f"{name_or_path}[{split}]"
    columns = list(dataset.column_names)
    for name in (tokens_field, tags_field):
        if name is not None and name not in columns:
            raise DataError(f"{source}: no field {name!r}; available fields: {columns}")
    names = list(label_names) if label_names is not None else None
    if tags_field is not None and names is None:
        names = _label_names(dataset.features[tags_field])
    sentences = []
    for row, example in enumerate(dataset):
        tokens = [str(t) for t in example[tokens_field]]
        tags = None
        if tags_field is not None:
            raw = list(example[tags_field])
            if len(raw) != len(tokens):
                raise DataError(f"{source} row {row}: {len(tokens)} tokens but {len(raw)} tags")
            tags = []
            for value in raw:
                if isinstance(value, str):
                    tags.append(value)
                elif names is None:
                    raise DataError(
                        f"{source} row {row}: integer tags but {tags_field!r} is not a "
                        "ClassLabel sequence; pass label_names=[...]"
                    )
                elif not 0 <= int(value) < len(names):
                    raise DataError(
                        f"{source} row {row}: tag id {value} out of range for {len(names)} labels"
                    )
                else:
                    tags.append(names[int(value)])
        sentences.append(Sentence(tokens=tokens, tags=tags, source=source, line=row))
    return sentences
