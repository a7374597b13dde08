"""Speed machinery behind one seam: what a module does only to run faster.

:class:`SpeedMachinery` holds the mechanisms ``training/hardware.py`` switched on for this
machine (``model.compile``, ``model.embedding_grad_buffer``, ``model.clip_norm_shortcut``,
``encoder.fast_dropout``, ``optimizer=lazy_adamw``) and applies them through four calls
the module makes without knowing what they do: :meth:`attach` (build time),
:meth:`setup` (before fit), :meth:`callbacks` and :meth:`clip_gradients`. Each mechanism
keeps the numbers of the plain path (tests/test_speed_options.py,
tests/test_embedding_grad.py); ``benchmarks/`` measures what they save.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from pytorch_lightning import Callback

from nlp_transfer.encoders.fast_dropout import swap_dropout
from nlp_transfer.training.embedding_grad import EmbeddingGradBuffer, uses_lazy_optimizer
from nlp_transfer.training.grad_norm import total_norm

if TYPE_CHECKING:
    from pytorch_lightning import LightningModule

log = logging.getLogger(__name__)


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor ``clip_grad_norm_`` scales gradients by: ``max_norm / norm``, at most 1."""
    return (float(max_norm) / (norm + 1e-6)).clamp(max=1.0)


class SpeedMachinery:
    """The speed mechanisms of one module.

    Args:
        compile_encoder: ``torch.compile`` the encoder (dynamic shapes), in place so that
            parameter names (and checkpoints) are unchanged.
        embedding_grad_buffer: vocabulary embeddings add their gradient into one reused
            buffer (:class:`EmbeddingGradBuffer`, single-process CPU runs, not compiled).
            With ``optimizer=lazy_adamw`` the same callback keeps their gradients sparse.
        clip_norm_shortcut: with a fused optimizer, clipping by norm hands the clip factor
            to the kernel (``grad_scale``) instead of scaling every gradient first.
    """

    def __init__(
        self,
        compile_encoder: bool = False,
        embedding_grad_buffer: bool = True,
        clip_norm_shortcut: bool = True,
    ) -> None:
        self.compile_encoder = compile_encoder
        self.embedding_grad_buffer = embedding_grad_buffer and not compile_encoder
        self.clip_norm_shortcut = clip_norm_shortcut
        self.lazy_embeddings = False

    def attach(self, module: LightningModule) -> None:
        """At build time, once the strategy has decided what trains."""
        lazy = uses_lazy_optimizer(module)
        self.lazy_embeddings = lazy and not self.compile_encoder
        if self.compile_encoder and lazy:
            log.warning(
                "optimizer LazyAdamW with model.compile=true: the compiled encoder keeps "
                "dense embedding gradients, so every update is plain AdamW"
            )
        if self.compile_encoder:
            module.encoder.compile(dynamic=True)  # type: ignore[operator]

    def setup(self, module: LightningModule) -> None:
        """Before fit/eval: heads, auxiliary heads and adapters get the encoder's cheap
        dropout masks when the encoder uses them."""
        if getattr(module.encoder, "fast_dropout", False):
            swap_dropout(module)

    def callbacks(self) -> list[Callback]:
        """Model-owned callbacks: a speed setting must not vanish with ``callbacks=none``."""
        wanted = self.embedding_grad_buffer or self.lazy_embeddings
        return [EmbeddingGradBuffer()] if wanted else []

    def clip_gradients(
        self,
        module: LightningModule,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip as Lightning does, also for fused optimizers under bf16.

        Lightning's mixed-precision plugin refuses to clip for any optimizer that unscales
        gradients itself (fused AdamW), because under fp16 the gradients are still scaled
        at that point. bf16 has no loss scaler, so the gradients are already true values
        and clipping them is what the unfused path does. Clipping by norm is handed to the
        fused kernel as its ``grad_scale`` (it divides each gradient as it reads it), which
        saves a pass over all gradients; the update equals ``clip_grad_norm_`` + step.
        With ``clip_norm_shortcut`` off the gradients are scaled in place instead.
        """
        scaler = getattr(module.trainer.precision_plugin, "scaler", None)
        fused = scaler is None and getattr(optimizer, "_step_supports_amp_scaling", False)
        if fused:
            optimizer.grad_scale = None  # type: ignore[attr-defined]
        if not (gradient_clip_val and fused):
            module.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            dense = [p for p in params if not p.grad.is_sparse]
            if dense:
                torch.nn.utils.clip_grad_value_(dense, gradient_clip_val)
            for p in params:  # lazy embeddings: clamp the (summed) values of each row
                if p.grad.is_sparse:
                    p.grad = p.grad.coalesce()
                    p.grad._values().clamp_(-gradient_clip_val, gradient_clip_val)
        elif params and not self.clip_norm_shortcut:
            coef = clip_coefficient(total_norm([p.grad for p in params]), gradient_clip_val)
            dense = [p.grad for p in params if not p.grad.is_sparse]
            if dense:
                torch._foreach_mul_(dense, coef)
            for p in params:
                if p.grad.is_sparse:  # lazy embeddings: scale the (summed) row values
                    p.grad = p.grad.coalesce()
                    p.grad._values().mul_(coef)
        elif params:
            # looked up, not kept here: the callback's hooks do not pickle
            callbacks = getattr(module._trainer, "callbacks", None) or []
            buffer = next((c for c in callbacks if isinstance(c, EmbeddingGradBuffer)), None)
            if buffer is not None:  # reads only the written rows of embedding gradients
                norm = buffer.total_grad_norm(params)
            else:
                norm = total_norm([p.grad for p in params])
            coef = clip_coefficient(norm, gradient_clip_val)
            optimizer.grad_scale = coef.reciprocal().float()  # type: ignore[attr-defined]


class SpeedClipping:
    """LightningModule mixin: gradient clipping through the module's ``self.speed``."""

    speed: SpeedMachinery

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        self.speed.clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)  # type: ignore[arg-type]
