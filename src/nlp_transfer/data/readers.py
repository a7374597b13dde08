"""Readers for classification files: JSONL, CSV and TSV.

Each reader yields :class:`Example` records and raises :class:`DataError` naming the
file and line of anything malformed.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from nlp_transfer.data.errors import DataError

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}


@dataclass(frozen=True)
class Example:
    """One classification example and where it came from."""

    text: str
    label: str | None
    text_pair: str | None = None
    source: str = ""  # "file:line" for error messages


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
) -> list[Example]:
    """Read a JSONL/CSV/TSV file. ``label_field=None`` reads unlabelled text."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown file type '{path.suffix}'; use one of {sorted(FORMATS)}")
    fields = [f for f in (text_field, text_pair_field, label_field) if f]
    rows = _read_jsonl(path) if fmt == "jsonl" else _read_delimited(path, fmt, fields)
    examples = []
    for line, row in rows:
        missing = [f for f in fields if f not in row or row[f] is None]
        if missing:
            raise DataError(
                f"{path}:{line}: missing field(s) {missing}; fields present: {sorted(row)}. "
                "Set data.text_field / data.label_field / data.text_pair_field."
            )
        text = str(row[text_field])
        if not text.strip():
            raise DataError(f"{path}:{line}: empty text in field '{text_field}'")
        examples.append(
            Example(
                text=text,
                label=str(row[label_field]) if label_field else None,
                text_pair=str(row[text_pair_field]) if text_pair_field else None,
                source=f"{path}:{line}",
            )
        )
    if not examples:
        raise DataError(f"{path}: no examples (the split is empty)")
    return examples


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append((line_no, row))
    return rows


def _read_delimited(path: Path, fmt: str, fields: list[str]) -> list[tuple[int, dict]]:
    delimiter = "\t" if fmt == "tsv" else ","
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
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
            rows.append((reader.line_num, row))
    return rows
