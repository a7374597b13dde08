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


class _Tagger(_Mine):
    """A user's head that asks for the label vocabulary."""

    context_args = ("labels",)

    def __init__(self, input_size: int, num_labels: int, labels: list[str]) -> None:
        super().__init__()
        self.labels = labels


def test_heads_get_the_context_their_class_declares_and_nothing_else() -> None:
    from functools import partial

    from nlp_transfer.heads import head_kwargs

    labels = ["O", "B-X", "I-X"]
    assert head_kwargs(partial(_Tagger), 8, labels, 32) == {
        "input_size": 8,
        "num_labels": 3,
        "labels": labels,
    }
    assert head_kwargs(partial(TokenHead, dropout=0.0), 8, labels, 32) == {
        "input_size": 8,
        "num_labels": 3,
    }
    assert set(head_kwargs(BiLSTMTokenHead, 8, labels, 32)) == {
        "input_size",
        "num_labels",
        "labels",
        "encoder_hidden_size",
    }
    with pytest.raises(ConfigError, match=r"_NoDecoding declares no context_args.*HeadBase"):
        head_kwargs(_NoDecoding, 8, labels, 32)

    class _Greedy(HeadBase):
        context_args = ("labels", "tokenizer")

    with pytest.raises(ConfigError, match=r"asks for \['tokenizer'\].*'encoder_hidden_size'"):
        head_kwargs(_Greedy, 8, labels, 32)
    with pytest.raises(ConfigError, match="must be a class or a partial of one"):
        head_kwargs(lambda **kw: _Mine(), 8, labels, 32)
