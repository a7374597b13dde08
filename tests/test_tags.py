"""Tag schemes: conversion, validation policies, entity extraction."""

from __future__ import annotations

import random

import pytest

from nlp_transfer.errors import ConfigError, DataError
from nlp_transfer.tagging import (
    TagSchemeError,
    convert_tags,
    entities_from_iob2,
    entities_from_tags,
    normalize_scheme,
    split_tag,
    tags_from_entities,
    validate_tags,
)

IOB2 = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "O", "B-ORG"]
IOB1 = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "O", "I-ORG"]
BIOES = ["B-PER", "E-PER", "O", "S-LOC", "B-LOC", "E-LOC", "O", "S-ORG"]
SPANS = [("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 6), ("ORG", 7, 8)]


def test_scheme_names_and_split() -> None:
    assert normalize_scheme("bio") == "IOB2"
    assert normalize_scheme("iobes") == "BIOES"
    assert normalize_scheme("IOB1") == "IOB1"
    with pytest.raises(ConfigError, match="IOB2"):
        normalize_scheme("BILOU")
    assert split_tag("B-PER") == ("B", "PER")
    assert split_tag("I-MISC-X") == ("I", "MISC-X")
    assert split_tag("O") == ("O", None)


@pytest.mark.parametrize(("scheme", "tags"), [("IOB2", IOB2), ("IOB1", IOB1), ("BIOES", BIOES)])
def test_entities_and_rendering(scheme: str, tags: list[str]) -> None:
    assert entities_from_tags(tags, scheme) == SPANS
    assert tags_from_entities(SPANS, len(tags), scheme) == tags


@pytest.mark.parametrize("src", ["IOB1", "IOB2", "BIOES"])
@pytest.mark.parametrize("dst", ["IOB1", "IOB2", "BIOES"])
def test_convert_all_pairs(src: str, dst: str) -> None:
    by_scheme = {"IOB1": IOB1, "IOB2": IOB2, "BIOES": BIOES}
    assert convert_tags(by_scheme[src], src, dst) == by_scheme[dst]


def test_convert_round_trip_random() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(0, 12)
        spans, i = [], 0
        while i < n:
            if rng.random() < 0.4:
                end = min(n, i + rng.randint(1, 3))
                spans.append((rng.choice("AB"), i, end))
                i = end
            else:
                i += 1
        iob2 = tags_from_entities(spans, n, "IOB2")
        for scheme in ("IOB1", "BIOES"):
            assert convert_tags(convert_tags(iob2, "IOB2", scheme), scheme, "IOB2") == iob2
        assert entities_from_iob2(iob2) == spans


def test_entities_from_iob2_lenient() -> None:
    tags = ["I-PER", "I-PER", "B-PER", "I-LOC", "O", "I-LOC"]
    assert entities_from_iob2(tags) == [("PER", 0, 2), ("PER", 2, 3), ("LOC", 3, 4), ("LOC", 5, 6)]
    assert entities_from_iob2([]) == []
    assert entities_from_iob2(["O", "O"]) == []


def test_validate_valid_sequences_unchanged() -> None:
    assert validate_tags(IOB2, "BIO") == IOB2
    assert validate_tags(IOB1, "IOB1") == IOB1
    assert validate_tags(BIOES, "IOBES") == BIOES


def test_validate_policies_iob2() -> None:
    tags = ["O", "I-PER", "I-PER", "B-LOC", "I-ORG"]
    assert validate_tags(tags, "IOB2", "convert") == ["O", "B-PER", "I-PER", "B-LOC", "B-ORG"]
    with pytest.raises(TagSchemeError, match=r"data\.txt:11: 'I-PER' cannot follow 'O'"):
        validate_tags(tags, "IOB2", "reject", source="data.txt", line_numbers=[10, 11, 12, 13, 14])
    with pytest.warns(UserWarning, match="I-PER"):
        assert validate_tags(tags, "IOB2", "warn") == tags
    # I-X at the sentence start and after another type
    assert validate_tags(["I-A"], "IOB2", "convert") == ["B-A"]
    with pytest.raises(TagSchemeError, match="'I-B' cannot follow 'B-A'"):
        validate_tags(["B-A", "I-B"], "IOB2")
    with pytest.raises(ConfigError, match="convert"):
        validate_tags(IOB2, "IOB2", "fix")


def test_validate_unknown_prefix_always_raises() -> None:
    for bad in ("E-PER", "X-PER", "B-", "PER", "O-PER"):
        for policy in ("convert", "reject", "warn"):
            with pytest.raises(TagSchemeError, match=r"f\.conll:7"):
                validate_tags(["O", bad], "IOB2", policy, source="f.conll", line_numbers=[6, 7])
    assert validate_tags(["S-PER"], "BIOES") == ["S-PER"]
    with pytest.raises(DataError) as err:
        validate_tags(["U-PER"], "BIOES")
    assert err.value.index == 0


def test_validate_bioes_and_iob1_repairs() -> None:
    assert validate_tags(["B-A", "O", "I-A", "E-A"], "BIOES", "convert") == [
        "S-A",
        "O",
        "B-A",
        "E-A",
    ]
    with pytest.raises(TagSchemeError):
        validate_tags(["B-A", "I-A"], "BIOES")
    assert validate_tags(["O", "B-A", "I-A"], "IOB1", "convert") == ["O", "I-A", "I-A"]
    assert validate_tags(["I-A", "B-A"], "IOB1") == ["I-A", "B-A"]


def test_tags_from_entities_rejects_overlap() -> None:
    with pytest.raises(ValueError, match="overlaps"):
        tags_from_entities([("A", 0, 2), ("B", 1, 3)], 3)
    with pytest.raises(ValueError, match="out of range"):
        tags_from_entities([("A", 2, 5)], 3)
