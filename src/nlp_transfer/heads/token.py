"""Word-level (token) classification head: linear, or a one-hidden-layer MLP.

Public API (shared with :class:`~nlp_transfer.heads.crf.CRFHead`)::

    TokenHead(input_size, num_labels, hidden_dim=None, dropout=0.1, activation="gelu")
        .forward(features [B, W, H], mask [B, W] bool) -> logits [B, W, C]
        .loss(logits, labels [B, W] (-100 = ignore), mask) -> scalar (mean over kept words)
        .decode(logits, mask) -> LongTensor [B, W]   (argmax; pad positions arbitrary)
        .probabilities(logits, mask) -> [B, W, C]

A word counts in the loss when ``mask`` is True and its label is not ``-100`` (e.g. window
words owned by another window, see :mod:`nlp_transfer.data.alignment`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nlp_transfer.errors import ConfigError
from nlp_transfer.heads.base import HeadBase

IGNORE_INDEX = -100
ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


def build_classifier(
    input_size: int,
    num_labels: int,
    hidden_dim: int | None,
    dropout: float,
    activation: str,
) -> nn.Module:
    """``Dropout -> Linear`` or ``Dropout -> Linear -> act -> Dropout -> Linear``."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"head.activation={activation!r}: choose one of {list(ACTIVATIONS)}")
    if num_labels < 1:
        raise ConfigError(f"num_labels={num_labels} must be >= 1")
    if not hidden_dim:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(input_size, num_labels))
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(input_size, hidden_dim),
        ACTIVATIONS[activation](),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, num_labels),
    )


class TokenHead(HeadBase):
    """Independent per-word softmax classifier over word features."""

    task = "sequence_labeling"  # the task it fits (checked at start: nlp_transfer.validation)

    # scores each position on its own: trains on subtokens as well (label_all_subtokens)
    per_position_loss = True

    def __init__(
        self,
        input_size: int,
        num_labels: int,
        hidden_dim: int | None = None,
        dropout: float = 0.1,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.classifier = build_classifier(input_size, num_labels, hidden_dim, dropout, activation)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Word features ``[B, W, H]`` -> logits ``[B, W, C]`` (``mask`` is unused)."""
        return self.classifier(features)

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Cross-entropy averaged over words with ``mask`` True and ``labels != -100``."""
        keep = labels != IGNORE_INDEX
        if mask is not None:
            keep = keep & mask.bool()
        target = labels.masked_fill(~keep, IGNORE_INDEX).reshape(-1)
        total = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            target,
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return total / keep.sum().clamp(min=1)
