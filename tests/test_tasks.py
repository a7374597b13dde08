"""The task seam (nlp_transfer/tasks): what each task type scores and how, and that a new
task type plugs into the module by registering one class."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import pytest
import torch

from nlp_transfer.encoders.subword_pooling import SubwordPooling
from nlp_transfer.encoders.transformer import TransformerEncoder, packaged_minilm_dir
from nlp_transfer.errors import ConfigError
from nlp_transfer.heads.classification import SequenceClassificationHead
from nlp_transfer.module import TransferModule
from nlp_transfer.multitask.module import MultiTaskModule, TaskSpec
from nlp_transfer.strategies.simple import FullFineTuning
from nlp_transfer.tasks import TASKS, ClassificationTask, SequenceLabelingTask, build_task

TAGS = ["O", "B-PER", "I-PER"]


def test_an_unknown_task_type_names_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"task='regression'.*'classification'.*'sequence"):
        build_task("regression", ["a"])


def test_only_word_level_tasks_build_the_subword_pooling() -> None:
    pooling = partial(SubwordPooling, mode="first_last")
    cls_task = build_task("classification", ["neg", "pos"], pooling)
    ner_task = build_task("sequence_labeling", TAGS, pooling)
    assert cls_task.subword_pooling is None and cls_task.feature_size(8) == 8
    assert isinstance(ner_task.subword_pooling, SubwordPooling) and ner_task.feature_size(8) == 16
    feats = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    batch = {
        "attention_mask": torch.ones(2, 4, dtype=torch.long),
        "word_map": torch.tensor([[-1, 0, 1, -1], [-1, 0, 0, -1]]),
        "word_mask": torch.tensor([[True, True], [True, False]]),
    }
    words, mask = ner_task.to_words(feats, batch)
    assert words.shape == (2, 2, 6) and mask is batch["word_mask"]
    assert torch.equal(words[0, 1], torch.cat([feats[0, 2], feats[0, 2]]))
    same, cls_mask = cls_task.to_words(feats, batch)
    assert same is feats and cls_mask is batch["attention_mask"]


def test_classification_task_scores_per_stage_and_reports_per_class() -> None:
    task = ClassificationTask(["neg", "pos"])
    batch = {"labels": torch.tensor([0, 1, 1, 1])}
    task.update("val", torch.tensor([0, 1, 0, 1]), batch)
    task.update("test", torch.tensor([0, 1, 1, 1]), batch)
    assert task.compute("val")["acc"] == pytest.approx(0.75)
    assert task.compute("test")["acc"] == pytest.approx(1.0)
    report = task.report()
    assert report["pos/support"] == 3 and report["neg/recall"] == pytest.approx(1.0)
    task.update("val", torch.tensor([1, 1, 1, 1]), batch)  # compute reset the earlier state
    assert task.compute("val")["acc"] == pytest.approx(0.75)


def _window_batch() -> dict[str, torch.Tensor]:
    """Sentence 0 whole (3 words); sentence 1 (4 words) in two windows: words 0-2 (owns 0, 1)
    and words 1-3 (owns 2, 3)."""
    return {
        "labels": torch.tensor([[1, 2, 0], [0, 1, 2], [1, 2, 0]]),
        "word_mask": torch.ones(3, 3, dtype=torch.bool),
        "owned_mask": torch.tensor([[1, 1, 1], [1, 1, 0], [0, 1, 1]], dtype=torch.bool),
        "word_offset": torch.tensor([0, 0, 1]),
        "sentence_words": torch.tensor([3, 4, 4]),
        "sentence_id": torch.tensor([0, 1, 1]),
    }


def test_sequence_labeling_scores_windows_once_merged_by_ownership() -> None:
    task = SequenceLabelingTask(TAGS)
    # gold sentence 1: O B-PER I-PER O. Word 2 is predicted I-PER by the window that does
    # not own it and O by the one that does: merged, the entity is B-PER alone (wrong)
    preds = torch.tensor([[1, 2, 0], [0, 1, 2], [1, 0, 0]])
    task.update("val", preds, _window_batch())
    assert int(task.metrics["val"].gold.sum()) == 1  # only the whole sentence so far
    values = task.compute("val")
    assert values["precision"] == pytest.approx(0.5) and values["recall"] == pytest.approx(0.5)
    assert task.compute("val")["f1"] == 0.0  # windows and states were cleared


@pytest.fixture
def topic_task() -> Iterator[type[ClassificationTask]]:
    """A user's task type: classification scored with a single extra number."""

    class TopicTask(ClassificationTask):
        name = "topic"
        primary_metric = "acc"

        def compute(self, stage: str) -> dict[str, float]:
            values = super().compute(stage)
            return {**values, "error": 1.0 - values["acc"]}

    TASKS["topic"] = TopicTask
    yield TopicTask
    del TASKS["topic"]


