"""The head contract (heads/base.py): shipped heads satisfy it, a head that does not is
refused when the module is built, naming what it lacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nlp_transfer.errors import ConfigError
from nlp_transfer.heads.base import Head, HeadBase, check_head
from nlp_transfer.heads.bilstm import BiLSTMTokenHead
from nlp_transfer.heads.classification import SequenceClassificationHead
from nlp_transfer.heads.crf import CRFHead
from nlp_transfer.heads.token import TokenHead


@pytest.mark.parametrize(
    "head",
    [
        SequenceClassificationHead(input_size=4, num_labels=3),
        TokenHead(input_size=4, num_labels=3),
        CRFHead(input_size=4, num_labels=3),
        BiLSTMTokenHead(input_size=4, num_labels=3, encoder_hidden_size=4),
    ],
)
def test_shipped_heads_satisfy_the_contract(head: nn.Module) -> None:
    assert isinstance(head, Head) and check_head(head) is head


class _NoDecoding(nn.Module):
    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return features

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, mask=None) -> torch.Tensor:
        return logits.sum()


class _Mine(HeadBase, _NoDecoding):
    """A user's head: forward and loss; decode and probabilities from HeadBase."""


def test_a_head_without_the_contract_is_refused_naming_what_it_lacks() -> None:
    with pytest.raises(ConfigError, match="lacks decode, probabilities.*HeadBase"):
        check_head(_NoDecoding())
    with pytest.raises(ConfigError, match="builtins.object: a head must be a torch.nn.Module"):
        check_head(object())
    mine = check_head(_Mine())
    logits = torch.tensor([[0.0, 2.0], [3.0, 1.0]])
    assert mine.decode(logits).tolist() == [1, 0]
    assert torch.allclose(mine.probabilities(logits).sum(-1), torch.ones(2))
