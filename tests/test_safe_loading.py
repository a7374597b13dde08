"""Checkpoints load safely: weights_only, no foreign code, no silent label or task mix-ups."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from nlp_transfer.checkpoint import CheckpointError, check_fits, read_checkpoint, restore
from nlp_transfer.encoders.transformer import TransformerEncoder
from nlp_transfer.train import train
from nlp_transfer.utils.resolvers import CONFIG_DIR

LIMITS = [
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tests.conftest import FAST, compose_config

    root = tmp_path_factory.mktemp("safe")
    cfg = compose_config("train", [*FAST, *LIMITS], root / "run", root / "cache")
    metrics, _ = train(cfg)
    steps = sorted((root / "run" / "checkpoints" / "steps").glob("*.ckpt"))
    return {"root": root, "best": Path(metrics["best_checkpoint"]), "last": steps[-1]}


def _variant(src: Path, dst: Path, edit: Any) -> Path:
    """A copy of checkpoint ``src`` whose ``nlp_transfer`` entry ``edit`` changed."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    edit(ckpt["nlp_transfer"])
    torch.save(ckpt, dst)
    return dst


def test_training_checkpoint_is_weights_only_loadable(trained: dict[str, Any]) -> None:
    ckpt = torch.load(trained["last"], map_location="cpu", weights_only=True)
    assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks"} <= set(ckpt)
    resume = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ResumeState"))
    assert {"seed", "epoch", "batches_done", "num_batches", "rng"} <= set(resume)
    meta = ckpt["nlp_transfer"]
    assert meta["task"] == "classification" and meta["labels"] == ["negative", "positive"]


def test_read_checkpoint_never_unpickles_objects(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self) -> Any:
            return (os.makedirs, (str(marker),))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "nlp_transfer": {"x": Payload()}}, path)
    with pytest.raises(CheckpointError, match="cannot be read as a checkpoint"):
        read_checkpoint(path)
    assert not marker.exists()


def test_check_fits_refuses_other_task_and_labels(trained: dict[str, Any]) -> None:
    run = read_checkpoint(trained["best"], mmap=True)
    check_fits(run, "classification", ["negative", "positive"])
    with pytest.raises(CheckpointError, match="trained for task 'classification'.*refusing"):
        check_fits(run, expect_task="sequence_labeling")
    with pytest.raises(CheckpointError, match=r"only in this run's data: \['neutral'\]"):
        check_fits(run, expect_labels=["negative", "neutral", "positive"])
    with pytest.raises(CheckpointError, match="same labels in another order"):
        check_fits(run, expect_labels=["positive", "negative"])


def test_restore_refuses_other_labels(trained: dict[str, Any]) -> None:
    run = read_checkpoint(trained["best"])
    with pytest.raises(CheckpointError, match="label set"):
        restore(run, expect_labels=["a", "b", "c"])
    module, _ = restore(run, expect_task="classification", expect_labels=run.labels)
    assert module.labels == run.labels


def test_restore_refuses_foreign_targets(trained: dict[str, Any]) -> None:
    run = read_checkpoint(trained["best"])
    run.config.encoder._target_ = "os.system"
    run.config.encoder.command = "touch /tmp/should_not_exist"
    with pytest.raises(CheckpointError, match=r"encoder._target_='os.system'.*Refused"):
        restore(run)
    run = read_checkpoint(trained["best"])
    run.config.optimizer = OmegaConf.create({"_target_": "builtins.eval", "_args_": ["1"]})
    with pytest.raises(CheckpointError, match="optimizer._target_='builtins.eval'"):
        restore(run)


def test_restore_accepts_the_packages_own_optimizers(trained: dict[str, Any]) -> None:
    run = read_checkpoint(trained["best"])
    run.config.optimizer._target_ = "nlp_transfer.training.lazy_adamw.LazyAdamW"
    module, _ = restore(run)  # what optimizer=lazy_adamw writes into its checkpoints
    assert module.speed.lazy_embeddings


def test_restore_needs_explicit_trust_remote_code(trained: dict[str, Any]) -> None:
    run = read_checkpoint(trained["best"])
    run.config.encoder.trust_remote_code = True
    with pytest.raises(CheckpointError, match="trust_remote_code=True explicitly"):
        restore(run)
    module, _ = restore(run, trust_remote_code=True)  # the caller's explicit decision
    assert module.labels == run.labels


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(labels=["negative", "neutral", "positive"]), "label set"),
        (lambda m: m.update(labels=["positive", "negative"]), "another order"),
        (lambda m: m.update(task="sequence_labeling"), "trained for task 'sequence_labeling'"),
    ],
    ids=["other_labels", "reordered_labels", "other_task"],
)
def test_training_refuses_mismatched_checkpoint(
    trained: dict[str, Any], make_cfg, tmp_path: Path, edit: Any, message: str
) -> None:
    bad = _variant(trained["last"], tmp_path / "bad.ckpt", edit)
    cfg = make_cfg(f"ckpt_path={bad}", *LIMITS)
    with pytest.raises(CheckpointError, match=message):
        train(cfg)
    out = Path(cfg.paths.output_dir)
    assert not (out / "metrics.json").exists() and not (out / "checkpoints").exists()


def test_training_continues_from_matching_checkpoint(trained: dict[str, Any], make_cfg) -> None:
    # a new run (new folder) starting from another run's state, loaded with weights_only
    metrics, _ = train(make_cfg(f"ckpt_path={trained['last']}", "trainer.max_epochs=2", *LIMITS))
    assert metrics["global_steps"] == 6


def test_encoders_do_not_trust_remote_code_by_default() -> None:
    assert inspect.signature(TransformerEncoder).parameters["trust_remote_code"].default is False
    for path in sorted((CONFIG_DIR / "encoder").glob("*.yaml")):
        conf = yaml.safe_load(path.read_text())
        if conf.get("_target_", "").endswith("TransformerEncoder"):
            assert conf.get("trust_remote_code", False) is False, path.name


def test_eval_predict_export_take_trust_remote_code_from_config(
    trained: dict[str, Any], tmp_path: Path, make_cfg
) -> None:
    from nlp_transfer.eval import evaluate
    from nlp_transfer.export import export
    from nlp_transfer.predict import predict

    def needs_remote_code(meta: dict[str, Any]) -> None:
        meta["config"]["encoder"]["trust_remote_code"] = True

    ckpt = _variant(trained["best"], tmp_path / "remote.ckpt", needs_remote_code)
    texts = tmp_path / "in.txt"
    texts.write_text("a fine film\n")
    entry_points = [
        (
            evaluate,
            "eval",
            ["split=validation", "trainer=cpu", "trainer.enable_progress_bar=false"],
        ),
        (predict, "predict", [f"input={texts}"]),
        (export, "export", []),
    ]
    for i, (entry, name, extra) in enumerate(entry_points):
        refused = make_cfg(f"ckpt_path={ckpt}", *extra, name=name, run=f"{name}_refused")
        with pytest.raises(CheckpointError, match="trust_remote_code"):
            entry(refused)
        allowed = make_cfg(
            f"ckpt_path={ckpt}", "trust_remote_code=true", *extra, name=name, run=f"{name}_{i}"
        )
        assert entry(allowed)
