"""EmbeddingGradBuffer: the same AdamW updates as dense embedding gradients, one buffer reused."""

from __future__ import annotations

import os
import pickle
import types

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nlp_transfer.training.embedding_grad import EmbeddingGradBuffer
from tests.conftest import quiet_trainer


class _Bag(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(5000, 8, padding_idx=0)
        self.pos = nn.Embedding(16, 8)
        self.out = nn.Linear(8, 3)
        self.grad_ptrs: list[int] = []
        self.norm_pairs: list[tuple[float, float]] = []  # (callback's norm, dense norm)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids, y = batch
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1]))
        return nn.functional.cross_entropy(self.out(h.mean(1)), y)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grad = self.emb.weight.grad
        assert grad is not None and not grad.is_sparse
        self.grad_ptrs.append(grad.data_ptr())
        buffer = next(
            (c for c in self.trainer.callbacks if isinstance(c, EmbeddingGradBuffer)), None
        )
        if buffer is not None:
            params = list(self.parameters())
            fast = buffer.total_grad_norm(params)
            full = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            self.norm_pairs.append((float(fast), float(full)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)


class _BagZeroing(_Bag):
    """Zeroes gradients in place instead of dropping them (``set_to_none=False``)."""

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: object) -> None:
        optimizer.zero_grad(set_to_none=False)  # type: ignore[attr-defined]


