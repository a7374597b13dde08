"""Combine an encoder's hidden states (embeddings + every layer) into one feature tensor."""

from __future__ import annotations

import torch
from torch import nn

MODES = ("last", "layer", "sum_last_k", "concat_last_k", "scalar_mix")
COMBINES = ("concat", "sum", "mix")  # how a pooling combines the hidden states it reads


class LayerPooling(nn.Module):
    """Pool the ``num_hidden_states`` tensors ``[B, T, H]`` an encoder returns.

    Modes:
        ``last``: the top layer. ``layer``: ``hidden_states[layer]`` (0 = embeddings,
        negatives count from the top). ``sum_last_k``: sum of the top ``k``.
        ``concat_last_k``: the top ``k`` concatenated bottom-up, ``[B, T, k*H]``.
        ``scalar_mix``: ELMo's ``gamma * sum_i softmax(w)_i * h_i`` over all hidden states,
        with learned ``w`` (initialised equal) and ``gamma`` (initialised 1).

    Args:
        mode: one of :data:`MODES`.
        num_hidden_states: how many tensors the encoder returns (``num_layers + 1``).
        hidden_size: their last dimension.
        layer: the hidden state for ``mode="layer"``.
        k: how many top hidden states ``sum_last_k`` / ``concat_last_k`` use.
    """

    def __init__(
        self,
        mode: str = "last",
        *,
        num_hidden_states: int,
        hidden_size: int,
        layer: int | None = None,
        k: int = 4,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"layer pooling: unknown mode {mode!r}; valid modes: {list(MODES)}")
        if num_hidden_states < 1:
            raise ValueError(
                f"layer pooling: num_hidden_states must be >= 1, got {num_hidden_states}"
            )
        self.mode = mode
        self.num_hidden_states = int(num_hidden_states)
        self.hidden_size = int(hidden_size)
        self.layer: int | None = None
        self.k = int(k)
        n = self.num_hidden_states
        if mode == "layer":
            if layer is None or not -n <= int(layer) < n:
                raise ValueError(
                    f"layer pooling: mode 'layer' needs layer in {-n}..{n - 1} (0 = embeddings, "
                    f"{n - 1} or -1 = top layer), got {layer}"
                )
            self.layer = int(layer)
        if mode in ("sum_last_k", "concat_last_k") and not 1 <= self.k <= n:
            raise ValueError(f"layer pooling: mode {mode!r} needs k in 1..{n}, got {k}")
        if mode == "scalar_mix":
            self.mix_logits = nn.Parameter(torch.zeros(n))
            self.gamma = nn.Parameter(torch.ones(()))
        self.output_size = self.hidden_size * (self.k if mode == "concat_last_k" else 1)

    def selection(self) -> tuple[list[int], str]:
        """The hidden states this pooling reads (indices into the encoder's tuple, negatives
        from the top) and how it combines them (:data:`COMBINES`; ``mix``: learned weights).
        ``forward`` reads exactly these; feature paths that pool outside the module (the
        sklearn heads) ask here instead of re-reading the config."""
        if self.mode == "last":
            return [-1], "concat"
        if self.mode == "layer":
            return [int(self.layer)], "concat"  # type: ignore[arg-type]
        if self.mode in ("sum_last_k", "concat_last_k"):
            return list(range(-self.k, 0)), "sum" if self.mode == "sum_last_k" else "concat"
        return list(range(self.num_hidden_states)), "mix"

    def weights(self) -> torch.Tensor:
        """The softmax-normalised scalar-mix weights (``scalar_mix`` mode only)."""
        if self.mode != "scalar_mix":
            raise ValueError(f"layer pooling: weights() needs mode 'scalar_mix', not {self.mode!r}")
        return torch.softmax(self.mix_logits, dim=0)

    def forward(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if len(hidden_states) != self.num_hidden_states:
            raise ValueError(
                f"layer pooling expects {self.num_hidden_states} hidden states, "
                f"got {len(hidden_states)}"
            )
        layers, combine = self.selection()
        if combine != "mix":
            picked = [hidden_states[i] for i in layers]
            if len(picked) == 1:
                return picked[0]
            return (
                torch.stack(picked, dim=0).sum(dim=0)
                if combine == "sum"
                else torch.cat(picked, dim=-1)
            )
        w = self.weights().to(hidden_states[0].dtype)
        mixed = w[0] * hidden_states[0]
        for i in range(1, len(hidden_states)):  # no [N, B, T, H] stack: saves memory
            mixed = mixed + w[i] * hidden_states[i]
        return self.gamma.to(mixed.dtype) * mixed

    def extra_repr(self) -> str:
        extra = {"layer": f", layer={self.layer}", "scalar_mix": ""}.get(self.mode, "")
        if self.mode in ("sum_last_k", "concat_last_k"):
            extra = f", k={self.k}"
        return f"mode={self.mode!r}, num_hidden_states={self.num_hidden_states}{extra}"
