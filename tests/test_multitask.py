"""Multi-task training: task sampling, per-task gradients, one-task equivalence, DDP."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from scipy.stats import chisquare

from nlp_transfer.builders import build_encoder
from nlp_transfer.errors import ConfigError
from nlp_transfer.multitask.datamodule import MultiTaskDataModule
from nlp_transfer.multitask.module import MultiTaskModule
from nlp_transfer.multitask.sampling import (
    GroupedShardSampler,
    ShardSampler,
    task_probabilities,
    task_schedule,
)
from nlp_transfer.multitask.train import build_multitask_datamodule, build_multitask_module
from nlp_transfer.train import train
from nlp_transfer.utils.resolvers import PROJECT_ROOT
from tests.conftest import quiet_trainer

MakeCfg = Callable[..., DictConfig]
SMALL = [
    "experiment=multitask_demo",
    "encoder=tiny",
    "tasks.sentiment.data.max_train_examples=48",
    "tasks.ner.data.max_train_examples=64",
    "tasks.sentiment.data.max_eval_examples=32",
    "tasks.ner.data.max_eval_examples=32",
]


# -- sampling ------------------------------------------------------------------------------
def test_probabilities_follow_the_policy() -> None:
    sizes = [900, 100]
    assert task_probabilities(sizes, "proportional") == pytest.approx([0.9, 0.1])
    assert task_probabilities(sizes, "temperature", 2.0) == pytest.approx([0.75, 0.25])
    assert task_probabilities(sizes, "temperature", 1.0) == pytest.approx([0.9, 0.1])
    assert task_probabilities(sizes, "round_robin") == pytest.approx([0.5, 0.5])
    with pytest.raises(ConfigError, match="choose one of"):
        task_probabilities(sizes, "uniformish")
    with pytest.raises(ConfigError, match="temperature"):
        task_probabilities(sizes, "temperature", 0.0)


@pytest.mark.parametrize(
    ("policy", "temperature"), [("proportional", 1.0), ("temperature", 2.0), ("temperature", 5.0)]
)
def test_sampled_proportions_match_the_policy(policy: str, temperature: float) -> None:
    sizes = [5000, 1200, 300]
    draws = 10_000
    order = task_schedule(sizes, draws, policy, seed=123, epoch=0, temperature=temperature)
    observed = np.bincount(order, minlength=len(sizes))
    expected = task_probabilities(sizes, policy, temperature) * draws
    # chi-square goodness of fit: a correct sampler fails this 1 time in 10,000
    assert chisquare(observed, expected).pvalue > 1e-4, (observed, expected)
    assert np.abs(observed / draws - expected / draws).max() < 0.02


def test_round_robin_takes_turns() -> None:
    order = task_schedule([500, 20, 7], 10_000, "round_robin", seed=1)
    assert order[:6] == [0, 1, 2, 0, 1, 2]
    assert np.bincount(order).tolist() == [3334, 3333, 3333]


def test_schedule_is_seeded_per_epoch() -> None:
    def sched(seed: int, epoch: int) -> list[int]:
        return task_schedule([300, 200, 100], 200, "proportional", seed=seed, epoch=epoch)

    assert sched(7, 0) == sched(7, 0)
    assert sched(7, 0) != sched(7, 1)
    assert sched(7, 0) != sched(8, 0)


def test_shard_sampler_splits_a_task_between_processes() -> None:
    shards = [ShardSampler(11, rank, 3, seed=5) for rank in range(3)]
    for s in shards:
        s.set_pass(epoch=2, pass_index=0)
    parts = [list(s) for s in shards]
    assert [len(p) for p in parts] == [4, 4, 4]  # padded to equal length
    assert sorted(set(i for p in parts for i in p)) == list(range(11))
    # the first pass is DistributedSampler's order (that of a single-task run)
    reference = torch.randperm(11, generator=torch.Generator().manual_seed(5 + 2)).tolist()
    assert parts[0] == (reference + reference[:1])[0::3]
    shards[0].set_pass(epoch=2, pass_index=1)
    assert list(shards[0]) != parts[0]  # a second pass within the epoch: a new order


def test_grouped_shard_sampler_splits_batches_and_reseeds_each_pass() -> None:
    lengths = [3, 9, 4, 8, 5, 7, 6, 2, 10, 1, 11]
    shards = [GroupedShardSampler(lengths, 2, rank, 3, seed=5) for rank in range(3)]
    plain = ShardSampler(len(lengths), 0, 3, seed=5)
    for s in shards:
        s.set_pass(epoch=2, pass_index=0)
    parts = [list(s) for s in shards]
    assert [len(p) for p in parts] == [len(s) for s in shards] == [2, 2, 2]
    assert len(shards[0]) == -(-len(plain) // 2)  # as many batches as the plain shard
    seen = [i for p in parts for batch in p for i in batch]
    assert sorted(set(seen)) == list(range(len(lengths)))
    for step in zip(*parts):  # every step: examples of similar length on all processes
        sizes = [lengths[i] for batch in step for i in batch]
        assert max(sizes) - min(sizes) <= len(sizes)
    again = GroupedShardSampler(lengths, 2, 0, 3, seed=5)
    again.set_pass(epoch=2, pass_index=0)
    assert list(again) == parts[0]  # deterministic per (seed, task, epoch, pass)
    orders = set()
    for pass_index in range(6):
        shards[0].set_pass(epoch=2, pass_index=pass_index)
        orders.add(tuple(map(tuple, shards[0])))
    assert len(orders) > 1  # later passes draw other batches


def test_multitask_uses_grouped_batches_per_task(make_cfg: MakeCfg) -> None:
    dm = _datamodule(make_cfg("experiment=multitask_demo", *SMALL))
    loader = dm.train_dataloader()
    assert all(isinstance(s, GroupedShardSampler) for s in loader.shard_samplers.values())
    batches = list(loader)
    assert len(batches) == len(loader)
    plain = _datamodule(
        make_cfg(
            "experiment=multitask_demo",
            *SMALL,
            "tasks.sentiment.data.length_grouping=false",
            "tasks.ner.data.length_grouping=false",
            run="plain",
        )
    )
    assert [len(dl) for dl in plain.train_dataloader().loaders.values()] == [
        len(dl) for dl in loader.loaders.values()
    ]


# -- datamodule and DDP policy (no processes) -------------------------------------------------
def _datamodule(cfg: DictConfig) -> MultiTaskDataModule:
    dm = build_multitask_datamodule(cfg, build_encoder(cfg))
    dm.setup("fit")
    return dm


def test_every_process_runs_the_same_task_sequence(
    make_cfg: MakeCfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_cfg(*SMALL, "tasks.sentiment.data.batch_size=8", "tasks.ner.data.batch_size=8")
    dm = _datamodule(cfg)
    seen: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
    for rank in (0, 1):
        monkeypatch.setattr(MultiTaskDataModule, "_process", staticmethod(lambda r=rank: (r, 2)))
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)
        batches = list(loader)
        assert len(batches) == len(loader) == 3 + 4  # ceil(24/8) + ceil(32/8) per process
        seen[rank] = [(b["task"], tuple(b["labels"].flatten().tolist())) for b in batches]
    tasks = {rank: [t for t, _ in seq] for rank, seq in seen.items()}
    assert tasks[0] == tasks[1]  # the same task at every step on every process
    assert set(tasks[0]) == {"sentiment", "ner"}
    # each process reads its own shard: rank 0 and rank 1 batches differ
    assert [x for _, x in seen[0]] != [x for _, x in seen[1]]


def test_eval_loaders_one_per_task(make_cfg: MakeCfg) -> None:
    dm = _datamodule(make_cfg(*SMALL))
    loaders = dm.val_dataloader()
    assert [next(iter(dl))["task"] for dl in loaders] == ["sentiment", "ner"]
    assert dm.task_types == {"sentiment": "classification", "ner": "sequence_labeling"}


# -- gradients ------------------------------------------------------------------------------
class GradProbe(pl.Callback):
    """Records which parameters hold a non-zero gradient at the (only) optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, bool] = {}
        self.task: str | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self.task = batch["task"]

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.grads = {
            n: p.grad is not None and bool(p.grad.abs().sum() > 0)
            for n, p in pl_module.named_parameters()
        }


