"""The per-example predictions file format (training → sweep statistics)."""

import numpy as np
import pytest

from nlp_transfer.training.predictions import (
    Predictions,
    load_run_predictions,
    predictions_path,
    read_predictions,
    write_predictions,
)


def test_classification_roundtrip(tmp_path):
    p = Predictions(
        task="classification",
        labels=["neg", "pos"],
        index=np.arange(4),
        gold=np.array([0, 1, 1, 0]),
        pred=np.array([0, 1, 0, 0]),
    )
    write_predictions(tmp_path, "test", p)
    back = read_predictions(predictions_path(tmp_path, "test"))
    assert back.task == "classification" and back.labels == ["neg", "pos"]
    assert back.offsets is None
    np.testing.assert_array_equal(back.pred, [0, 1, 0, 0])
    assert set(load_run_predictions(tmp_path)) == {"test"}
    assert not list(tmp_path.glob("predictions/.*"))  # no temp file left


def test_sequence_roundtrip(tmp_path):
    p = Predictions.from_sequences(["O", "B-PER", "I-PER"], [[1, 2], [0]], [[1, 0], [0]])
    write_predictions(tmp_path, "val", p)
    back = load_run_predictions(tmp_path)["val"]
    assert back.num_examples == 2
    assert back.sentences() == [(["B-PER", "I-PER"], ["B-PER", "O"]), (["O"], ["O"])]


def test_invalid_shapes_refused():
    with pytest.raises(ValueError, match="differ"):
        Predictions("classification", ["a"], np.arange(2), np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="offsets"):
        Predictions("sequence_labeling", ["a"], np.arange(2), np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match="split"):
        predictions_path(".", "train")