def _encoder() -> TransformerEncoder:
    torch.manual_seed(0)
    return TransformerEncoder(
        packaged_minilm_dir(),
        random_init=True,
        config_overrides=dict(
            num_hidden_layers=1,
            hidden_size=16,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=64,
        ),
    )


def test_a_registered_task_type_plugs_into_single_and_multi_task_modules(topic_task) -> None:
    labels = ["a", "b", "c"]
    head = partial(SequenceClassificationHead)
    batch = {
        "input_ids": torch.randint(1, 64, (4, 6)),
        "attention_mask": torch.ones(4, 6, dtype=torch.long),
        "labels": torch.tensor([0, 1, 2, 0]),
    }
    single = TransferModule(_encoder(), head, FullFineTuning(), labels, None, task="topic")
    multi = MultiTaskModule(
        _encoder(),
        [TaskSpec("t", "topic", labels, head)],
        FullFineTuning(),
        optimizer=partial(torch.optim.SGD, lr=0.1),
    )
    for module in (single, multi):
        module.eval()
        with torch.no_grad():
            preds = module.validation_step(batch, 0)
        name, task = module.task_for(batch)
        assert isinstance(task, topic_task) and name == (None if module is single else "t")
        values = task.compute("val")
        assert values["error"] == pytest.approx(
            1 - float((preds == batch["labels"]).float().mean())
        )
    assert single.checkpoint_meta()["task"] == "topic"
    assert multi.tasks["t"].primary_metric == "acc"


def test_whole_split_arrays_are_scored_like_batches() -> None:
    """``update_examples`` (sklearn heads, probes) gives what ``update`` gives for the same
    predictions: one owner of the metrics for both paths."""
    import numpy as np

    gold, pred = np.array([0, 1, 1, 0, 1]), np.array([0, 1, 0, 0, 1])
    arrays, batches = ClassificationTask(["neg", "pos"]), ClassificationTask(["neg", "pos"])
    arrays.update_examples("test", pred, gold)
    batches.update("test", torch.as_tensor(pred), {"labels": torch.as_tensor(gold)})  # type: ignore[typeddict-item]
    scores = arrays.compute("test")
    assert scores == batches.compute("test") and scores["acc"] == pytest.approx(0.8)
    report = arrays.report()
    assert report and report == batches.report()

    ner = SequenceLabelingTask(TAGS)
    with pytest.raises(ValueError, match="offsets"):
        ner.update_examples("val", np.array([0, 1]), np.array([0, 1]))
    # sentence 1: "B-PER I-PER O" found; sentence 2: "O B-PER" missed
    words_gold = np.array([1, 2, 0, 0, 1])
    words_pred = np.array([1, 2, 0, 0, 0])
    ner.update_examples("val", words_pred, words_gold, np.array([0, 3, 5]))
    scores = ner.compute("val")
    assert scores["precision"] == pytest.approx(1.0) and scores["recall"] == pytest.approx(0.5)
