"""Readers for classification files: JSONL, CSV and TSV, and the seam for more.

A file format is one *row reader* registered for its extensions with
:func:`register_format`: ``reader(path, text, fields) -> [(line, {field: value})]``. Field
checks, label typing and :class:`Example` records are shared (:func:`read_classification_file`),
and the classification datamodule looks for ``train<ext>`` for every registered extension.
Readers raise :class:`DataError` naming the file and line of anything malformed.

Decisions on ambiguous input (nothing is silently reinterpreted):

- text fields must be strings (JSONL); a number, list, object or null is an error;
- labels must be JSON strings or integers (not booleans, floats, lists or objects), and all
  labels of one file must be of one of these two types: ``1`` and ``1.0`` or ``1`` and
  ``"1"`` can therefore never become two classes. An integer label is its decimal string
  (``1`` is the class ``"1"``);
- ``.tsv`` files are read without CSV quoting (``csv.QUOTE_NONE``): a ``"`` is an ordinary
  character; ``.csv`` files use standard CSV quoting;
- files are decoded with ``encoding`` (default ``utf-8-sig``: UTF-8, with or without a
  byte-order mark); undecodable bytes are an error naming the line and ``data.encoding``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nlp_transfer.errors import DataError

DEFAULT_ENCODING = "utf-8-sig"

RowReader = Callable[[Path, str, list[str]], list[tuple[int, dict]]]
"""``(path, decoded text, the fields the config asks for) -> [(line number, row)]``."""
FORMATS: dict[str, RowReader] = {}  # file extension (lower case, with the dot) → reader


def register_format(*suffixes: str) -> Callable[[RowReader], RowReader]:
    """Register a row reader for ``suffixes`` (e.g. ``".ndjson"``); use as a decorator."""

    def register(reader: RowReader) -> RowReader:
        for suffix in suffixes:
            if not suffix.startswith("."):
                raise ValueError(f"register_format: {suffix!r} must start with '.'")
            FORMATS[suffix.lower()] = reader
        return reader

    return register


@dataclass(frozen=True)
class Example:
    """One classification example and where it came from."""

    text: str
    label: str | None
    text_pair: str | None = None
    source: str = ""  # "file:line" for error messages


def decode_text(
    data: bytes, source: str, encoding: str = DEFAULT_ENCODING, option: str = "data.encoding"
) -> str:
    """``data`` decoded, or a :class:`DataError` naming ``source:line`` of the first bad byte
    and the config ``option`` that sets the encoding."""
    try:
        return data.decode(encoding)
    except LookupError:
        raise DataError(f"{option}={encoding!r} is not a known text encoding") from None
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{source}:{line}: not valid {encoding} text ({err.reason} at byte {err.start}); "
            f"convert the file to UTF-8 or set {option}=<its encoding> (e.g. latin-1, cp1252)"
        ) from None


def read_text_file(
    path: Path, encoding: str = DEFAULT_ENCODING, option: str = "data.encoding"
) -> str:
    """A whole text file, decoded with :func:`decode_text`."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read file ({err.strerror})") from None
    return decode_text(data, str(path), encoding, option)


def find_split_file(data_dir: Path, split: str, suffixes: tuple[str, ...]) -> Path | None:
    """``<data_dir>/<split>.<ext>`` for the first matching extension, else ``None``."""
    matches = [data_dir / f"{split}{s}" for s in suffixes if (data_dir / f"{split}{s}").is_file()]
    if len(matches) > 1:
        raise DataError(
            f"{data_dir}: several files for split '{split}': {[m.name for m in matches]}; "
            f"keep one or name it explicitly with data.{split}_file"
        )
    return matches[0] if matches else None


