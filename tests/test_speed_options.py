"""The speed switches of issue 8: length-grouped training batches and fused AdamW (with
gradient clipping under bf16), and the NaN fill of deterministic runs."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from pytorch_lightning import Callback, LightningModule

from nlp_transfer.builders import build_datamodule, build_encoder
from nlp_transfer.data.padding import pad_to
from nlp_transfer.data.sampler import LengthGroupedBatchSampler, lengths_of, padding_stats
from nlp_transfer.errors import ConfigError
from nlp_transfer.train import train


@pytest.mark.parametrize("data", ["demo_classification", "demo_ner"])
def test_grouped_loader_covers_each_example_once_with_less_padding(make_cfg, data) -> None:
    cfg = make_cfg(f"data={data}", "data.length_grouping=true")
    dm = build_datamodule(cfg, build_encoder(cfg))
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, LengthGroupedBatchSampler)
    batches = list(loader.batch_sampler)
    n = len(dm.tokenized("train"))
    assert sorted(i for b in batches for i in b) == list(range(n))
    lengths = lengths_of(dm.tokenized("train"))
    _, grouped = padding_stats(batches, lengths)
    plain = list(torch.randperm(n, generator=torch.Generator().manual_seed(0)).split(dm.batch_size))
    _, shuffled = padding_stats([b.tolist() for b in plain], lengths)
    assert grouped < shuffled
    seen = sum(len(batch["input_ids"]) for batch in loader)
    assert seen == n


def test_megabatch_mult_reaches_the_sampler_and_bad_values_are_refused(make_cfg) -> None:
    cfg = make_cfg("data=demo_ner", "data.length_grouping=true", "data.megabatch_mult=3")
    dm = build_datamodule(cfg, build_encoder(cfg))
    dm.setup("fit")
    assert dm.train_dataloader().batch_sampler.megabatch_mult == 3
    cfg = make_cfg("data=demo_ner", "data.megabatch_mult=100.0")
    assert build_datamodule(cfg, build_encoder(cfg)).megabatch_mult == 100
    for bad in ("0", "2.5", "true", "many"):
        cfg = make_cfg("data=demo_ner", f"data.megabatch_mult={bad}")
        with pytest.raises(Exception, match="data.megabatch_mult") as info:
            build_datamodule(cfg, build_encoder(cfg))
        assert isinstance(info.value, ConfigError) or isinstance(info.value.__cause__, ConfigError)


def test_pad_to_pads_lists_and_tensors_to_the_longest_or_a_given_width() -> None:
    rows = [[1, 2, 3], torch.tensor([4]), []]
    assert pad_to(rows, 0).tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]]
    assert pad_to(rows, -1, width=4).tolist() == [[1, 2, 3, -1], [4, -1, -1, -1], [-1] * 4]
    assert pad_to(rows, 0).dtype == torch.long
    assert pad_to([], 0).shape == (0, 0)
    assert pad_to([[], []], 5).shape == (2, 0)
    assert pad_to([np.array([7, 8]), (9,)], 0).tolist() == [[7, 8], [9, 0]]
    assert isinstance(pad_to([np.array([7])], 0)[0, 0].item(), int)
    with pytest.raises(ValueError, match="does not fit the padded width 2"):
        pad_to([[1, 2, 3]], 0, width=2)


class RecordSampler(Callback):
    """Keeps the batch sampler the trainer iterates in the first training batch."""

    seen: ClassVar[list[Any]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        if idx == 0:
            sampler = trainer.train_dataloader.batch_sampler
            RecordSampler.seen.append((sampler, sampler.seed, len(sampler)))


def test_training_seeds_grouped_sampler_with_run_seed(make_cfg) -> None:
    RecordSampler.seen.clear()
    cfg = make_cfg(
        "data.length_grouping=true",
        "seed=7",
        "+callbacks.record._target_=tests.test_speed_options.RecordSampler",
    )
    metrics, _ = train(cfg)
    ((sampler, seed, batches),) = RecordSampler.seen
    assert isinstance(sampler, LengthGroupedBatchSampler)
    assert seed == 7
    assert metrics["global_steps"] == batches


def _weights_after(make_cfg, run: str, *overrides: str) -> dict[str, torch.Tensor]:
    cfg = make_cfg(
        "trainer=bf16",
        "+trainer.max_steps=4",
        "trainer.gradient_clip_val=0.01",
        "callbacks.model_checkpoint=null",
        *overrides,
        run=run,
    )
    _, objects = train(cfg)
    return {k: v.detach().clone() for k, v in objects["module"].state_dict().items()}


def test_fused_adamw_clips_under_bf16_like_the_default(make_cfg) -> None:
    """Lightning refuses to clip with a fused optimizer under mixed precision; bf16 has no
    loss scaler, so the module clips itself and must match the unfused run."""
    plain = _weights_after(make_cfg, "plain", "optimizer.fused=false")
    fused = _weights_after(make_cfg, "fused", "optimizer.fused=true")
    assert plain.keys() == fused.keys()
    for k in plain:
        torch.testing.assert_close(fused[k], plain[k], atol=2e-5, rtol=1e-4, msg=k)
    unclipped = _weights_after(
        make_cfg, "unclipped", "optimizer.fused=true", "trainer.gradient_clip_val=null"
    )
    assert any(not torch.allclose(unclipped[k], plain[k], atol=1e-4) for k in plain)


def test_fused_clipping_norm_and_value() -> None:
    from nlp_transfer.module import TransferModule
    from nlp_transfer.training.speed import SpeedMachinery

    param = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([param], lr=0.1, fused=True)
    assert opt._step_supports_amp_scaling
    fake = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=None))
    module = TransferModule.__new__(TransferModule)
    LightningModule.__init__(module)
    module.speed = SpeedMachinery()  # what __init__ sets (defaults)
    module._trainer = fake  # type: ignore[assignment]
    param.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    module.configure_gradient_clipping(opt, 1.0, "norm")
    # by norm: handed to the fused kernel, which divides the gradients by grad_scale
    torch.testing.assert_close(opt.grad_scale, torch.tensor(5.0))
    param.grad = torch.tensor([3.0, -4.0, 0.5, 0.0])
    module.configure_gradient_clipping(opt, 1.0, "value")
    assert opt.grad_scale is None
    assert param.grad.tolist() == [1.0, -1.0, 0.5, 0.0]
    param.grad = torch.tensor([0.3, 0.4, 0.0, 0.0])  # norm below the limit: unchanged
    module.configure_gradient_clipping(opt, 1.0, "norm")
    torch.testing.assert_close(opt.grad_scale, torch.tensor(1.0))

    # the clipped step equals clip_grad_norm_ followed by an unfused step (SGD: the update
    # is proportional to the gradient, so a wrong scale would show)
    fused_p = torch.nn.Parameter(torch.ones(4))
    plain_p = torch.nn.Parameter(torch.ones(4))
    fused_sgd = torch.optim.SGD([fused_p], lr=0.5, fused=True)
    plain_sgd = torch.optim.SGD([plain_p], lr=0.5)
    for grad in ([3.0, 4.0, 0.0, 12.0], [0.1, 0.2, 0.0, 0.1]):
        fused_p.grad = torch.tensor(grad)
        plain_p.grad = torch.tensor(grad)
        module.configure_gradient_clipping(fused_sgd, 1.0, "norm")
        fused_sgd.step()
        torch.nn.utils.clip_grad_norm_([plain_p], 1.0)
        plain_sgd.step()
        torch.testing.assert_close(fused_p, plain_p)


@pytest.mark.slow
def test_compiled_encoder_trains_and_keeps_parameter_names(make_cfg) -> None:
    metrics, objects = train(make_cfg("model.compile=true", "data.max_train_examples=64"))
    assert metrics["global_steps"] == 4
    names = list(objects["module"].state_dict())
    assert names and not any("_orig_mod" in n for n in names)


def test_finite_loss_checked_every_step_on_cpu_every_log_interval_elsewhere() -> None:
    from nlp_transfer.module import TransferModule
    from nlp_transfer.training.speed import SpeedMachinery

    module = TransferModule.__new__(TransferModule)
    LightningModule.__init__(module)
    module.speed = SpeedMachinery()  # what __init__ sets (defaults)
    module.check_finite_loss = True
    cpu, meta = torch.zeros(()), torch.zeros((), device="meta")
    for step, on_meta in ((0, True), (49, False), (50, True), (51, False)):
        module._trainer = SimpleNamespace(global_step=step, log_every_n_steps=50)  # type: ignore[assignment]
        assert module.checks_finite_loss_now(cpu)
        assert module.checks_finite_loss_now(meta) is on_meta
    module.check_finite_loss = False
    assert not module.checks_finite_loss_now(cpu)


class RecordBatches(Callback):
    """Input ids of the first training batch of every epoch."""

    firsts: ClassVar[list[torch.Tensor]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        if idx == 0:
            RecordBatches.firsts.append(batch["input_ids"].clone())


def test_overfit_batches_sees_the_same_grouped_batches_every_epoch(make_cfg) -> None:
    RecordBatches.firsts.clear()
    cfg = make_cfg(
        "debug=overfit",
        "trainer.max_epochs=3",
        "data.length_grouping=true",
        "+callbacks.record._target_=tests.test_speed_options.RecordBatches",
    )
    train(cfg)
    first, *later = RecordBatches.firsts
    assert len(later) == 2
    assert all(torch.equal(first, other) for other in later)


def test_deterministic_runs_skip_the_nan_fill_unless_asked(make_cfg) -> None:
    """trainer.deterministic=true keeps deterministic kernels; PyTorch's NaN-filling of new
    tensors is a separate switch (deterministic_fill), off by default."""
    overrides = ("+trainer.max_steps=1", "callbacks.model_checkpoint=null", "test=false")
    try:
        train(make_cfg(*overrides, "deterministic_fill=true", run="fill"))
        assert torch.utils.deterministic.fill_uninitialized_memory
        assert torch.are_deterministic_algorithms_enabled()
        train(make_cfg(*overrides, run="nofill"))
        assert not torch.utils.deterministic.fill_uninitialized_memory
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = True
        torch.use_deterministic_algorithms(False)
