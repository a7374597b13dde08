"""The encoder contract every encoder implements."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Encoder(nn.Module):
    """A text encoder returning *all* hidden states.

    Subclasses set ``hidden_size`` and ``num_layers`` and implement :meth:`forward` and
    :meth:`layer_groups`. ``forward`` returns ``num_layers + 1`` tensors of shape
    ``[batch, seq, hidden]``: index 0 is the embedding output, index ``i`` the output of
    layer ``i`` (1-based), so ``hidden_states[-1]`` is the top layer.
    """

    hidden_size: int
    num_layers: int
    max_length: int = 512

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def layer_groups(self) -> list[nn.Module]:
        """Modules ordered bottom-up: ``[embeddings, layer_1, ..., layer_L]``.

        Strategies address layers by this index (0 = embeddings).
        """
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """A JSON-able description (name, revision, weights hash) used for cache keys."""
        return {"class": type(self).__name__}


# Every encoder also exposes ``self.tokenizer``: a transformers *fast* tokenizer (it must
# support ``is_split_into_words=True`` and ``BatchEncoding.word_ids()``), used by the
# datamodules so that data and encoder always agree.
