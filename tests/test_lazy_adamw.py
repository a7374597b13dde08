"""LazyAdamW: AdamW's update for the rows in a sparse gradient, nothing for the others."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from nlp_transfer.errors import ConfigError
from nlp_transfer.train import train
from nlp_transfer.training.lazy_adamw import LazyAdamW

HYPER = {"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.1}


def _sparse(rows: list[int], values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor([rows]), values, shape, check_invariants=True)


def _reference_rows(
    p: torch.Tensor,
    grads: list[torch.Tensor],
    lr: float,
    b1: float,
    b2: float,
    eps: float,
    wd: float,
) -> torch.Tensor:
    """Lazy AdamW written out in float64: each step only the gradient's rows move."""
    p = p.double().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.coalesce()
        rows, gv = g.indices()[0], g.values().double()
        m[rows] = b1 * m[rows] + (1 - b1) * gv
        v[rows] = b2 * v[rows] + (1 - b2) * gv * gv
        p[rows] *= 1 - lr * wd
        denom = (v[rows] / (1 - b2**t)).sqrt() + eps
        p[rows] -= lr / (1 - b1**t) * m[rows] / denom
    return p


def test_rows_in_the_gradient_follow_adamw_and_the_others_do_not_move() -> None:
    torch.manual_seed(0)
    table = nn.Parameter(torch.randn(20, 4))
    start = table.detach().clone()
    opt = LazyAdamW([table], **HYPER)
    g = torch.Generator().manual_seed(1)
    grads = [
        _sparse([1, 5, 5, 7], torch.randn(4, 4, generator=g), (20, 4)),  # row 5 twice
        _sparse([5, 9], torch.randn(2, 4, generator=g), (20, 4)),
        _sparse([1, 12, 7], torch.randn(3, 4, generator=g), (20, 4)),
    ]
    for grad in grads:
        table.grad = grad
        opt.step()
    want = _reference_rows(start, grads, 0.01, 0.9, 0.99, 1e-6, 0.1)
    torch.testing.assert_close(table.detach().double(), want, rtol=1e-5, atol=1e-6)
    untouched = [r for r in range(20) if r not in (1, 5, 7, 9, 12)]
    assert torch.equal(table.detach()[untouched], start[untouched])
    state = opt.state[table]
    assert float(state["step"]) == 3
    assert not state["exp_avg"][untouched].any() and not state["exp_avg_sq"][untouched].any()
    # a dense AdamW would have decayed and moved the untouched rows: the variants differ
    dense = nn.Parameter(start.clone())
    dense_opt = torch.optim.AdamW([dense], fused=True, **HYPER)
    for grad in grads:
        dense.grad = grad.to_dense()
        dense_opt.step()
    assert not torch.equal(dense.detach()[untouched], start[untouched])


def test_dense_parameters_get_exactly_torch_adamw_and_the_first_step_matches_on_rows() -> None:
    torch.manual_seed(0)
    weight, table = nn.Parameter(torch.randn(3, 5)), nn.Parameter(torch.randn(10, 5))
    ref_weight, ref_table = (
        nn.Parameter(weight.detach().clone()),
        nn.Parameter(table.detach().clone()),
    )
    lazy = LazyAdamW([weight, table], **HYPER)
    plain = torch.optim.AdamW([ref_weight, ref_table], fused=True, **HYPER)
    gw, gt = torch.randn(3, 5), torch.randn(4, 5)
    rows = [0, 3, 4, 8]
    weight.grad, table.grad = gw.clone(), _sparse(rows, gt, (10, 5))
    ref_weight.grad, ref_table.grad = gw.clone(), _sparse(rows, gt, (10, 5)).to_dense()
    lazy.step()
    plain.step()
    assert torch.equal(weight, ref_weight)  # the dense path is torch's own
    # the same kernel on the gradient's rows: bit for bit AdamW's first step there
    assert torch.equal(table.detach()[rows], ref_table.detach()[rows])
    assert table.grad.is_sparse  # handed back after the step


def test_clipping_scale_is_applied_to_the_sparse_rows_too() -> None:
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(8, 3)), None
    b = nn.Parameter(a.detach().clone())
    values = torch.randn(2, 3)
    opt_a, opt_b = LazyAdamW([a], **HYPER), LazyAdamW([b], **HYPER)
    a.grad = _sparse([2, 6], values, (8, 3))
    opt_a.grad_scale = torch.tensor(4.0)  # what configure_gradient_clipping sets
    opt_a.step()
    b.grad = _sparse([2, 6], values / 4.0, (8, 3))
    opt_b.step()
    torch.testing.assert_close(a, b)


