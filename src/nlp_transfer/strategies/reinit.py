"""Re-initialise the top layers before fine-tuning (Zhang et al., 2021, "Revisiting
Few-sample BERT Fine-tuning"): the top pre-trained layers are often too task-specific.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nlp_transfer.strategies.base import TransferStrategy, WrappedStrategy
from nlp_transfer.strategies.simple import FullFineTuning

if TYPE_CHECKING:
    from nlp_transfer.module import TransferModule


def _hf_model(encoder: nn.Module) -> nn.Module | None:
    """The transformers model inside an encoder (unwrapping PEFT), if it has ``_init_weights``."""
    model = getattr(encoder, "model", None)
    if model is not None and hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model if model is not None and hasattr(model, "_init_weights") else None


def _initializer_range(encoder: nn.Module) -> float:
    config = getattr(getattr(encoder, "model", None), "config", None)
    return float(getattr(config, "initializer_range", None) or 0.02)


def _clear_hf_flags(module: nn.Module) -> None:
    """Drop transformers' ``_is_hf_initialized`` marks; with them set (every
    ``from_pretrained`` model), ``_init_weights`` silently leaves tensors unchanged."""
    for obj in [*module.modules(), *module.parameters(), *module.buffers()]:
        if getattr(obj, "_is_hf_initialized", False):
            obj._is_hf_initialized = False


@torch.no_grad()
def _fallback_init(module: nn.Module, std: float) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0.0, std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                m.weight.fill_(1.0)
            if m.bias is not None:
                m.bias.zero_()
        elif not list(m.children()) and hasattr(m, "reset_parameters"):
            m.reset_parameters()


def reinit_layer_group(encoder: nn.Module, group: nn.Module) -> None:
    """Re-initialise one layer group in place with the model's own initialisation.

    Uses the transformers model's ``_init_weights`` when there is one, else
    ``normal(0, initializer_range)`` for linear/embedding weights, zero biases, unit norms.
    Draws from torch's global RNG.
    """
    hf = _hf_model(encoder)
    if hf is None:
        _fallback_init(group, _initializer_range(encoder))
        return
    _clear_hf_flags(group)
    with torch.no_grad():
        for m in group.modules():
            hf._init_weights(m)


class ReinitTopK(WrappedStrategy):
    """Re-initialise the top ``k`` encoder layer groups, then apply ``base``.

    Args:
        k: layer groups to re-initialise, from the top (valid: 0..L+1; L+1 includes the
            embeddings). Parameters outside every layer group (e.g. BERT's pooler) are kept.
        base: what trains afterwards (default: full fine-tuning).
        seed: if given, re-initialise from ``torch.manual_seed(seed)`` in a forked RNG (the
            global stream is untouched); else from the global RNG, i.e. deterministic under
            the run's global seed.
        lr_decay: optional layer-wise LR decay; replaces ``base.lr_decay`` when set.
    """

    name = "reinit_top_k"

    def __init__(
        self,
        k: int,
        base: TransferStrategy | None = None,
        seed: int | None = None,
        lr_decay: float | None = None,
    ) -> None:
        super().__init__(lr_decay=lr_decay)
        if int(k) < 0:
            raise ValueError(f"reinit_top_k: k must be >= 0, got {k}")
        self.k = int(k)
        self.base = base if base is not None else FullFineTuning()
        self.seed = seed
        if self.lr_decay is None:
            self.lr_decay = self.base.lr_decay
        else:
            self.base.lr_decay = self.lr_decay

    def reinit(self, module: TransferModule) -> None:
        """Re-initialise the top ``k`` layer groups of ``module.encoder``."""
        groups = module.encoder.layer_groups()
        if self.k > len(groups):
            raise ValueError(
                f"reinit_top_k: k={self.k} but the encoder has {len(groups)} layer groups; "
                f"valid k: 0..{len(groups)}"
            )
        targets = groups[len(groups) - self.k :]
        if self.seed is None:
            ctx: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        else:
            devices = sorted(
                {p.device.index or 0 for g in targets for p in g.parameters() if p.is_cuda}
            )
            ctx = torch.random.fork_rng(devices=devices)
        with ctx:
            if self.seed is not None:
                torch.default_generator.manual_seed(self.seed)  # CPU stream only
                for device in devices:  # and the CUDA streams that fork_rng saved
                    with torch.cuda.device(device):
                        torch.cuda.manual_seed(self.seed)
            for group in targets:
                reinit_layer_group(module.encoder, group)

    def apply(self, module: TransferModule) -> None:
        self.reinit(module)
        self.base.apply(module)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "k": self.k,
            "seed": self.seed,
            "base": self.base.describe(),
        }
