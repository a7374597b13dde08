"""The head contract: what the module, prediction and export ask of a head.

A head is an ``nn.Module`` built as ``head(input_size=..., num_labels=...)``, plus the
arguments of :data:`HEAD_CONTEXT` its class asks for in ``context_args``
(:func:`nlp_transfer.heads.head_kwargs`), with the methods of :class:`Head`. Subclass
:class:`HeadBase` to get no context, argmax decoding and softmax probabilities for free.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from nlp_transfer.errors import ConfigError

HEAD_METHODS = ("forward", "loss", "decode", "probabilities")
# what the model can tell a head beyond its input width and label count
HEAD_CONTEXT = {
    "labels": "the label vocabulary (e.g. a CRF's transition constraints)",
    "encoder_hidden_size": "the encoder's width (e.g. a BiLSTM's default size)",
}


@runtime_checkable
class Head(Protocol):
    """Scores ``[B, C]`` (one label per sentence) or ``[B, W, C]`` (one per word) from the
    features ``[B, T, D]`` and their mask ``[B, T]``."""

    #: constructor arguments (keys of :data:`HEAD_CONTEXT`) the head is built with
    context_args: ClassVar[tuple[str, ...]]

    def __call__(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The logits (emission scores for a CRF)."""
        ...

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A scalar training loss; label ``-100`` is ignored."""
        ...

    def decode(self, logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted label ids, the shape of ``labels``."""
        ...

    def probabilities(self, logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-label probabilities, the shape of ``logits`` (a CRF: its marginals)."""
        ...


class HeadBase(nn.Module):
    """Defaults for a head whose logits are independent per item: argmax and softmax, and
    no constructor arguments beyond ``input_size`` and ``num_labels``."""

    context_args: ClassVar[tuple[str, ...]] = ()

    def decode(self, logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return logits.argmax(-1)

    def probabilities(self, logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return logits.float().softmax(-1)


def check_head(head: object) -> Head:
    """``head`` if it is an ``nn.Module`` with every :class:`Head` method, else a
    ``ConfigError`` naming what is missing."""
    missing = [m for m in HEAD_METHODS if not callable(getattr(head, m, None))]
    if not isinstance(head, nn.Module) or missing:
        raise ConfigError(
            f"head {type(head).__module__}.{type(head).__qualname__}: a head must be a torch.nn.Module with "
            f"{', '.join(HEAD_METHODS)} (nlp_transfer.heads.base.Head); "
            f"{type(head).__name__} lacks {', '.join(missing) or 'nn.Module'}. Subclass "
            "nlp_transfer.heads.base.HeadBase for argmax decode and softmax probabilities."
        )
    return head  # type: ignore[return-value]