def test_state_has_adamw_layout_and_round_trips() -> None:
    torch.manual_seed(0)
    table = nn.Parameter(torch.randn(6, 2))
    opt = LazyAdamW([table], **HYPER)
    table.grad = _sparse([1, 4], torch.randn(2, 2), (6, 2))
    opt.step()
    saved = copy.deepcopy(opt.state_dict())  # as a checkpoint file holds it
    assert set(saved["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    torch.optim.AdamW([nn.Parameter(table.detach().clone())], fused=True).load_state_dict(saved)
    twin = nn.Parameter(table.detach().clone())
    again = LazyAdamW([twin], **HYPER)
    again.load_state_dict(saved)
    grad = _sparse([0, 4], torch.randn(2, 2), (6, 2))
    table.grad, twin.grad = grad, grad.clone()
    opt.step()
    again.step()
    assert torch.equal(table, twin)


@pytest.mark.parametrize(
    ("kwargs", "key"), [({"fused": False}, "optimizer.fused"), ({"amsgrad": True}, "amsgrad")]
)
def test_unsupported_settings_are_refused(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        LazyAdamW([nn.Parameter(torch.zeros(2))], **kwargs)


class EmbeddingWatch(pl.Callback):
    """Test callback: the word embedding at the start, the token ids trained on, and
    whether its gradient reached the optimizer sparse and coalesced."""

    def __init__(self) -> None:
        self.start: torch.Tensor | None = None
        self.seen: set[int] = set()
        self.grad_kinds: set[tuple[bool, bool]] = set()

    @staticmethod
    def table(pl_module: pl.LightningModule) -> nn.Embedding:
        return next(
            m for m in pl_module.modules() if type(m) is nn.Embedding and m.num_embeddings >= 4096
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = self.table(pl_module).weight.detach().clone()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self.seen.update(batch["input_ids"].unique().tolist())

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        grad = self.table(pl_module).weight.grad
        self.grad_kinds.add((grad.is_sparse, grad.is_sparse and grad.is_coalesced()))


def test_training_with_lazy_adamw_moves_only_the_rows_of_seen_tokens(make_cfg) -> None:
    cfg = make_cfg(
        "experiment=demo_ner",
        "encoder=tiny",
        "optimizer=lazy_adamw",
        "data.max_train_examples=48",
        "trainer.accumulate_grad_batches=2",
        "+callbacks.watch._target_=tests.test_lazy_adamw.EmbeddingWatch",
    )
    metrics, objects = train(cfg)
    assert metrics["global_steps"] > 0
    watch = next(c for c in objects["trainer"].callbacks if isinstance(c, EmbeddingWatch))
    assert watch.grad_kinds == {(True, True)}
    table = watch.table(objects["module"])
    assert not table.sparse  # put back after fit
    after, start = table.weight.detach(), watch.start
    unseen = [r for r in range(after.shape[0]) if r not in watch.seen]
    seen = sorted(watch.seen - {table.padding_idx})
    assert torch.equal(after[unseen], start[unseen])
    assert (after[seen] != start[seen]).any(dim=1).all()


def test_clipping_by_value_clamps_the_summed_rows_of_a_sparse_gradient() -> None:
    from types import SimpleNamespace

    from pytorch_lightning import LightningModule

    from nlp_transfer.module import TransferModule
    from nlp_transfer.training.speed import SpeedMachinery

    table = nn.Parameter(torch.zeros(5, 2))
    opt = LazyAdamW([table], lr=0.1)
    module = TransferModule.__new__(TransferModule)
    LightningModule.__init__(module)
    module.speed = SpeedMachinery()  # what __init__ sets (defaults)
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=None))
    # row 1 appears twice: 0.4 + 0.4 = 0.8 is clamped to 0.5 after summing, as dense would be
    table.grad = _sparse([1, 1, 3], torch.tensor([[0.4, -2.0], [0.4, 0.0], [0.1, 0.2]]), (5, 2))
    module.configure_gradient_clipping(opt, 0.5, "value")
    assert table.grad.is_sparse
    want = torch.tensor([[0.0, 0.0], [0.5, -0.5], [0.0, 0.0], [0.1, 0.2], [0.0, 0.0]])
    torch.testing.assert_close(table.grad.to_dense(), want)


def test_step_hooks_run_once_and_other_sparse_layouts_are_refused_before_any_update() -> None:
    torch.optim.AdamW([nn.Parameter(torch.zeros(1))], fused=True)  # torch hooks AdamW.step
    table, weight = nn.Parameter(torch.randn(6, 2)), nn.Parameter(torch.randn(2))
    opt = LazyAdamW([table, weight], lr=0.1)
    calls: list[Any] = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", table.grad is not None)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", float(table[1, 0]))))
    start = float(table[1, 0])
    table.grad = _sparse([1, 3], torch.ones(2, 2), (6, 2))
    weight.grad = torch.ones(2)
    opt.step()
    assert calls == [("pre", True), ("post", float(table[1, 0]))] and calls[1][1] != start
    before = weight.detach().clone()
    table.grad = torch.randn(6, 2).to_sparse()  # one entry per element, not whole rows
    with pytest.raises(ValueError, match="row-sparse"):
        opt.step()
    assert torch.equal(weight, before)  # refused before the dense step ran


def test_lazy_optimizer_without_a_trainable_table_says_so(make_cfg, caplog) -> None:
    cfg = make_cfg(
        "experiment=demo_classification",
        "encoder=tiny",
        "optimizer=lazy_adamw",
        "strategy=frozen",
        "data.max_train_examples=16",
    )
    with caplog.at_level("WARNING"):
        train(cfg)
    assert "no trainable vocabulary embedding" in caplog.text
