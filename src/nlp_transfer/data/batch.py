"""The batches datamodules produce and the module reads: one declaration of their keys.

Batches stay plain dicts (Lightning moves them between devices, the prediction writer and
the multi-task sampler add keys); these ``TypedDict`` types say which keys exist, what
they hold, and who fills them. Shapes: ``B`` batch, ``T`` subtokens, ``W`` words,
``L`` hidden states (embeddings + layers), ``H`` hidden size.
"""

from __future__ import annotations

from typing import TypedDict, Union

import torch


class TokenBatch(TypedDict, total=False):
    """Tokenized text (``ClassificationDataModule.collate``)."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 1 = real subtoken
    token_type_ids: torch.Tensor  # [B, T], sentence-pair inputs only
    labels: torch.Tensor  # [B] label ids; [B, W] word tags in a WordBatch (-100: ignored)
    example_id: torch.Tensor  # [B] row of the split, for per-example predictions
    task: str  # multi-task runs: the batch's task name


class WordBatch(TokenBatch, total=False):
    """Sequence labeling windows (``SequenceLabelingDataModule.collate``, ``collate_aligned``)."""

    word_map: torch.Tensor  # [B, T] word index of each subtoken (-1: special/padding)
    word_mask: torch.Tensor  # [B, W] real words of the window
    owned_mask: torch.Tensor  # [B, W] words this window scores (overlapping windows)
    word_offset: torch.Tensor  # [B] first word of the window within its sentence
    sentence_id: torch.Tensor  # [B] sentence of the window
    sentence_words: torch.Tensor  # [B] words of the whole sentence
    subtoken_labels: torch.Tensor  # [B, T] with data.label_all_subtokens=true


class FeatureBatch(TypedDict, total=False):
    """Cached frozen-encoder features (``features/datamodule.py``): the encoder never runs."""

    hidden_states: torch.Tensor  # [B, T', L, H]: T' = 1 (pooled sentence), T or W
    feature_mask: torch.Tensor  # [B, T']
    labels: torch.Tensor
    example_id: torch.Tensor
    # word-level features carry the WordBatch keys the NER metric reads
    word_mask: torch.Tensor
    owned_mask: torch.Tensor
    word_offset: torch.Tensor
    sentence_id: torch.Tensor
    sentence_words: torch.Tensor


Batch = Union[TokenBatch, WordBatch, FeatureBatch]  # noqa: UP007 (a runtime alias)
