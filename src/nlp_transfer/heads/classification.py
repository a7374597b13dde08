"""Sentence-level heads: pool token features (CLS / mean / max), then linear or MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nlp_transfer.errors import ConfigError
from nlp_transfer.heads.base import HeadBase

POOLINGS = ("cls", "mean", "max")


def pool_tokens(features: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """``[B, T, H]`` token features → ``[B, H]`` sentence features; padding is ignored."""
    if mode == "cls":
        return features[:, 0]
    m = mask.unsqueeze(-1).to(features.dtype)
    if mode == "mean":
        return (features * m).sum(1) / m.sum(1).clamp(min=1.0)
    if mode == "max":
        return features.masked_fill(m == 0, torch.finfo(features.dtype).min).amax(1)
    raise ConfigError(f"head.pooling={mode!r} is not valid; choose one of {list(POOLINGS)}")


class SequenceClassificationHead(HeadBase):
    """Linear head (``hidden_dim=None``) or a one-hidden-layer MLP with dropout."""

    task = "classification"  # the task it fits (checked at start: nlp_transfer.validation)

    def __init__(
        self,
        input_size: int,
        num_labels: int,
        pooling: str = "cls",
        hidden_dim: int | None = None,
        dropout: float = 0.1,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(
                f"head.pooling={pooling!r} is not valid; choose one of {list(POOLINGS)}"
            )
        acts = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}
        if activation not in acts:
            raise ConfigError(f"head.activation={activation!r}: choose one of {list(acts)}")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        if hidden_dim:
            self.classifier: nn.Module = nn.Sequential(
                nn.Linear(input_size, hidden_dim),
                acts[activation](),
                nn.Dropout(dropout),
                nn.Linear(hidden_dim, num_labels),
            )
        else:
            self.classifier = nn.Linear(input_size, num_labels)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(pool_tokens(features, mask, self.pooling)))

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)
