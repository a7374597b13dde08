"""Vocabulary embeddings accumulate their gradient into one buffer kept across steps.

A dense ``nn.Embedding`` backward allocates a fresh vocabulary-sized gradient every step
(30,522 x 384 floats, 47 MB, for MiniLM) and fills it with zeros; the optimizer's
``zero_grad(set_to_none=True)`` frees it again. On CPU the fresh pages are what costs: the
zero fill ran at a tenth of memory bandwidth and, with the free, took about 10 ms of a
~110 ms step. With this callback the embedding produces a sparse gradient (the rows of the
batch's tokens), which is added into a dense buffer that is zeroed, not reallocated, each
step (later micro-batches of an accumulated step add into it in place). The optimizer sees
the same dense gradient, and none when the table took no part in the step, so the update
is unchanged (exact AdamW, not a lazy variant).

The callback also knows which rows of the buffer can be non-zero: the rows of every sparse
gradient since the buffer was last cleared (recorded by a gradient hook, so micro-batches
that autograd adds straight into the buffer under gradient accumulation count too). The
next step clears only those rows instead of the whole table, and :meth:`total_grad_norm`
reads only those rows for gradient clipping: the same values (every other row is zero),
without two full passes over a 47 MB buffer per step. Code that writes into the gradient of rows a
batch did not touch (gradient noise, for example) breaks that assumption; set
``model.embedding_grad_buffer=false`` for it. Scaling or clipping gradients keeps zeros
zero and is fine.

Single-process CPU runs only: DDP buckets dense gradients, and GPUs' caching allocator does
not pay for fresh memory. Tables that are frozen when training starts, or wrapped by PEFT
(LoRA on embeddings reads the base layer's ``sparse`` flag), keep dense gradients.

With a lazy optimizer (:class:`~nlp_transfer.training.lazy_adamw.LazyAdamW`,
``optimizer=lazy_adamw``) there is no buffer: the gradient stays sparse (coalesced after
every backward) for the optimizer to update only its rows. That works on any single
device; under DDP the tables keep dense gradients and the update is plain AdamW.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import SingleDeviceStrategy
from torch import nn

from nlp_transfer.training.grad_norm import total_norm
from nlp_transfer.training.lazy_adamw import LazyAdamW

log = logging.getLogger(__name__)


class EmbeddingGradBuffer(pl.Callback):
    """Reuse one gradient buffer for every trainable embedding with ``>= min_rows`` rows.

    Args:
        min_rows: smaller tables (positions, token types) keep dense gradients; their
            allocation is cheap.
    """

    def __init__(self, min_rows: int = 4096) -> None:
        self.min_rows = min_rows
        self._buffers: dict[nn.Embedding, torch.Tensor] = {}
        # rows of each buffer that may be non-zero (the indices of its sparse gradients)
        self._dirty: dict[nn.Embedding, list[torch.Tensor]] = {}
        self._hooks: list[Any] = []
        self.lazy = False  # keep gradients sparse for a LazyAdamW

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        self.lazy = uses_lazy_optimizer(pl_module)
        device = strategy.root_device.type if isinstance(strategy, SingleDeviceStrategy) else None
        # the buffer pays off on CPU only; sparse embedding gradients are tested on CPU and CUDA
        if device not in (("cpu", "cuda") if self.lazy else ("cpu",)):
            if self.lazy:
                log.warning(
                    "optimizer LazyAdamW under %s on %s: embeddings keep dense gradients, "
                    "so their update is plain AdamW",
                    type(strategy).__name__,
                    device or "several processes",
                )
            log.info("EmbeddingGradBuffer: off (%s)", type(strategy).__name__)
            return
        wrapped = {  # PEFT layers keep the layer they adapt as ``base_layer``
            id(base)
            for m in pl_module.modules()
            if isinstance(base := getattr(m, "base_layer", None), nn.Module)
        }
        for module in pl_module.modules():
            if (
                type(module) is nn.Embedding
                and module.num_embeddings >= self.min_rows
                and module.weight.requires_grad
                and module.max_norm is None
                and not module.sparse
                and id(module) not in wrapped
            ):
                module.sparse = True  # read by F.embedding at every forward
                self._buffers[module] = torch.empty(0)
                if not self.lazy:  # the row record serves the dense buffer only
                    self._dirty[module] = []
                    self._hooks.append(module.weight.register_hook(self._recorder(module)))
        if self.lazy and not self._buffers:
            log.warning(
                "optimizer LazyAdamW: no trainable vocabulary embedding (>= %d rows) when "
                "training starts, so every update is plain AdamW (a table unfrozen later, "
                "as by gradual unfreezing, keeps dense gradients)",
                self.min_rows,
            )

    def _recorder(self, module: nn.Embedding) -> Callable[[torch.Tensor], None]:
        dirty = self._dirty[module]

        def record(grad: torch.Tensor) -> None:
            rows = grad._indices()[0].unique() if grad.is_sparse else None
            if rows is not None and sum(len(r) for r in dirty) + len(rows) < module.num_embeddings:
                dirty.append(rows)
            else:  # a dense gradient, or as many rows as the table: clear it all next time
                dirty[:] = [torch.arange(module.num_embeddings, device=grad.device)]

        return record

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for module in self._buffers:
            weight = module.weight
            grad = weight.grad
            if grad is None or not grad.is_sparse:
                continue  # no part in this step, or already the buffer (accumulation)
            if self.lazy:  # summed duplicate rows: norms and the update read them once
                weight.grad = grad.coalesce()
                continue
            buffer = self._buffers[module]
            dirty = self._dirty[module]
            rows = grad._indices()[0]
            if (
                buffer.shape != weight.shape
                or buffer.dtype != grad.dtype
                or buffer.device != grad.device
            ):
                buffer = self._buffers[module] = torch.zeros_like(weight, dtype=grad.dtype)
            else:  # the rows written since the last clear, this step's among them
                buffer.index_fill_(0, torch.cat(dirty), 0)
            # from the gradient itself, not the hook's record: also right for a gradient set
            # without a backward pass
            dirty[:] = [rows.unique()]  # later micro-batches of this step append theirs
            buffer.index_add_(0, rows, grad._values())
            weight.grad = buffer

    def total_grad_norm(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """The 2-norm of all of ``params``' gradients together (:func:`total_norm`); a
        buffered table's part comes from its written rows."""
        rows_of = {
            id(m.weight): dirty
            for m, dirty in self._dirty.items()
            if dirty
            and m.weight.grad is self._buffers[m]
            and sum(len(r) for r in dirty) < m.num_embeddings  # else: the whole table
        }
        parts = []
        for p in params:
            if p.grad is None:
                continue
            dirty = rows_of.get(id(p))
            if dirty is None:
                parts.append(p.grad)
            else:
                parts.append(p.grad.index_select(0, torch.unique(torch.cat(dirty))))
        return total_norm(parts)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()  # Lightning does not call teardown when fit fails

    def _restore(self) -> None:
        """Dense gradients again, hooks removed, buffers dropped."""
        for module in self._buffers:
            module.sparse = False
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._buffers.clear()
        self._dirty.clear()


def uses_lazy_optimizer(pl_module: pl.LightningModule) -> bool:
    """Whether the module's optimizer (``optimizer_factory``, a partial) is a LazyAdamW."""
    factory = getattr(pl_module, "optimizer_factory", None)
    target = getattr(factory, "func", factory)
    return isinstance(target, type) and issubclass(target, LazyAdamW)
