"""BiLSTM word-labelling head: the feature-based NER setup of BERT (Devlin et al. 2019, §5.3).

A randomly initialised bidirectional LSTM reads the word features (any layer pooling,
cached or live), and a per-word classifier — softmax, or a linear-chain CRF with
``crf=true`` — labels its outputs. Same API as :class:`~nlp_transfer.heads.token.TokenHead`.

The paper uses two layers of 768 units on BERT-base (hidden size 768), so ``hidden_size``
defaults to the encoder's hidden size, whatever the layer pooling feeds in (concatenating
four layers widens the input, not the LSTM).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nlp_transfer.errors import ConfigError
from nlp_transfer.heads.crf import CRFHead
from nlp_transfer.heads.token import TokenHead


class BiLSTMTokenHead(nn.Module):
    """``Dropout -> BiLSTM (num_layers) -> Dropout -> linear/CRF classifier`` per word.

    Args:
        input_size: width of the word features.
        num_labels: number of tags.
        labels: the id -> tag list (needed for a constrained CRF).
        encoder_hidden_size: the encoder's hidden size, the default LSTM width.
        hidden_size: LSTM units per direction; ``None`` = ``encoder_hidden_size``.
        num_layers: stacked BiLSTM layers (the paper: 2).
        dropout: on the LSTM's input, between its layers and on its output.
        crf: a linear-chain CRF on top instead of independent softmaxes.
        constrained, scheme: as for :class:`~nlp_transfer.heads.crf.CRFHead`.
    """

    task = "sequence_labeling"  # the task it fits (checked at start: nlp_transfer.validation)
    context_args = ("labels", "encoder_hidden_size")  # nlp_transfer.heads.base.HEAD_CONTEXT

    def __init__(
        self,
        input_size: int,
        num_labels: int,
        labels: Sequence[str] | None = None,
        encoder_hidden_size: int | None = None,
        hidden_size: int | None = None,
        num_layers: int = 2,
        dropout: float = 0.1,
        crf: bool = False,
        constrained: bool = True,
        scheme: str = "IOB2",
    ) -> None:
        super().__init__()
        width = hidden_size if hidden_size is not None else encoder_hidden_size or input_size
        if not isinstance(width, int) or width < 1:
            raise ConfigError(f"head.hidden_size={hidden_size!r}: must be a whole number >= 1")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ConfigError(f"head.num_layers={num_layers!r}: must be a whole number >= 1")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"head.dropout={dropout!r}: must be in [0, 1)")
        if not isinstance(crf, bool):
            raise ConfigError(f"head.crf={crf!r}: must be true or false")
        self.hidden_size, self.num_layers = width, num_layers
        self.num_labels = num_labels
        self.input_dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(
            input_size,
            width,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        # the classifier's own dropout is the LSTM's output dropout
        self.classifier: TokenHead | CRFHead = (
            CRFHead(
                2 * width,
                num_labels,
                labels=labels,
                scheme=scheme,
                constrained=constrained,
                dropout=dropout,
            )
            if crf
            else TokenHead(2 * width, num_labels, dropout=dropout)
        )

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Word features ``[B, W, H]`` -> logits (or CRF emissions) ``[B, W, C]``.

        The LSTM runs over the first ``mask.sum(1)`` words of each row (packed, so padding
        never reaches the backward direction); padded positions get the classifier's
        output for a zero vector and are ignored by the loss and the metrics.
        """
        x = self.input_dropout(features)
        if mask is None:
            out, _ = self.lstm(x)
        else:
            lengths = mask.sum(1).clamp(min=1).cpu()
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, _ = self.lstm(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.classifier(out, mask)

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.classifier.loss(logits, labels, mask)

    def decode(self, logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier.decode(logits, mask)

    def probabilities(self, logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier.probabilities(logits, mask)
