"""Pool subword (token) features into word features for word-level sequence labelling.

Public API::

    POOLING_MODES = ("first", "last", "mean", "first_last")
    SubwordPooling(mode="first")
        .forward(token_features [B, T, H], word_map [B, T], num_words: int) -> [B, W, H']
        .output_size(hidden: int) -> int            # H' = 2H for "first_last", else H

``word_map[b, t]`` is the (window-local) word index of subtoken ``t`` or ``-1`` for special
tokens and padding, as produced by :func:`nlp_transfer.data.alignment.collate_aligned`; indices
``>= num_words`` are ignored too. A word with no subtoken (e.g. one the tokenizer drops) gets a
zero vector. Everything is vectorised with scatter/gather; no Python loop over tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from nlp_transfer.errors import ConfigError

POOLING_MODES: tuple[str, ...] = ("first", "last", "mean", "first_last")


class SubwordPooling(nn.Module):
    """Subtoken features ``[B, T, H]`` -> word features ``[B, W, H]`` (``2H`` for first_last)."""

    def __init__(self, mode: str = "first") -> None:
        super().__init__()
        if mode not in POOLING_MODES:
            raise ConfigError(
                f"subword pooling mode {mode!r} is not valid; choose one of {list(POOLING_MODES)}"
            )
        self.mode = mode

    def output_size(self, hidden: int) -> int:
        """Feature size of a word given the encoder's hidden size."""
        return 2 * hidden if self.mode == "first_last" else hidden

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"

    @staticmethod
    def _gather(features: torch.Tensor, index: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``features[b, index[b, w]]``, zero where ``present`` is False."""
        hidden = features.shape[-1]
        safe = index.clamp(0, max(features.shape[1] - 1, 0))
        out = torch.gather(features, 1, safe.unsqueeze(-1).expand(-1, -1, hidden))
        return out * present.unsqueeze(-1).to(out.dtype)

    def forward(
        self, token_features: torch.Tensor, word_map: torch.Tensor, num_words: int
    ) -> torch.Tensor:
        """Pool ``token_features`` ``[B, T, H]`` into ``[B, num_words, H']`` by ``word_map``."""
        batch, length, hidden = token_features.shape
        if word_map.shape != (batch, length):
            raise ValueError(
                f"word_map has shape {tuple(word_map.shape)}, expected {(batch, length)}"
            )
        device = token_features.device
        if length == 0:
            return token_features.new_zeros(batch, num_words, self.output_size(hidden))
        word_map = word_map.to(device=device, dtype=torch.long)
        valid = (word_map >= 0) & (word_map < num_words)
        # invalid subtokens go to a dump slot at index num_words, dropped at the end
        slot = torch.where(valid, word_map, torch.full_like(word_map, num_words))
        counts = torch.zeros(batch, num_words + 1, device=device, dtype=torch.long)
        counts.scatter_add_(1, slot, torch.ones_like(slot))
        present = counts[:, :num_words] > 0
        if self.mode == "mean":
            sums = torch.zeros(
                batch, num_words + 1, hidden, device=device, dtype=token_features.dtype
            )
            sums.scatter_add_(1, slot.unsqueeze(-1).expand(-1, -1, hidden), token_features)
            denom = counts[:, :num_words].clamp(min=1).unsqueeze(-1).to(token_features.dtype)
            return sums[:, :num_words] / denom
        positions = torch.arange(length, device=device).expand(batch, length)
        result = []
        if self.mode in ("first", "first_last"):
            first = torch.full((batch, num_words + 1), length, device=device, dtype=torch.long)
            first.scatter_reduce_(1, slot, positions, reduce="amin", include_self=True)
            result.append(self._gather(token_features, first[:, :num_words], present))
        if self.mode in ("last", "first_last"):
            last = torch.full((batch, num_words + 1), -1, device=device, dtype=torch.long)
            last.scatter_reduce_(1, slot, positions, reduce="amax", include_self=True)
            result.append(self._gather(token_features, last[:, :num_words], present))
        return result[0] if len(result) == 1 else torch.cat(result, dim=-1)