def read_classification_file(
    path: str | Path,
    text_field: str = "text",
    label_field: str | None = "label",
    text_pair_field: str | None = None,
    encoding: str = DEFAULT_ENCODING,
) -> list[Example]:
    """Read a JSONL/CSV/TSV file. ``label_field=None`` reads unlabelled text."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    reader = FORMATS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown file type '{path.suffix}'; use one of {sorted(FORMATS)}")
    fields = [f for f in (text_field, text_pair_field, label_field) if f]
    rows = reader(path, read_text_file(path, encoding), fields)
    examples = []
    label_type: tuple[type, int] | None = None  # (type, line) of the first label
    for line, row in rows:
        missing = [f for f in fields if f not in row or row[f] is None]
        if missing:
            raise DataError(
                f"{path}:{line}: missing field(s) {missing}; fields present: {sorted(row)}. "
                "Set data.text_field / data.label_field / data.text_pair_field."
            )
        texts = [_text_value(row[f], f, path, line) for f in (text_field, text_pair_field) if f]
        if not texts[0].strip():
            raise DataError(f"{path}:{line}: empty text in field '{text_field}'")
        label = None
        if label_field:
            value = row[label_field]
            label = _label_value(value, label_field, path, line)
            if label_type is None:
                label_type = (type(value), line)
            elif type(value) is not label_type[0]:
                raise DataError(
                    f"{path}:{line}: label {value!r} ({_json_type(value)}) is not of the type "
                    f"of the label on line {label_type[1]} ({_json_type(label_type[0])}); "
                    f"use one type for every '{label_field}' value of the file"
                )
        examples.append(
            Example(
                text=texts[0],
                label=label,
                text_pair=texts[1] if text_pair_field else None,
                source=f"{path}:{line}",
            )
        )
    if not examples:
        raise DataError(f"{path}: no examples (the split is empty)")
    return examples


def _json_type(value: Any) -> str:
    kind = value if isinstance(value, type) else type(value)
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return names.get(kind, {list: "list", dict: "object"}.get(kind, kind.__name__))


def _text_value(value: Any, field: str, path: Path, line: int) -> str:
    if not isinstance(value, str):
        raise DataError(
            f"{path}:{line}: field '{field}' is not a string ({_json_type(value)} "
            f"{value!r:.60}); texts must be JSON strings"
        )
    return value


def _label_value(value: Any, field: str, path: Path, line: int) -> str:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{path}:{line}: empty label in field '{field}'")
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(
        f"{path}:{line}: label {value!r:.60} in field '{field}' is not a string or an "
        f"integer ({_json_type(value)}); a float such as 1.0 is refused so that it cannot "
        "become a class apart from 1"
    )


def _split_lines(text: str) -> list[str]:
    # "\n" only: str.splitlines() also splits on U+2028 etc., which JSON strings may contain
    return [line.removesuffix("\r") for line in text.split("\n")]


@register_format(".jsonl", ".json")
def read_jsonl_rows(path: Path, text: str, fields: list[str]) -> list[tuple[int, dict]]:
    """One JSON object per line."""
    rows = []
    for line_no, line in enumerate(_split_lines(text), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object, got {_json_type(row)}")
        rows.append((line_no, row))
    return rows


@register_format(".csv")
def read_csv_rows(path: Path, text: str, fields: list[str]) -> list[tuple[int, dict]]:
    """Comma-separated with a header row and standard CSV quoting."""
    return _read_delimited(path, text, "csv", fields)


@register_format(".tsv")
def read_tsv_rows(path: Path, text: str, fields: list[str]) -> list[tuple[int, dict]]:
    """Tab-separated with a header row, no quoting."""
    return _read_delimited(path, text, "tsv", fields)


def _read_delimited(path: Path, text: str, fmt: str, fields: list[str]) -> list[tuple[int, dict]]:
    if fmt == "tsv":  # no quoting: a field starting with '"' must not swallow rows
        reader = csv.DictReader(
            io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE
        )
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=",")
    try:
        header = reader.fieldnames or []
        absent = [x for x in fields if x not in header]
        if absent:
            raise DataError(
                f"{path}:1: header {header} lacks column(s) {absent}; the file needs a header "
                "row, or set data.text_field / data.label_field to its column names"
            )
        rows = []
        for row in reader:
            if None in row:  # more cells than header columns
                raise DataError(
                    f"{path}:{reader.line_num}: {len(header) + len(row[None])} cells but the "
                    f"header has {len(header)} columns"
                )
            short = [k for k, v in row.items() if v is None]
            if short:  # fewer cells than header columns
                raise DataError(
                    f"{path}:{reader.line_num}: {len(header) - len(short)} cells but the "
                    f"header has {len(header)} columns (missing {short})"
                )
            rows.append((reader.line_num, row))
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: malformed {fmt.upper()} ({err})") from None
    return rows
