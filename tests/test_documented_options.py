"""Documented options do what they say (issue 22): feature-cache keys cover the weights,
``scheduler=stlr``, ``data.label_all_subtokens``, trainable-parameter counts over the run,
and the documented output locations and run names."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from nlp_transfer.builders import build_datamodule, build_encoder, build_module
from nlp_transfer.encoders.transformer import TransformerEncoder
from nlp_transfer.errors import ConfigError
from nlp_transfer.export import export
from nlp_transfer.features import cache as cache_mod
from nlp_transfer.features.cache import FeatureCache, cache_key, key_parts_from_encoder
from nlp_transfer.predict import predict
from nlp_transfer.sweeps.job import run_name
from nlp_transfer.train import train
from nlp_transfer.training.trainable_params import TrainableParamsMonitor
from nlp_transfer.utils.io import checkpoint_run_dir, free_default_output

# -- feature-cache key ------------------------------------------------------------------------


def _key(encoder: object) -> str:
    return cache_key(key_parts_from_encoder(encoder, data="d", pooling="first", layers="all"))


def test_cache_key_follows_the_weights_of_tiny_encoders(make_cfg) -> None:
    seed0 = build_encoder(make_cfg())
    seed0_again = build_encoder(make_cfg("seed=1"))  # the run seed: same encoder weights
    seed1 = build_encoder(make_cfg("encoder.seed=1"))
    assert seed0.identity() == seed1.identity()  # what the key was made of before
    assert _key(seed0) == _key(seed0_again)
    assert _key(seed0) != _key(seed1)


def test_weights_digest_is_memoised_until_a_weight_changes(make_cfg, monkeypatch) -> None:
    encoder = build_encoder(make_cfg())
    calls = []
    real = cache_mod.hashlib.blake2b
    monkeypatch.setattr(cache_mod.hashlib, "blake2b", lambda **kw: calls.append(1) or real(**kw))
    first = cache_mod.weights_digest(encoder)
    assert cache_mod.weights_digest(encoder) == first and len(calls) == 1
    with torch.no_grad():
        next(encoder.parameters()).add_(1.0)  # e.g. a training step
    assert cache_mod.weights_digest(encoder) != first and len(calls) == 2


def test_cache_key_covers_weights_without_a_safetensors_file(make_cfg, tmp_path: Path) -> None:
    """A folder (or hub snapshot) with pytorch_model.bin: same name and revision, other
    weights, another key."""
    folder = tmp_path / "model"
    keys = []
    for seed in (0, 1):
        tiny = build_encoder(make_cfg(f"encoder.seed={seed}"))
        tiny.model.config.save_pretrained(folder)
        torch.save(tiny.model.state_dict(), folder / "pytorch_model.bin")
        tiny.tokenizer.save_pretrained(folder)
        assert not (folder / "model.safetensors").exists()
        loaded = TransformerEncoder(str(folder))
        assert cache_mod.weights_digest(loaded) == cache_mod.weights_digest(tiny)
        keys.append(_key(loaded))
    assert keys[0] != keys[1]


def test_cache_hit_is_logged_at_info_with_entry_and_size(tmp_path: Path, caplog) -> None:
    cache = FeatureCache(tmp_path / "features", durable=False)
    parts = {"encoder": {"name": "x"}, "data": "d"}

    def compute(writer) -> None:
        writer.write("features", np.zeros((4, 8), dtype=np.float32))

    cache.get_or_compute(parts, compute, description="demo entry")
    with caplog.at_level(logging.INFO, logger="nlp_transfer.features.cache"):
        cache.get_or_compute(parts, compute)
    hits = [r for r in caplog.records if "cache hit" in r.getMessage()]
    assert hits and hits[0].levelno == logging.INFO
    message = hits[0].getMessage()
    assert cache_key(parts)[:12] in message and "demo entry" in message and "B" in message


# -- scheduler=stlr -----------------------------------------------------------------------------


def test_stlr_preset_gives_the_slanted_triangular_curve(make_cfg) -> None:
    cfg = make_cfg("scheduler=stlr")
    assert (cfg.scheduler.cut_frac, cfg.scheduler.ratio) == (0.1, 32)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.32)
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer, num_training_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = int(np.argmax(lrs))
    assert peak == 10  # cut = floor(0.1 * 100)
    assert lrs[0] == pytest.approx(0.32 / 32) and lrs[peak] == pytest.approx(0.32)
    assert all(a < b for a, b in itertools.pairwise(lrs[: peak + 1]))  # short linear rise
    assert all(a > b for a, b in itertools.pairwise(lrs[peak:]))  # long linear fall
    assert lrs[-1] < 0.32 / 32 * 1.5


# -- data.label_all_subtokens -------------------------------------------------------------------

NER = ["experiment=demo_ner", "encoder=tiny", "data.batch_size=8"]


def _ner_pair(make_cfg) -> tuple:
    """(module, batch) with label_all_subtokens off and on, the same weights and examples."""
    out = []
    for flag in ("false", "true"):
        cfg = make_cfg(*NER, f"data.label_all_subtokens={flag}", "seed=0")
        torch.manual_seed(0)
        encoder = build_encoder(cfg)
        dm = build_datamodule(cfg, encoder)
        dm.prepare_data()
        dm.setup("fit")
        module = build_module(cfg, encoder, dm.labels, dm.task)
        if out:
            module.load_state_dict(out[0][0].state_dict())
        batch = dm.collate([dm.tokenized("train")[i] for i in range(8)])
        out.append((module, batch))
    return out


def test_label_all_subtokens_changes_the_training_loss_not_the_scoring(make_cfg) -> None:
    (off, batch_off), (on, batch_on) = _ner_pair(make_cfg)
    assert on.subtoken_loss and not off.subtoken_loss
    assert "subtoken_labels" in batch_on and "subtoken_labels" not in batch_off
    # more subtokens than words: the subtoken loss counts every piece of a split word
    assert (batch_on["subtoken_labels"] != -100).sum() > (batch_on["labels"] != -100).sum()
    off.eval(), on.eval()  # no dropout: the losses differ by what they sum over only
    with torch.no_grad():
        loss_off = off.training_step(batch_off, 0)
        loss_on = on.training_step(batch_on, 0)
        assert not torch.isclose(loss_off, loss_on)
        # scoring is word level in both: same predictions, same metric states
        for module, batch in ((off, batch_off), (on, batch_on)):
            module._eval_step(batch, "val")
        preds_off = off.predict_step(batch_off, 0)["preds"]
        preds_on = on.predict_step(batch_on, 0)["preds"]
    assert torch.equal(preds_off, preds_on)
    assert off.task.metrics["val"].compute() == on.task.metrics["val"].compute()


@pytest.mark.slow
def test_label_all_subtokens_trains_differently_end_to_end(make_cfg) -> None:
    results = []
    for flag in ("false", "true"):
        cfg = make_cfg(
            *NER,
            f"data.label_all_subtokens={flag}",
            "+trainer.limit_train_batches=6",
            "+trainer.limit_val_batches=2",
            "test=false",
            run=f"run_{flag}",
        )
        metrics, _ = train(cfg)
        results.append(metrics)
    assert results[0]["val/loss"] != results[1]["val/loss"]
    assert {k for k in results[0] if k.startswith("val/")} == {
        k for k in results[1] if k.startswith("val/")
    }


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("head=crf", "CRF"),
        ("head=token_bilstm", "BiLSTM"),
        ("subword_pooling.mode=first_last", "first_last"),
        ("features.cache=true", "features.cache"),
    ],
)
def test_label_all_subtokens_refuses_what_cannot_train_on_subtokens(
    make_cfg, override: str, match: str
) -> None:
    extra = ["strategy=frozen"] if override.startswith("features") else []
    cfg = make_cfg(*NER, "data.label_all_subtokens=true", override, *extra)
    with pytest.raises(ConfigError, match=match):
        train(cfg)


# -- trainable parameters over the run ------------------------------------------------------------

QUICK = ["+trainer.limit_train_batches=4", "+trainer.limit_val_batches=1", "test=false"]


@pytest.mark.parametrize(
    ("overrides", "stages"),
    [
        (["strategy=lp_ft", "trainer.max_epochs=2"], 2),
        # tiny encoder: embeddings + 2 layers, one more group per optimizer step
        (["strategy=gradual_unfreeze", "strategy.unit=step"], 4),
    ],
)
def test_trainable_params_count_every_stage(make_cfg, overrides: list[str], stages: int) -> None:
    metrics, objects = train(make_cfg(*overrides, *QUICK))
    module = objects["module"]
    head = sum(p.numel() for p in module.head.parameters())
    assert metrics["trainable_params/stage1"] == head  # stage 1: the head alone
    counts = [metrics[f"trainable_params/stage{k}"] for k in range(1, stages + 1)]
    assert counts == sorted(counts) and len(set(counts)) == stages
    assert f"trainable_params/stage{stages + 1}" not in metrics
    # the whole encoder trains at the end
    assert metrics["trainable_params"] == metrics["trainable_params_max"] == counts[-1]
    assert metrics["trainable_params"] == metrics["total_params"] > head
    assert metrics["frozen_params"] == 0
    on_disk = json.loads((Path(objects["cfg"].paths.output_dir) / "metrics.json").read_text())
    assert on_disk["trainable_params"] == metrics["trainable_params"]


def test_trainable_params_single_stage_has_no_stage_keys() -> None:
    monitor = TrainableParamsMonitor()
    assert monitor.metrics(fallback=7) == {"trainable_params": 7, "trainable_params_max": 7}
    monitor.stages = [{"params": 66, "epoch": 0, "step": 0}]
    assert monitor.metrics(fallback=7) == {"trainable_params": 66, "trainable_params_max": 66}
    restored = TrainableParamsMonitor()
    restored.load_state_dict(monitor.state_dict())  # resumed runs keep earlier stages
    assert restored.stages == monitor.stages


# -- where predict and export write by default -----------------------------------------------------


def test_checkpoint_run_dir_and_free_default_output(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints" / "steps").mkdir(parents=True)
    assert checkpoint_run_dir(run / "checkpoints" / "last.ckpt") == run.resolve()
    assert checkpoint_run_dir(run / "checkpoints" / "steps" / "s.ckpt") == run.resolve()
    assert checkpoint_run_dir(tmp_path / "model.ckpt") == tmp_path.resolve()
    target = run / "predictions.jsonl"
    assert free_default_output(target) == target
    target.write_text("earlier results\\n")
    (run / "export").mkdir()  # an empty folder is free
    assert free_default_output(target) == run / "predictions_1.jsonl"
    assert free_default_output(run / "export") == run / "export"
    (run / "export" / "config.json").write_text("{}")
    assert free_default_output(run / "export") == run / "export_1"


def test_predict_and_export_default_outputs_go_beside_the_checkpoint(
    make_cfg, tmp_path: Path
) -> None:
    metrics, _ = train(make_cfg("+trainer.limit_train_batches=2", *QUICK[1:], run="trained"))
    ckpt = Path(metrics["best_checkpoint"])
    run = ckpt.parent.parent
    texts = tmp_path / "in.txt"
    texts.write_text("a fine film\n")
    args = [f"ckpt_path={ckpt}", f"input={texts}"]
    first = predict(make_cfg(*args, name="predict", run="p1"))
    second = predict(make_cfg(*args, name="predict", run="p2"))
    assert (first, second) == (run / "predictions.jsonl", run / "predictions_1.jsonl")
    assert not list((tmp_path / "p1").glob("*.jsonl"))  # not in predict's own folder
    result = export(make_cfg(f"ckpt_path={ckpt}", "verify=false", name="export", run="e1"))
    assert Path(result["export_dir"]) == run / "export"
    assert (run / "export" / "config.json").is_file()


def test_debug_fdr_writes_no_checkpoints_or_logger_files(make_cfg) -> None:
    metrics, objects = train(make_cfg("debug=fdr", "extras.print_config=false"))
    run = Path(objects["cfg"].paths.output_dir)
    assert "val/acc" in metrics and (run / "metrics.json").is_file()
    assert not (run / "checkpoints").exists() and not (run / "csv").exists()


# -- wandb run names ---------------------------------------------------------------------------------


def _as_hydra_job(cfg, **hydra_values) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        for key, value in hydra_values.items():
            OmegaConf.update(cfg, f"hydra.{key}", value, force_add=True)
    HydraConfig().set_config(cfg)


def test_wandb_run_name_of_a_single_run_leaves_out_paths_hydra_and_logger(make_cfg) -> None:
    cfg = make_cfg(
        "optimizer.lr=0.01",
        "paths.log_dir=/tmp/elsewhere",
        "hydra.run.dir=/tmp/run",
        "logger=wandb",
        "seed=3",
        fast=False,
    )
    _as_hydra_job(cfg)
    assert run_name() == "optimizer.lr=0.01,seed=3"


def test_wandb_run_name_of_a_sweep_job_has_only_the_swept_overrides(
    make_cfg, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    OmegaConf.save(
        {
            "hydra": {
                "overrides": {
                    "task": ["trainer=cpu", "seed=1,2", "optimizer.lr=0.1,0.01", "paths.log_dir=/x"]
                },
                "sweeper": {"params": {"strategy": "frozen,full", "data.batch_size": "16"}},
            }
        },
        sweep / "multirun.yaml",
    )
    job = ["trainer=cpu", "seed=2", "optimizer.lr=0.01", "paths.log_dir=/x", "strategy=full"]
    cfg = make_cfg(*job, "data.batch_size=16", fast=False)
    _as_hydra_job(cfg, mode="MULTIRUN", **{"job.num": 3, "sweep.dir": str(sweep)})
    assert run_name() == "3:seed=2,optimizer.lr=0.01,strategy=full"
