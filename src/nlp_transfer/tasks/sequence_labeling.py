"""Sequence labeling (NER): word features from subtokens, entity F1 over whole sentences.

Long sentences arrive as overlapping windows (:mod:`nlp_transfer.data.alignment`); their
predictions are kept until the epoch ends, gathered from every process and merged (each
word from the window that owns it), so no entity is cut at a window edge.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from nlp_transfer.data.alignment import IGNORE_INDEX, merge_window_predictions
from nlp_transfer.data.batch import Batch
from nlp_transfer.metrics.entity import EntityF1
from nlp_transfer.tasks.base import STAGES, Task, register_task

Window = tuple[int, int, list[bool], list[int], list[int]]


def pad_sentences(values: np.ndarray, offsets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Word-level values split at ``offsets`` → ``[sentences, max words]`` and a mask."""
    lengths = np.diff(offsets)
    width = int(lengths.max()) if len(lengths) else 0
    out = torch.full((len(lengths), width), IGNORE_INDEX, dtype=torch.long)
    for i, (start, end) in enumerate(itertools.pairwise(offsets.tolist())):
        out[i, : end - start] = torch.as_tensor(values[start:end], dtype=torch.long)
    mask = torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]
    return out, mask


@register_task
class SequenceLabelingTask(Task):
    name = "sequence_labeling"
    primary_metric = "f1"
    word_level = True
    predict_keys = ("sentence_id", "word_offset", "word_mask", "owned_mask")

    def __init__(self, labels: Sequence[str], subword_pooling: nn.Module | None = None) -> None:
        super().__init__(labels, subword_pooling)
        self._windows: dict[str, list[Window]] = {stage: [] for stage in STAGES}

    def build_metric(self) -> EntityF1:
        return EntityF1(self.labels)

    def feature_size(self, size: int) -> int:
        return self.subword_pooling.output_size(size) if self.subword_pooling is not None else size

    def to_words(self, features: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.subword_pooling is None or "word_map" not in batch:
            return features, batch["attention_mask"]
        num_words = batch["word_mask"].shape[1]
        return self.subword_pooling(features, batch["word_map"], num_words), batch["word_mask"]

    def update(self, stage: str, preds: torch.Tensor, batch: Batch) -> None:
        labels, word_mask, owned = batch["labels"], batch["word_mask"], batch["owned_mask"]
        whole = (batch["word_offset"] == 0) & (word_mask.sum(1) == batch["sentence_words"])
        self.metrics[stage].update(preds[whole], labels[whole], word_mask[whole])
        for i in (~whole).nonzero().flatten().tolist():
            n = int(word_mask[i].sum())
            self._windows[stage].append(
                (
                    int(batch["sentence_id"][i]),
                    int(batch["word_offset"][i]),
                    owned[i, :n].tolist(),
                    preds[i, :n].tolist(),
                    labels[i, :n].tolist(),
                )
            )

    def update_examples(
        self, stage: str, preds: np.ndarray, gold: np.ndarray, offsets: np.ndarray | None = None
    ) -> None:
        if offsets is None:
            raise ValueError("sequence labeling scores words: offsets (sentence starts) needed")
        pred_ids, mask = pad_sentences(preds, offsets)
        gold_ids, _ = pad_sentences(gold, offsets)
        self.metrics[stage].update(pred_ids, gold_ids, mask)

    def compute(self, stage: str) -> dict[str, float]:
        self._score_windows(stage)
        return super().compute(stage)

    def _score_windows(self, stage: str) -> None:
        """Merge the buffered windows (gathered from every process) and score them once."""
        windows, self._windows[stage] = self._windows[stage], []
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, windows)
            if dist.get_rank() != 0:
                return  # rank 0 adds them; metric states are summed across ranks
            windows = [w for part in gathered for w in part]
        if not windows:
            return
        metric = self.metrics[stage]
        sids, offsets, owned, preds, gold = zip(*windows)
        merged_pred = merge_window_predictions(preds, sids, offsets, owned)
        merged_gold = merge_window_predictions(gold, sids, offsets, owned)
        for sid, pred in merged_pred.items():
            p = torch.tensor([pred], device=metric.tp.device)
            g = torch.tensor([merged_gold[sid]], device=metric.tp.device)
            metric.update(p, g)