@pytest.mark.parametrize("private", [False, True], ids=["shared", "private_lora"])
def test_each_head_learns_only_from_its_task(make_cfg: MakeCfg, private: bool) -> None:
    overrides = [*SMALL, "multitask.sampling=round_robin"]  # step 0 is a sentiment batch
    if private:
        overrides.append("multitask.private_adapters={r: 2, alpha: 4}")
    cfg = make_cfg(*overrides)
    encoder = build_encoder(cfg)
    dm = build_multitask_datamodule(cfg, encoder)
    dm.setup("fit")
    module = build_multitask_module(cfg, encoder, dm)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    probe = GradProbe()
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[probe])
    trainer.fit(module, datamodule=dm)
    assert probe.task == "sentiment"
    grads = probe.grads
    own = [n for n in grads if n.startswith("heads.sentiment.")]
    other = [n for n in grads if n.startswith("heads.ner.")]
    assert own and other
    assert all(grads[n] for n in own if n.endswith("weight"))
    assert not any(grads[n] for n in other)
    assert any(grads[n] for n in grads if n.startswith("encoder."))  # the shared part learns
    after = dict(module.named_parameters())
    for n in other:  # no gradient: AdamW did not touch them (no weight decay either)
        assert torch.equal(after[n], before[n]), n
    if private:
        mine = [n for n in grads if ".private_sentiment." in n]
        theirs = [n for n in grads if ".private_ner." in n]
        assert mine and theirs
        assert any(grads[n] for n in mine)
        assert not any(grads[n] for n in theirs)
        assert all(after[n].requires_grad for n in mine + theirs)


