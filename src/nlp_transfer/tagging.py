"""Tag schemes for sequence labelling: IOB1, IOB2 (a.k.a. BIO) and BIOES (a.k.a. IOBES).

A tag is ``"O"`` or ``"<P>-<TYPE>"`` with a one-letter prefix ``P`` and a non-empty type:

* ``IOB1``: prefixes ``I``/``O``/``B``; ``B-X`` only starts an ``X`` entity that directly
  follows another ``X`` entity; every other entity starts with ``I-X``.
* ``IOB2`` (``BIO``): every entity starts with ``B-X`` and continues with ``I-X``.
* ``BIOES`` (``IOBES``): ``S-X`` for one-token entities, else ``B-X I-X* E-X``.

Public API::

    normalize_scheme(name) -> str                    # "bio" -> "IOB2", "iobes" -> "BIOES"
    split_tag(tag) -> tuple[str, str | None]          # "B-PER" -> ("B", "PER"); "O" -> ("O", None)
    entities_from_tags(tags, scheme) -> list[(type, start, end_exclusive)]
    entities_from_iob2(tags) -> list[(type, start, end_exclusive)]
    tags_from_entities(entities, length, scheme) -> list[str]
    convert_tags(tags, src, dst) -> list[str]
    validate_tags(tags, scheme, policy="reject", source=None, line_numbers=None) -> list[str]

Decoding of ill-formed sequences is lenient and conlleval-like: a continuation tag (``I-X``, or
``E-X`` in BIOES) that does not continue an open ``X`` entity starts a new one. That is the
repair ``validate_tags(..., policy="convert")`` applies (``O I-PER`` becomes ``O B-PER``).

Errors are :class:`TagSchemeError` (a :class:`~nlp_transfer.errors.DataError`) whose
message starts with ``file:line`` when ``source`` / ``line_numbers`` are given.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from nlp_transfer.errors import ConfigError, DataError

SCHEMES: tuple[str, ...] = ("IOB1", "IOB2", "BIOES")
_ALIASES = {"IOB1": "IOB1", "IOB2": "IOB2", "BIO": "IOB2", "BIOES": "BIOES", "IOBES": "BIOES"}
PREFIXES: dict[str, frozenset[str]] = {
    "IOB1": frozenset("BIO"),
    "IOB2": frozenset("BIO"),
    "BIOES": frozenset("BIOES"),
}
POLICIES: tuple[str, ...] = ("convert", "reject", "warn")

Entity = tuple[str, int, int]


class TagSchemeError(DataError):
    """A tag that is unknown or ill-placed for its scheme; the message names file and line."""

    def __init__(
        self,
        message: str,
        source: str | None = None,
        line: int | None = None,
        index: int | None = None,
    ) -> None:
        self.source = source
        self.line = line
        self.index = index
        location = _location(source, line, index)
        super().__init__(f"{location}: {message}" if location else message)


def _location(source: str | None, line: int | None, index: int | None) -> str:
    if source is not None and line is not None:
        return f"{source}:{line}"
    if source is not None:
        return source if index is None else f"{source} (token {index})"
    if line is not None:
        return f"line {line}"
    return "" if index is None else f"token {index}"


def normalize_scheme(name: str) -> str:
    """Canonical scheme name (``IOB1``, ``IOB2`` or ``BIOES``); aliases ``BIO`` and ``IOBES``."""
    key = str(name).upper().replace("-", "")
    if key not in _ALIASES:
        raise ConfigError(
            f"unknown tag scheme {name!r}; choose one of {sorted(_ALIASES)} (case-insensitive)"
        )
    return _ALIASES[key]


def split_tag(tag: str) -> tuple[str, str | None]:
    """``"B-PER"`` -> ``("B", "PER")``, ``"O"`` -> ``("O", None)``.

    The prefix is everything before the first ``-``; a tag without ``-`` other than ``O``
    yields ``(tag, None)`` and is rejected by :func:`validate_tags`.
    """
    if tag == "O":
        return "O", None
    prefix, sep, type_ = tag.partition("-")
    if not sep or not type_:
        return tag, None
    return prefix, type_


def _check_known(
    tags: Sequence[str],
    scheme: str,
    source: str | None,
    line_numbers: Sequence[int] | None,
) -> list[tuple[str, str | None]]:
    allowed = PREFIXES[scheme]
    parsed = []
    for i, tag in enumerate(tags):
        prefix, type_ = split_tag(tag)
        if (
            prefix not in allowed
            or (prefix != "O" and type_ is None)
            or (prefix == "O" and tag != "O")
        ):
            line = line_numbers[i] if line_numbers is not None else None
            raise TagSchemeError(
                f"tag {tag!r} is not valid in {scheme}: expected 'O' or one of "
                f"{sorted(p + '-<TYPE>' for p in allowed if p != 'O')}",
                source,
                line,
                i,
            )
        parsed.append((prefix, type_))
    return parsed


def _decode(parsed: Sequence[tuple[str, str | None]], scheme: str) -> list[Entity]:
    """Lenient decoding of already-checked (prefix, type) pairs into entity spans."""
    entities: list[Entity] = []
    open_type: str | None = None
    start = 0
    for i, (prefix, type_) in enumerate(parsed):
        if prefix == "O":
            if open_type is not None:
                entities.append((open_type, start, i))
            open_type = None
            continue
        assert type_ is not None
        continues = open_type == type_
        if scheme == "IOB2":
            starts = prefix == "B" or not continues
        elif scheme == "IOB1":
            starts = not continues or prefix == "B"
        else:  # BIOES
            starts = prefix in ("B", "S") or not continues
        if starts:
            if open_type is not None:
                entities.append((open_type, start, i))
            open_type, start = type_, i
        if scheme == "BIOES" and prefix in ("E", "S"):
            entities.append((type_, start, i + 1))
            open_type = None
    if open_type is not None:
        entities.append((open_type, start, len(parsed)))
    return entities


def entities_from_tags(tags: Sequence[str], scheme: str = "IOB2") -> list[Entity]:
    """Entity spans ``(type, start, end_exclusive)`` of a tag sequence, decoded leniently.

    Raises :class:`TagSchemeError` for a tag whose prefix is not allowed by ``scheme``.
    """
    scheme = normalize_scheme(scheme)
    return _decode(_check_known(tags, scheme, None, None), scheme)


def entities_from_iob2(tags: Sequence[str]) -> list[Entity]:
    """Entity spans ``(type, start, end_exclusive)`` of an IOB2 sequence.

    ``I-X`` that does not continue an ``X`` entity starts a new one (conlleval-like).

    >>> entities_from_iob2(["B-PER", "I-PER", "O", "I-LOC"])
    [('PER', 0, 2), ('LOC', 3, 4)]
    """
    return entities_from_tags(tags, "IOB2")


def tags_from_entities(entities: Sequence[Entity], length: int, scheme: str = "IOB2") -> list[str]:
    """Render non-overlapping spans ``(type, start, end_exclusive)`` as tags in ``scheme``."""
    scheme = normalize_scheme(scheme)
    tags = ["O"] * length
    prev_end, prev_type = -1, None
    for type_, start, end in sorted(entities, key=lambda e: e[1]):
        if not 0 <= start < end <= length:
            raise ValueError(f"entity {(type_, start, end)} is out of range for length {length}")
        if any(t != "O" for t in tags[start:end]):
            raise ValueError(f"entity {(type_, start, end)} overlaps another entity")
        if scheme == "IOB2":
            tags[start:end] = [f"B-{type_}"] + [f"I-{type_}"] * (end - start - 1)
        elif scheme == "IOB1":
            first = "B" if (prev_end == start and prev_type == type_) else "I"
            tags[start:end] = [f"{first}-{type_}"] + [f"I-{type_}"] * (end - start - 1)
        elif end - start == 1:
            tags[start] = f"S-{type_}"
        else:
            tags[start:end] = [f"B-{type_}"] + [f"I-{type_}"] * (end - start - 2) + [f"E-{type_}"]
        prev_end, prev_type = end, type_
    return tags


def convert_tags(tags: Sequence[str], src: str, dst: str) -> list[str]:
    """Convert a tag sequence from scheme ``src`` to scheme ``dst`` (lenient decoding)."""
    return tags_from_entities(entities_from_tags(tags, src), len(tags), dst)


def _describe(tags: Sequence[str], i: int, scheme: str) -> str:
    prev = repr(tags[i - 1]) if i > 0 else "the sentence start"
    nxt = repr(tags[i + 1]) if i + 1 < len(tags) else "the sentence end"
    return f"{tags[i]!r} cannot follow {prev} or precede {nxt} in {scheme}"


def validate_tags(
    tags: Sequence[str],
    scheme: str,
    policy: str = "reject",
    source: str | None = None,
    line_numbers: Sequence[int] | None = None,
) -> list[str]:
    """Check ``tags`` against ``scheme`` and return them, repaired when ``policy="convert"``.

    * A tag whose prefix the scheme does not allow (e.g. ``E-X`` in IOB2, ``X-PER``, ``B-``)
      always raises :class:`TagSchemeError` - there is no sensible repair.
    * An ill-placed tag (``I-X`` after ``O``, after the start or after another type in IOB2;
      ``B-X`` not following an ``X`` entity in IOB1; broken ``B..E`` chains in BIOES) is
      handled by ``policy``: ``"convert"`` repairs it (``I-X`` -> ``B-X`` in IOB2; in general
      the sequence is re-rendered from its lenient decoding), ``"reject"`` raises,
      ``"warn"`` emits a :class:`UserWarning` and returns the tags unchanged.

    ``source`` (a file name) and ``line_numbers`` (one per tag) make errors point at
    ``file:line``.
    """
    scheme = normalize_scheme(scheme)
    if policy not in POLICIES:
        raise ConfigError(f"tag policy {policy!r} is not valid; choose one of {list(POLICIES)}")
    if line_numbers is not None and len(line_numbers) != len(tags):
        raise ValueError(f"got {len(line_numbers)} line numbers for {len(tags)} tags")
    parsed = _check_known(tags, scheme, source, line_numbers)
    repaired = tags_from_entities(_decode(parsed, scheme), len(tags), scheme)
    bad = [i for i, (a, b) in enumerate(zip(tags, repaired)) if a != b]
    if not bad or policy == "convert":
        return repaired
    i = bad[0]
    line = line_numbers[i] if line_numbers is not None else None
    error = TagSchemeError(
        f"{_describe(tags, i, scheme)} ({len(bad)} ill-placed tag(s) in this sentence; "
        f"the repair would be {repaired[i]!r})",
        source,
        line,
        i,
    )
    if policy == "reject":
        raise error
    warnings.warn(str(error), UserWarning, stacklevel=2)
    return list(tags)
