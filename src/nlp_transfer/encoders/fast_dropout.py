"""Dropout with cheap random masks on CPU, for transformers encoders.

PyTorch draws a CPU dropout mask one Bernoulli sample at a time (about 4 ns per element on
a 2-core EPYC): that was 14 % of a MiniLM fine-tuning step, more than the attention matmuls.
Here the mask comes from 16 random bits per element, drawn as 64-bit integers (four elements
per draw) and compared with a threshold: the same drop probability (rounded to 1/65536), the
same 1/(1-p) scaling of kept values, about five times cheaper. Other devices keep torch's
dropout, whose GPU kernels are already cheap.

``install_fast_dropout`` swaps a model's ``nn.Dropout`` modules for :class:`FastDropout` and,
for models on transformers' attention interface with SDPA, switches attention to
:func:`fast_dropout_attention` (SDPA's own math path draws its dropout mask with Bernoulli
samples too). Evaluation is unchanged: without dropout the attention call is SDPA itself.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

ATTENTION_NAME = "sdpa_fast_dropout"
_LEVELS = 1 << 16  # random levels per element (16 bits)


def scaled_keep_mask(
    shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Dropout multipliers: ``1/(1-p)`` with probability ``1 - p``, else 0 (p to 1/65536)."""
    dropped_levels = round(p * _LEVELS)
    if dropped_levels <= 0:
        return torch.ones(shape, dtype=dtype, device=device)
    if dropped_levels >= _LEVELS:
        return torch.zeros(shape, dtype=dtype, device=device)
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None)  # the full 64-bit range: every 16-bit piece uniform
    bits = words.view(torch.int16)[:n].view(shape)
    # bits are uniform on [-32768, 32767] and kept when bits >= t, probability (32768-t)/65536;
    # clamping to [t-1, t] and subtracting t-1 gives 0/1 without int16 overflow and without a
    # bool tensor (elementwise ops on bool are not vectorised on CPU and cost 5-10x more)
    t = dropped_levels - _LEVELS // 2
    keep = bits.clamp(t - 1, t).sub_(t - 1)
    return keep.to(dtype).mul_(1.0 / (1.0 - p))


class _Multiply(torch.autograd.Function):
    """``x * mask`` with a constant mask, saving only the mask for backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Drop-in for ``F.dropout`` (not in place) that draws cheap masks for CPU tensors."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not 0.0 < p < 1.0:
        return nn.functional.dropout(x, p, training)
    return _Multiply.apply(x, scaled_keep_mask(x.shape, p, x.dtype, x.device))


class FastDropout(nn.Dropout):
    """``nn.Dropout`` whose CPU masks come from :func:`scaled_keep_mask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(x)
        return fast_dropout(x, self.p, self.training)


def fast_dropout_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: SDPA, except training on CPU with dropout.

    That case runs SDPA's math path written out (scores, mask, softmax, dropout, values)
    with :func:`fast_dropout` on the attention probabilities, for bidirectional attention
    under a padding mask or none. Causal (decided as transformers' SDPA function decides
    it), grouped-query and position-bias attention always go to SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    is_causal = kwargs.get("is_causal")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = query.shape[2] > 1 and attention_mask is None and is_causal
    plain = (
        not causal
        and getattr(module, "num_key_value_groups", 1) == 1
        and kwargs.get("position_bias") is None
    )
    if dropout == 0.0 or query.device.type != "cpu" or not plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scale)
    dead_rows = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = torch.where(attention_mask, scores, torch.finfo(scores.dtype).min)
            dead_rows = ~attention_mask.any(dim=-1, keepdim=True)  # no key at all to attend
        else:
            scores = scores + attention_mask
    # at least fp32 softmax: the CPU kernel is 2.5x slower on bf16 input than on fp32
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    if dead_rows is not None and bool(dead_rows.any()):
        probs = probs.masked_fill(dead_rows, 0.0)  # as SDPA: zeros, not a uniform average
    out = torch.matmul(fast_dropout(probs.to(value.dtype), dropout), value)
    return out.transpose(1, 2).contiguous(), None


def _register() -> bool:
    """Register :func:`fast_dropout_attention` (and SDPA's mask) with transformers.

    At import: a model pickled with this attention set (``ddp_spawn``, joblib) needs the
    name registered in the process that unpickles it, which imports this module for the
    :class:`FastDropout` modules it holds.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError:  # transformers before the attention interface: torch's SDPA dropout
        return False
    AttentionInterface.register(ATTENTION_NAME, fast_dropout_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    return True


_REGISTERED = _register()


def swap_dropout(model: nn.Module) -> int:
    """Replace every ``nn.Dropout`` in ``model`` by :class:`FastDropout`; returns the count."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, FastDropout(child.p, child.inplace))
                swapped += 1
    return swapped


def install_fast_dropout(model: nn.Module) -> int:
    """:func:`swap_dropout`, and attention moved to :func:`fast_dropout_attention` when the
    model uses SDPA through transformers' attention interface (other models keep theirs)."""
    swapped = swap_dropout(model)
    config = getattr(model, "config", None)
    can_switch = getattr(model, "_can_set_attn_implementation", None)
    if (
        _REGISTERED
        and getattr(config, "_attn_implementation", None) == "sdpa"
        and callable(can_switch)
        and can_switch()
        and hasattr(model, "set_attn_implementation")
    ):
        model.set_attn_implementation(ATTENTION_NAME)
    return swapped