# -- runs -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "single", "drop", "task"),
    [
        ("classification", ["monitor=val/acc"], "ner", "sentiment"),
        ("ner", ["data=demo_ner", "head=token_linear", "monitor=val/f1"], "sentiment", "ner"),
    ],
)
def test_one_task_run_equals_the_single_task_run(
    make_cfg: MakeCfg, kind: str, single: list[str], drop: str, task: str
) -> None:
    common = [
        "trainer.max_epochs=2",
        "optimizer.lr=1e-3",
        "data.max_train_examples=64",
        "data.length_grouping=false",
    ]
    ref, _ = train(make_cfg(*common, *single, run="single"))
    slice_ = [
        f"tasks.{task}.data.max_train_examples=64",
        f"tasks.{task}.data.length_grouping=false",
        "trainer.max_epochs=2",
        "optimizer.lr=1e-3",
    ]
    got, _ = train(make_cfg("experiment=multitask_demo", f"tasks.{drop}=null", *slice_, run="mt"))
    keys = [k for k in ref if k.startswith(("val/", "test/")) and "/per_class/" not in k]
    assert keys and "val/loss" in keys
    for key in keys:  # exact: same init, same batches, same dropout masks
        stage, name = key.split("/", 1)
        assert got[f"{stage}/{task}/{name}"] == ref[key], key
    assert got["global_steps"] == ref["global_steps"]


