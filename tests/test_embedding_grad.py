"""EmbeddingGradBuffer: the same AdamW updates as dense embedding gradients, one buffer reused."""

from __future__ import annotations

import types

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nlp_transfer.training.embedding_grad import EmbeddingGradBuffer


class _Bag(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(5000, 8, padding_idx=0)
        self.pos = nn.Embedding(16, 8)
        self.out = nn.Linear(8, 3)
        self.grad_ptrs: list[int] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids, y = batch
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1]))
        return nn.functional.cross_entropy(self.out(h.mean(1)), y)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grad = self.emb.weight.grad
        assert grad is not None and not grad.is_sparse
        self.grad_ptrs.append(grad.data_ptr())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)


def _fit(callbacks: list[pl.Callback], accumulate: int = 1) -> _Bag:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 5000, (48, 6), generator=g)
    ids[:, 4:] = 0  # padding rows get no gradient in either path
    data = TensorDataset(ids, torch.randint(0, 3, (48,), generator=g))
    model = _Bag()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        callbacks=callbacks,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=8))
    return model


@pytest.mark.parametrize("accumulate", [1, 2])
def test_same_updates_as_dense_gradients(accumulate: int) -> None:
    dense = _fit([], accumulate)
    buffered = _fit([EmbeddingGradBuffer(min_rows=1000)], accumulate)
    for (name, a), b in zip(dense.named_parameters(), buffered.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert not buffered.emb.sparse  # restored at teardown
    assert len(set(buffered.grad_ptrs)) == 1  # one buffer for every step


def test_small_tables_and_multi_process_runs_stay_dense() -> None:
    model = _Bag()
    callback = EmbeddingGradBuffer(min_rows=1000)
    callback.setup(types.SimpleNamespace(world_size=1), model, "fit")  # type: ignore[arg-type]
    assert model.emb.sparse and not model.pos.sparse
    other = _Bag()
    EmbeddingGradBuffer().setup(types.SimpleNamespace(world_size=2), other, "fit")  # type: ignore[arg-type]
    assert not other.emb.sparse


def test_frozen_embedding_gets_no_buffer() -> None:
    model = _Bag()
    model.emb.weight.requires_grad_(False)
    callback = EmbeddingGradBuffer(min_rows=1000)
    callback.setup(types.SimpleNamespace(world_size=1), model, "fit")  # type: ignore[arg-type]
    callback.on_before_backward(None, model, torch.zeros(()))  # type: ignore[arg-type]
    assert model.emb.weight.grad is None
