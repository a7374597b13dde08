"""Heads: sentence heads, word (token) heads, CRF and BiLSTM word heads, sklearn heads."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from nlp_transfer.errors import ConfigError
from nlp_transfer.heads.base import HEAD_CONTEXT


def head_class(head: Callable[..., Any]) -> type:
    """The class a head factory builds (the factory itself, or the class of a partial)."""
    target = head
    while isinstance(target, functools.partial):
        target = target.func
    if not isinstance(target, type):
        raise ConfigError(
            f"head {head!r}: a head factory must be a class or a partial of one "
            "(head._target_ names the class)"
        )
    return target


def head_kwargs(
    head: Callable[..., Any],
    input_size: int,
    labels: Sequence[str],
    encoder_hidden_size: int,
) -> dict[str, Any]:
    """Constructor arguments for a head factory: ``input_size`` and ``num_labels`` always,
    plus the :data:`~nlp_transfer.heads.base.HEAD_CONTEXT` its class declares in
    ``context_args``."""
    cls = head_class(head)
    if not hasattr(cls, "context_args"):  # the Head protocol requires it
        raise ConfigError(
            f"head {cls.__module__}.{cls.__qualname__} declares no context_args: set "
            f"context_args = () (or a tuple of {sorted(HEAD_CONTEXT)}) on the class, or "
            "subclass nlp_transfer.heads.base.HeadBase"
        )
    wanted = tuple(cls.context_args)
    unknown = sorted(set(wanted) - set(HEAD_CONTEXT))
    if unknown:
        raise ConfigError(
            f"head {cls.__qualname__}.context_args asks for {unknown}; a head can be given "
            f"{sorted(HEAD_CONTEXT)}"
        )
    offered = {"labels": list(labels), "encoder_hidden_size": encoder_hidden_size}
    kwargs: dict[str, Any] = {"input_size": input_size, "num_labels": len(labels)}
    kwargs.update({k: offered[k] for k in wanted})
    return kwargs
