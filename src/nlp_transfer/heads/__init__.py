"""Heads: sentence heads, word (token) heads, CRF and BiLSTM word heads, sklearn heads."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

# what a head may ask for beyond its input width and label count, by naming it as a parameter
OPTIONAL_HEAD_ARGS = ("labels", "encoder_hidden_size")


def head_kwargs(
    head: Callable[..., Any],
    input_size: int,
    labels: Sequence[str],
    encoder_hidden_size: int,
) -> dict[str, Any]:
    """Constructor arguments for a head partial: ``input_size`` and ``num_labels`` always;
    ``labels`` (e.g. a constrained CRF) and ``encoder_hidden_size`` (e.g. the BiLSTM's
    default width) only for heads whose signature names them."""
    kwargs: dict[str, Any] = {"input_size": input_size, "num_labels": len(labels)}
    offered = {"labels": list(labels), "encoder_hidden_size": encoder_hidden_size}
    params = inspect.signature(head).parameters
    kwargs.update({k: v for k, v in offered.items() if k in params})
    return kwargs