def _fit(
    callbacks: list[pl.Callback],
    accumulate: int = 1,
    strategy: str = "auto",
    model_class: type[_Bag] = _Bag,
) -> _Bag:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 5000, (48, 6), generator=g)
    ids[:, 4:] = 0  # padding rows get no gradient in either path
    data = TensorDataset(ids, torch.randint(0, 3, (48,), generator=g))
    model = model_class()
    trainer = quiet_trainer(
        max_epochs=2,
        callbacks=callbacks,
        accumulate_grad_batches=accumulate,
        strategy=strategy,
        devices=1,
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
    # clipping's norm, read from the written rows only, is the norm of the whole gradient
    assert len(buffered.norm_pairs) == 12 // accumulate
    for fast, full in buffered.norm_pairs:
        assert fast == pytest.approx(full, rel=1e-6)


def test_in_place_zeroing_keeps_updates_and_bounds_the_row_record() -> None:
    """With zero_grad(set_to_none=False) the buffer stays the gradient and is zeroed by the
    optimizer; the record of written rows must not grow without bound."""
    callback = EmbeddingGradBuffer(min_rows=1000)
    dense = _fit([], model_class=_BagZeroing)
    buffered = _fit([callback], model_class=_BagZeroing)
    for a, b in zip(dense.parameters(), buffered.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    for fast, full in buffered.norm_pairs:
        assert fast == pytest.approx(full, rel=1e-6)


def test_only_written_rows_are_cleared_and_stale_rows_would_show() -> None:
    """The next step clears the rows of the previous one (not the whole table); leaving one
    of them in place changes the gradient, so the update test above would catch it."""
    model = _Bag()
    callback = EmbeddingGradBuffer(min_rows=1000)
    _setup(callback, model, CPU)
    model.emb(torch.tensor([[5, 9]])).sum().backward()
    callback.on_after_backward(None, model)  # type: ignore[arg-type]
    buffer = model.emb.weight.grad
    model.emb.weight.grad = None  # zero_grad(set_to_none=True)
    model.emb(torch.tensor([[9, 11]])).sum().backward()
    callback.on_after_backward(None, model)  # type: ignore[arg-type]
    grad = model.emb.weight.grad
    assert grad is buffer
    assert grad[5].abs().sum() == 0 and grad[9].tolist() == [1.0] * 8
    assert grad.abs().sum() == 2 * 8
    # a dense gradient arriving through the hook (the table's sparse flag switched off)
    # marks every row: the next step clears the whole buffer
    model.emb.weight.grad = None
    model.emb.sparse = False
    model.emb(torch.tensor([[1]])).sum().backward()
    model.emb.weight.grad = None
    model.emb.sparse = True
    model.emb(torch.tensor([[2]])).sum().backward()
    buffer[100] = 7.0  # written by the dense step in this scenario
    callback.on_after_backward(None, model)  # type: ignore[arg-type]
    assert model.emb.weight.grad.abs().sum() == 8
    # backward passes that are never densified (the gradient is already dense) add rows;
    # past the table's size the record collapses to "every row"
    for _ in range(300):
        model.emb(torch.arange(1, 41)[None]).sum().backward()
    dirty = callback._dirty[model.emb]
    assert sum(len(r) for r in dirty) <= model.emb.num_embeddings


def test_single_process_ddp_trains_with_the_callback_configured() -> None:
    """DDP's reducer expects dense gradients even with one process: the callback stays off."""
    saved = dict(os.environ)  # Lightning exports MASTER_PORT etc. for its DDP processes
    try:
        buffered = _fit([EmbeddingGradBuffer(min_rows=1000)], strategy="ddp")
        dense = _fit([], strategy="ddp")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # frees the rendezvous port
        os.environ.clear()
        os.environ.update(saved)
    for a, b in zip(dense.parameters(), buffered.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def _setup(callback: EmbeddingGradBuffer, model: nn.Module, strategy: object) -> None:
    callback.setup(types.SimpleNamespace(strategy=strategy), model, "fit")  # type: ignore[arg-type]


CPU = SingleDeviceStrategy(device=torch.device("cpu"))


def test_only_big_trainable_unwrapped_tables_in_single_cpu_runs() -> None:
    model = _Bag()
    _setup(EmbeddingGradBuffer(min_rows=1000), model, CPU)
    assert model.emb.sparse and not model.pos.sparse
    ddp = _Bag()  # DDP even with one process: its reducer expects dense gradients
    _setup(EmbeddingGradBuffer(min_rows=1000), ddp, DDPStrategy())
    assert not ddp.emb.sparse
    frozen = _Bag()
    frozen.emb.weight.requires_grad_(False)
    _setup(EmbeddingGradBuffer(min_rows=1000), frozen, CPU)
    assert not frozen.emb.sparse
    wrapped = _Bag()  # as PEFT's LoRA embedding layer, which reads base_layer.sparse
    wrapped.lora = nn.Module()
    wrapped.lora.base_layer = wrapped.emb
    _setup(EmbeddingGradBuffer(min_rows=1000), wrapped, CPU)
    assert not wrapped.emb.sparse


def test_a_table_without_gradient_gets_none_not_zeros() -> None:
    model = _Bag()
    callback = EmbeddingGradBuffer(min_rows=1000)
    _setup(callback, model, CPU)
    model.out(torch.randn(2, 8)).sum().backward()  # the embedding takes no part
    callback.on_after_backward(None, model)  # type: ignore[arg-type]
    assert model.emb.weight.grad is None
    ids = torch.tensor([[3, 3, 7]])
    model.emb(ids).sum().backward()
    assert model.emb.weight.grad.is_sparse
    callback.on_after_backward(None, model)  # type: ignore[arg-type]
    grad = model.emb.weight.grad
    assert not grad.is_sparse and grad[3].tolist() == [2.0] * 8 and grad[7].tolist() == [1.0] * 8
    assert grad.abs().sum() == 3 * 8


def test_a_failed_fit_restores_dense_gradients_and_removes_hooks() -> None:
    """Lightning calls on_exception, not teardown, when fit fails."""
    model = _Bag()
    callback = EmbeddingGradBuffer(min_rows=1000)
    _setup(callback, model, CPU)
    assert model.emb.sparse and model.emb.weight._backward_hooks
    callback.on_exception(None, model, RuntimeError("boom"))  # type: ignore[arg-type]
    assert not model.emb.sparse and not model.emb.weight._backward_hooks
    model.emb(torch.tensor([[1, 2]])).sum().backward()
    assert not model.emb.weight.grad.is_sparse


def test_a_model_with_the_callback_set_up_still_pickles() -> None:
    """The gradient hook is a closure: it must not make the model unpicklable mid-fit."""
    model = _Bag()
    callback = EmbeddingGradBuffer(min_rows=1000)
    _setup(callback, model, CPU)
    restored = pickle.loads(pickle.dumps(model))
    assert torch.equal(restored.emb.weight, model.emb.weight)


def test_lazy_optimizer_keeps_gradients_sparse_on_any_single_device_not_under_ddp(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import functools

    from nlp_transfer.training.lazy_adamw import LazyAdamW

    def lazy_bag() -> _Bag:
        model = _Bag()
        model.optimizer_factory = functools.partial(LazyAdamW, lr=1e-3)  # as Hydra builds it
        return model

    model, callback = lazy_bag(), EmbeddingGradBuffer(min_rows=1000)
    _setup(callback, model, CPU)
    assert callback.lazy and model.emb.sparse and not callback._hooks  # no row record
    model.emb(torch.tensor([[3, 3, 7]])).sum().backward()
    callback.on_after_backward(None, model)  # type: ignore[arg-type]
    grad = model.emb.weight.grad
    assert grad.is_sparse and grad.is_coalesced() and grad.to_dense()[3].tolist() == [2.0] * 8
    # a GPU strategy gets sparse gradients too (the buffer alone is CPU-only)
    gpu_like = SingleDeviceStrategy(device=torch.device("cuda", 0))  # not started here
    on_gpu = lazy_bag()
    _setup(EmbeddingGradBuffer(min_rows=1000), on_gpu, gpu_like)
    assert on_gpu.emb.sparse
    plain = _Bag()  # the exact buffer stays CPU-only
    _setup(EmbeddingGradBuffer(min_rows=1000), plain, gpu_like)
    assert not plain.emb.sparse
    ddp = lazy_bag()
    with caplog.at_level("WARNING"):
        _setup(EmbeddingGradBuffer(min_rows=1000), ddp, DDPStrategy())
    assert not ddp.emb.sparse and "plain AdamW" in caplog.text