def test_two_task_run_writes_per_task_metrics(make_cfg: MakeCfg) -> None:
    cfg = make_cfg(*SMALL, "multitask.shared_projection.size=16", "tasks.ner.loss_weight=0.5")
    metrics, objects = train(cfg)
    on_disk = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert on_disk["task"] == "multitask"
    for stage in ("val", "test"):
        for key in ("sentiment/acc", "sentiment/f1_macro", "sentiment/loss", "ner/f1", "ner/loss"):
            assert f"{stage}/{key}" in on_disk, f"{stage}/{key}"
        mean = (on_disk[f"{stage}/sentiment/acc"] + on_disk[f"{stage}/ner/f1"]) / 2
        assert on_disk[f"{stage}/mean_primary"] == pytest.approx(mean)
    assert on_disk["global_steps"] == on_disk["steps_per_epoch"] == 3 + 4  # 48/16 + 64/16
    assert Path(on_disk["best_checkpoint"]).is_file()
    module: MultiTaskModule = objects["module"]
    assert module.projection is not None and module.projection.output_size == 16
    assert set(module.heads) == {"sentiment", "ner"}
    assert metrics == on_disk


def test_strategies_apply_to_the_shared_encoder(make_cfg: MakeCfg) -> None:
    cfg = make_cfg(*SMALL, "strategy=frozen", "test=false")
    encoder = build_encoder(cfg)
    frozen_before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    _, objects = train(cfg)
    module: MultiTaskModule = objects["module"]
    assert module.frozen_encoder
    for n, p in module.encoder.named_parameters():
        assert not p.requires_grad and torch.equal(p, frozen_before[n]), n
    assert all(p.requires_grad for p in module.heads.parameters())
    # shared LoRA (strategy) plus one private adapter per task
    cfg = make_cfg(
        *SMALL, "strategy=lora", "multitask.private_adapters={r: 2}", "test=false", run="lora"
    )
    metrics, objects = train(cfg)
    module = objects["module"]
    trainable = {n for n, p in module.encoder.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".default." in n for n in trainable) and any(".private_ner." in n for n in trainable)
    assert "val/mean_primary" in metrics


def test_config_errors_are_clear(make_cfg: MakeCfg) -> None:
    with pytest.raises(ConfigError, match="choose one of"):
        train(make_cfg(*SMALL, "multitask.sampling=random"))
    with pytest.raises(ConfigError, match="auxiliary"):
        train(make_cfg(*SMALL, "strategy=auxiliary", run="aux"))
    with pytest.raises(ConfigError, match="no task"):
        train(make_cfg(*SMALL, "tasks.ner=null", "tasks.sentiment=null", run="none"))
    with pytest.raises(ConfigError, match="head.scheme"):  # CRF constraints in another scheme
        crf = ["head@tasks.ner.head=crf", "tasks.ner.data.train_scheme=BIOES"]
        train(make_cfg(*SMALL, *crf, run="crf"))


def test_real_data_config_reads_the_shared_folder(make_cfg: MakeCfg) -> None:
    cfg = make_cfg(
        "experiment=multitask_sst2_conll",
        "tasks.sst2.data.max_train_examples=1000",
        "tasks.conll.data.max_train_examples=1000",
    )
    shared = Path(cfg.paths.shared_data_dir)
    assert Path(cfg.tasks.sst2.data.data_dir) == shared / "sst2"
    assert Path(cfg.tasks.conll.data.data_dir) == shared / "conll2003"
    assert cfg.tasks.sst2.data.max_train_examples == 1000
    assert cfg.monitor == "val/mean_primary"


@pytest.mark.heavy
def test_ddp_run_completes(tmp_path: Path) -> None:
    """Two CPU processes (gloo); the tasks have different numbers of batches per process."""
    run_dir = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "nlp_transfer.train",
        *SMALL,
        "tasks.sentiment.data.max_train_examples=40",  # 20 per process: 2 batches; ner: 2
        "trainer=ddp_sim",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "extras.print_config=false",
        "callbacks.model_summary=null",
        "multitask.sampling=proportional",
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    proc = subprocess.run(
        cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps_per_epoch"] == 2 + 2
    assert metrics["global_steps"] == 2 * 4
    assert "val/sentiment/acc" in metrics and "val/ner/f1" in metrics
    assert "val/mean_primary" in metrics and "test/mean_primary" in metrics
