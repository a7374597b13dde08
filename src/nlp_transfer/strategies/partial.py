"""Partial fine-tuning: only some encoder layer groups train (plus every non-encoder part).

Layer groups are numbered as in :meth:`Encoder.layer_groups`: 0 = embeddings, 1..L =
layers bottom-up. Encoder parameters outside every layer group (BERT's pooler, a final
norm) follow the top layer ``L``. Heads, auxiliary heads and layer pooling always train.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from nlp_transfer.strategies.base import (
    ParamGroup,
    TransferStrategy,
    params_by_layer,
    set_requires_grad,
    trainable_groups,
)

if TYPE_CHECKING:
    from nlp_transfer.module import TransferModule


def parse_layers(layers: int | str | Iterable[int | str]) -> list[int]:
    """Parse a layer selection: ``3``, ``[1, 3]``, ``"2-4"``, ``"2:4"``, ``"0,2-4"``.

    Ranges are inclusive at both ends (``"2:4"`` = ``"2-4"`` = 2, 3, 4). Negative indices
    are rejected. Returns sorted unique indices.
    """
    items: list[int | str]
    if isinstance(layers, (int, str)):
        items = [layers]
    else:
        items = list(layers)
    out: set[int] = set()
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"invalid layer index {item!r} in {layers!r}")
        if isinstance(item, int):
            out.add(_non_negative(item, layers))
            continue
        for part in str(item).replace(" ", "").split(","):
            if not part:
                continue
            sep = next((s for s in ("-", ":") if s in part.lstrip("-")), None)
            if sep is None:
                out.add(_non_negative(_to_int(part, layers), layers))
                continue
            lo_s, hi_s = part.lstrip("-").split(sep, 1)
            lo_s = part[: len(part) - len(part.lstrip("-"))] + lo_s
            lo = _non_negative(_to_int(lo_s, layers), layers)
            hi = _non_negative(_to_int(hi_s, layers), layers)
            if hi < lo:
                raise ValueError(f"empty layer range {part!r} in {layers!r}")
            out.update(range(lo, hi + 1))
    if not out:
        raise ValueError(f"empty layer selection {layers!r}")
    return sorted(out)


def _to_int(text: str, spec: Any) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"cannot parse layer selection {spec!r}: use ints, 'a-b' or 'a:b' (inclusive), "
            "comma separated"
        ) from None


def _non_negative(index: int, spec: Any) -> int:
    if index < 0:
        raise ValueError(
            f"negative layer index {index} in {spec!r}: layer groups are numbered "
            "0 (embeddings) to L (top layer)"
        )
    return index


class LayerSubset(TransferStrategy):
    """Base of the partial presets: trains the encoder layer groups :meth:`selected`
    returns, and every non-encoder parameter."""

    name = "layers"

    def selected(self, num_groups: int) -> list[int]:
        """Indices (into ``layer_groups()``) of the trainable layer groups."""
        raise NotImplementedError

    def apply(self, module: TransferModule) -> None:
        set_requires_grad(module, True)
        buckets = params_by_layer(module.encoder)
        chosen = set(self.selected(len(buckets)))
        for i, params in enumerate(buckets):
            for p in params:
                p.requires_grad_(i in chosen)

    def param_groups(self, module: TransferModule) -> list[ParamGroup]:
        return trainable_groups(module)


class TopK(LayerSubset):
    """Only the top ``k`` encoder layer groups train (``k = L + 1`` includes embeddings).

    ``k = 0`` trains the heads only, like ``frozen`` but with the encoder in train mode.
    """

    name = "top_k"

    def __init__(self, k: int, lr_decay: float | None = None) -> None:
        super().__init__(lr_decay=lr_decay)
        if int(k) < 0:
            raise ValueError(f"top_k: k must be >= 0, got {k}")
        self.k = int(k)

    def selected(self, num_groups: int) -> list[int]:
        if self.k > num_groups:
            raise ValueError(
                f"top_k: k={self.k} but the encoder has {num_groups} layer groups "
                f"(embeddings + {num_groups - 1} layers); valid k: 0..{num_groups}"
            )
        return list(range(num_groups - self.k, num_groups))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "k": self.k}


class Layers(LayerSubset):
    """Only the listed encoder layer groups train (0 = embeddings).

    Args:
        layers: ints, or a string like ``"2-4"`` / ``"2:4"`` (inclusive) / ``"0,5-6"``.
    """

    name = "layers"

    def __init__(self, layers: int | str | Iterable[int | str], lr_decay: float | None = None):
        super().__init__(lr_decay=lr_decay)
        self.layers = parse_layers(layers)

    def selected(self, num_groups: int) -> list[int]:
        bad = [i for i in self.layers if i >= num_groups]
        if bad:
            raise ValueError(
                f"layers: invalid layer index {bad} for an encoder with {num_groups} layer "
                f"groups; valid range: 0..{num_groups - 1} (0 = embeddings, "
                f"{num_groups - 1} = top layer)"
            )
        return list(self.layers)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "layers": list(self.layers)}


class EmbeddingsOnly(LayerSubset):
    """Only the embedding layer (layer group 0) of the encoder trains, plus the heads."""

    name = "embeddings"

    def selected(self, num_groups: int) -> list[int]:
        return [0]
