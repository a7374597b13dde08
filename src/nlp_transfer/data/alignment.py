"""Word ↔ subword alignment for sequence labelling with a transformers *fast* tokenizer.

Public API::

    IGNORE_INDEX = -100
    AlignedExample                                   # one encoder window (dataclass)
    align_sentences(tokenizer, sentences, labels=None, *, max_length=None, stride=None,
                    label_all_subtokens=False, subtoken_label_map=None,
                    sentence_ids=None) -> list[AlignedExample]
    align_sentence(tokenizer, words, labels=None, *, sentence_id=0, **same) -> list[AlignedExample]
    plan_windows(num_subtokens, budget, stride) -> list[(start, end, owned_start, owned_end)]
    subtoken_label_map_iob2(labels) -> list[int]     # B-X -> I-X for 2nd+ subtokens
    collate_aligned(examples, pad_token_id=0) -> dict[str, Tensor]
    merge_window_predictions(predictions, sentence_ids, word_offsets, owned_masks,
                             num_words=None) -> dict[int, list[int]]

**Word level is the unit of evaluation.** Every example carries one label per *word*
(``labels``); models pool subtoken features to words (see
:class:`~nlp_transfer.encoders.subword_pooling.SubwordPooling`) and metrics consume word-level
labels and predictions. ``label_all_subtokens=True`` additionally gives ``subtoken_labels`` (one
per subtoken, ``-100`` on special tokens) for models trained on subtokens; their predictions must
still be brought back to words (e.g. first subtoken) before scoring.

``word_map`` holds, per subtoken, the index of its word *within the example's window*
(``-1`` for special tokens and padding); the index within the sentence is
``word_offset + word_map``. For a sentence that fits, the window is the whole sentence and
``word_offset == 0``.

Long sentences (more subtokens than ``max_length`` minus the special tokens, the *budget*) are
split into windows of whole words, each filled greedily up to the budget. Each window after the
first starts with up to ``stride`` **subword tokens** of left context (whole words) repeated
from the previous one. Ownership is contiguous: the overlap of two consecutive windows is split
at its subword midpoint, so each word is owned by exactly one window and sees about
``stride / 2`` subtokens of context on each side. Words a window does not own have label
``-100`` (``owned_mask`` False) and are ignored by the losses; at prediction time
:func:`merge_window_predictions` keeps only the owner's prediction. Windows that would own no
word are dropped. A single word longer than the budget keeps its first ``budget`` subtokens
(it is never dropped). A word the tokenizer turns into no subtokens (e.g. ``"\\u200b"``) has no
entry in ``word_map``: its pooled feature is zero but it still has a label and a prediction.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nlp_transfer.data.batch import WordBatch
from nlp_transfer.data.padding import pad_to
from nlp_transfer.errors import ConfigError

IGNORE_INDEX = -100


@dataclass
class AlignedExample:
    """One encoder input (a whole sentence, or a window of a long one).

    ``labels`` / ``owned`` are per window word; ``owned_start:owned_end`` (window-local) is the
    range of words this window is responsible for.
    """

    input_ids: list[int]
    attention_mask: list[int]
    word_map: list[int]
    labels: list[int]
    sentence_id: int
    word_offset: int
    owned_start: int
    owned_end: int
    token_type_ids: list[int] | None = None
    subtoken_labels: list[int] | None = None

    @property
    def num_words(self) -> int:
        """Number of words in this window (owned or context)."""
        return len(self.labels)


def plan_windows(
    num_subtokens: Sequence[int], budget: int, stride: int
) -> list[tuple[int, int, int, int]]:
    """Plan windows over words with ``num_subtokens[i]`` (already capped at ``budget``).

    Returns ``(start, end, owned_start, owned_end)`` per window, in sentence word indices,
    with ``end`` / ``owned_end`` exclusive. Owned ranges are contiguous, non-empty, in order
    and cover ``range(len(num_subtokens))`` exactly (one window for an empty sentence).
    """
    n = len(num_subtokens)
    prefix = [0]
    for count in num_subtokens:
        if not 0 <= count <= budget:
            raise ValueError(f"subtoken count {count} outside [0, {budget}]")
        prefix.append(prefix[-1] + count)
    if prefix[-1] <= budget:
        return [(0, n, 0, n)]
    spans: list[tuple[int, int]] = []
    start = 0
    while True:
        end = bisect.bisect_right(prefix, prefix[start] + budget) - 1
        end = min(max(end, start + 1), n)
        spans.append((start, end))
        if end >= n:
            break
        # smallest next start that keeps <= stride tokens of context and lets word `end` fit
        need = max(prefix[end] - stride, prefix[end + 1] - budget)
        start = min(bisect.bisect_left(prefix, need, lo=start + 1), end)
    cuts = [0]
    for (_, end), (next_start, _) in itertools.pairwise(spans):
        middle = -(-(prefix[next_start] + prefix[end]) // 2)
        cut = bisect.bisect_left(prefix, middle, lo=next_start, hi=end)
        cuts.append(max(cut, cuts[-1]))
    cuts.append(n)
    windows = [
        (start, end, cuts[k], cuts[k + 1])
        for k, (start, end) in enumerate(spans)
        if cuts[k + 1] > cuts[k]
    ]
    return windows


def subtoken_label_map_iob2(labels: Sequence[str]) -> list[int]:
    """Label-id map for the 2nd+ subtokens of a word: ``B-X`` -> ``I-X`` (others unchanged)."""
    index = {label: i for i, label in enumerate(labels)}
    return [
        index.get("I-" + label[2:], i) if label.startswith("B-") else i
        for i, label in enumerate(labels)
    ]


def _resolve_lengths(tokenizer: Any, max_length: int | None, stride: int | None) -> tuple[int, int]:
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; word alignment needs "
            "BatchEncoding.word_ids() (load it with AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    if max_length is None:
        model_max = getattr(tokenizer, "model_max_length", None)
        max_length = int(model_max) if model_max and model_max < 100_000 else 512
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    if budget < 1:
        raise ConfigError(f"max_length={max_length} leaves no room for tokens after special tokens")
    if stride is None:
        stride = budget // 4
    if not 0 <= stride <= budget // 2:
        raise ConfigError(
            f"stride={stride} (subword tokens of context) must be in [0, {budget // 2}] "
            f"for max_length={max_length}"
        )
    return budget, stride


def align_sentences(
    tokenizer: Any,
    sentences: Sequence[Sequence[str]],
    labels: Sequence[Sequence[int]] | None = None,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    label_all_subtokens: bool = False,
    subtoken_label_map: Sequence[int] | None = None,
    sentence_ids: Sequence[int] | None = None,
) -> list[AlignedExample]:
    """Tokenize pre-split sentences and align words, labels and subtokens.

    ``labels`` holds one label id per word (``-100`` allowed) or is ``None`` (prediction);
    ``max_length`` defaults to the tokenizer's ``model_max_length`` (512 if unset) and counts
    special tokens; ``stride`` is in subword tokens (default: a quarter of the budget).
    ``subtoken_label_map`` (with ``label_all_subtokens``) maps a word's label to the label of
    its 2nd+ subtokens, e.g. :func:`subtoken_label_map_iob2`. Returns the examples of all
    sentences in order; ``sentence_id`` defaults to the sentence's index.
    """
    budget, stride = _resolve_lengths(tokenizer, max_length, stride)
    if labels is not None and len(labels) != len(sentences):
        raise ValueError(f"got {len(labels)} label sequences for {len(sentences)} sentences")
    if sentence_ids is not None and len(sentence_ids) != len(sentences):
        raise ValueError(f"got {len(sentence_ids)} sentence ids for {len(sentences)} sentences")
    if not sentences:
        return []
    encoding = tokenizer(
        [list(words) for words in sentences],
        is_split_into_words=True,
        add_special_tokens=True,
        truncation=False,
        verbose=False,
    )
    has_types = "token_type_ids" in encoding
    examples: list[AlignedExample] = []
    for i, words in enumerate(sentences):
        word_labels = list(labels[i]) if labels is not None else [IGNORE_INDEX] * len(words)
        if len(word_labels) != len(words):
            raise ValueError(f"sentence {i}: {len(words)} words but {len(word_labels)} labels")
        examples.extend(
            _windows_of(
                ids=encoding["input_ids"][i],
                types=encoding["token_type_ids"][i] if has_types else None,
                word_ids=encoding.word_ids(i),
                word_labels=word_labels,
                sentence_id=sentence_ids[i] if sentence_ids is not None else i,
                budget=budget,
                stride=stride,
                label_all_subtokens=label_all_subtokens,
                subtoken_label_map=subtoken_label_map,
            )
        )
    return examples


def align_sentence(
    tokenizer: Any,
    words: Sequence[str],
    labels: Sequence[int] | None = None,
    *,
    sentence_id: int = 0,
    **kwargs: Any,
) -> list[AlignedExample]:
    """:func:`align_sentences` for one sentence; returns its window(s)."""
    return align_sentences(
        tokenizer,
        [words],
        None if labels is None else [labels],
        sentence_ids=[sentence_id],
        **kwargs,
    )


def _windows_of(
    *,
    ids: list[int],
    types: list[int] | None,
    word_ids: list[int | None],
    word_labels: list[int],
    sentence_id: int,
    budget: int,
    stride: int,
    label_all_subtokens: bool,
    subtoken_label_map: Sequence[int] | None,
) -> list[AlignedExample]:
    n_words = len(word_labels)
    positions = [p for p, w in enumerate(word_ids) if w is not None]
    # special tokens of a single sequence sit before the first / after the last word token
    first = positions[0] if positions else len(ids)
    last = positions[-1] + 1 if positions else len(ids)
    head, tail = ids[:first], ids[last:]
    per_word: list[list[int]] = [[] for _ in range(n_words)]
    for p in positions:
        per_word[word_ids[p]].append(ids[p])  # type: ignore[index]
    for pieces in per_word:
        del pieces[budget:]  # a word longer than the whole budget keeps its first subtokens
    body_type = types[first] if types is not None and positions else 0
    examples = []
    plan = plan_windows([len(p) for p in per_word], budget, stride)
    for start, end, owned_start, owned_end in plan:
        input_ids = list(head)
        word_map = [-1] * len(head)
        sub_labels = [IGNORE_INDEX] * len(head)
        for w in range(start, end):
            owned = owned_start <= w < owned_end
            for k, piece in enumerate(per_word[w]):
                input_ids.append(piece)
                word_map.append(w - start)
                label = word_labels[w] if owned else IGNORE_INDEX
                if k > 0 and subtoken_label_map is not None and label != IGNORE_INDEX:
                    label = subtoken_label_map[label]
                sub_labels.append(label)
        input_ids += tail
        word_map += [-1] * len(tail)
        sub_labels += [IGNORE_INDEX] * len(tail)
        token_type_ids = None
        if types is not None:
            body = len(input_ids) - len(head) - len(tail)
            token_type_ids = types[:first] + [body_type] * body + types[last:]
        examples.append(
            AlignedExample(
                input_ids=input_ids,
                attention_mask=[1] * len(input_ids),
                word_map=word_map,
                labels=[
                    word_labels[w] if owned_start <= w < owned_end else IGNORE_INDEX
                    for w in range(start, end)
                ],
                sentence_id=sentence_id,
                word_offset=start,
                owned_start=owned_start - start,
                owned_end=owned_end - start,
                token_type_ids=token_type_ids,
                subtoken_labels=sub_labels if label_all_subtokens else None,
            )
        )
    return examples


def _field(example: AlignedExample | Mapping[str, Any], name: str) -> Any:
    if isinstance(example, Mapping):
        return example.get(name)
    return getattr(example, name)


def collate_aligned(
    examples: Sequence[AlignedExample | Mapping[str, Any]], pad_token_id: int = 0
) -> WordBatch:
    """Pad examples (right padding) into a batch of tensors.

    Returns ``input_ids`` / ``attention_mask`` / ``word_map`` (``-1`` pad) ``[B, T]``,
    ``token_type_ids`` ``[B, T]`` when every example has them, ``subtoken_labels`` ``[B, T]``
    (``-100`` pad) when present, ``labels`` ``[B, W]`` (``-100`` pad), ``word_mask`` and
    ``owned_mask`` ``[B, W]`` bool, ``sentence_id`` and ``word_offset`` ``[B]`` (long).
    Mappings with the :class:`AlignedExample` field names are accepted too.
    """
    batch = len(examples)
    lengths = [len(_field(e, "input_ids")) for e in examples]
    n_words = [len(_field(e, "labels")) for e in examples]
    t_max, w_max = max(lengths, default=0), max(n_words, default=0)

    def pad(name: str, width: int, value: int) -> torch.Tensor:
        return pad_to([_field(e, name) for e in examples], value, width)

    result = {
        "input_ids": pad("input_ids", t_max, pad_token_id),
        "attention_mask": pad("attention_mask", t_max, 0),
        "word_map": pad("word_map", t_max, -1),
        "labels": pad("labels", w_max, IGNORE_INDEX),
    }
    if batch and all(_field(e, "token_type_ids") is not None for e in examples):
        result["token_type_ids"] = pad("token_type_ids", t_max, 0)
    if batch and all(_field(e, "subtoken_labels") is not None for e in examples):
        result["subtoken_labels"] = pad("subtoken_labels", t_max, IGNORE_INDEX)
    positions = torch.arange(w_max)
    result["word_mask"] = positions[None, :] < torch.tensor(n_words, dtype=torch.long)[:, None]
    starts = torch.tensor([_field(e, "owned_start") for e in examples], dtype=torch.long)
    ends = torch.tensor([_field(e, "owned_end") for e in examples], dtype=torch.long)
    result["owned_mask"] = (positions[None, :] >= starts[:, None]) & (
        positions[None, :] < ends[:, None]
    )
    result["sentence_id"] = torch.tensor(
        [_field(e, "sentence_id") for e in examples], dtype=torch.long
    )
    result["word_offset"] = torch.tensor(
        [_field(e, "word_offset") for e in examples], dtype=torch.long
    )
    return result


def _rows(values: torch.Tensor | Sequence[Any]) -> list[Any]:
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


def merge_window_predictions(
    predictions: torch.Tensor | Sequence[Sequence[int]],
    sentence_ids: torch.Tensor | Sequence[int],
    word_offsets: torch.Tensor | Sequence[int],
    owned_masks: torch.Tensor | Sequence[Sequence[bool]],
    num_words: Mapping[int, int] | Sequence[int] | None = None,
) -> dict[int, list[int]]:
    """One prediction per word of each sentence from per-window word predictions.

    All arguments are per window, in any order and possibly gathered from several batches
    (rows of ``[B, W]`` tensors, or lists of lists of different lengths): ``predictions[b][j]``
    is the prediction for window word ``j``, kept only where ``owned_masks[b][j]``, for sentence
    word ``word_offsets[b] + j``. ``num_words`` (per sentence id) enables a completeness check.
    Returns ``{sentence_id: predictions}`` for every sentence id seen. Raises ``ValueError``
    when a word gets two predictions or none.
    """
    preds, sids = _rows(predictions), _rows(sentence_ids)
    offsets, owned = _rows(word_offsets), _rows(owned_masks)
    if not len(preds) == len(sids) == len(offsets) == len(owned):
        raise ValueError("predictions, sentence_ids, word_offsets and owned_masks differ in length")
    assigned: dict[int, dict[int, int]] = {}
    for row, sid, offset, mask in zip(preds, sids, offsets, owned):
        words = assigned.setdefault(int(sid), {})
        for j, keep in enumerate(mask):
            if not keep:
                continue
            index = int(offset) + j
            if index in words:
                raise ValueError(f"sentence {sid}: word {index} is owned by two windows")
            words[index] = int(row[j])
    merged = {}
    for sid, words in assigned.items():
        if num_words is None:
            expected = max(words, default=-1) + 1
        else:
            expected = int(num_words[sid])
        missing = [i for i in range(expected) if i not in words]
        extra = [i for i in words if not 0 <= i < expected]
        if missing or extra:
            raise ValueError(
                f"sentence {sid}: words without a prediction {missing[:10]}, "
                f"out of range {extra[:10]} (expected {expected} words)"
            )
        merged[sid] = [words[i] for i in range(expected)]
    return merged
