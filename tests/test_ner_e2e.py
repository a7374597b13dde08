"""Sequence labeling end to end on a tiny random encoder, with and without a CRF."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from seqeval.metrics import f1_score

from nlp_transfer.checkpoint import read_checkpoint, restore
from nlp_transfer.eval import evaluate
from nlp_transfer.predict import predict, predict_entities
from nlp_transfer.train import train

NER = ["experiment=demo_ner", "encoder=tiny", "trainer.max_epochs=2", "optimizer.lr=3e-3"]


@pytest.mark.parametrize("head", ["token_linear", "crf"])
def test_ner_train_eval_predict(head: str, make_cfg, tmp_path: Path) -> None:
    metrics, _ = train(make_cfg(*NER, f"head={head}"))
    for key in ("val/f1", "val/precision", "val/recall", "val/f1_macro", "test/f1", "test/f1/PER"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["task"] == "sequence_labeling"
    ckpt = metrics["best_checkpoint"]
    # eval on the validation split reproduces the training run's number
    cfg = make_cfg(
        f"ckpt_path={ckpt}",
        "split=validation",
        "trainer=cpu",
        "trainer.enable_progress_bar=false",
        name="eval",
        run="eval",
    )
    result, _ = evaluate(cfg)
    assert result["val/f1"] == pytest.approx(metrics["val/f1"])
    # raw text in, entity spans with character offsets out
    inp = tmp_path / "in.txt"
    inp.write_text("Maria Lopez joined Nordwind Bank in Oslo .\n")
    out = predict(make_cfg(f"ckpt_path={ckpt}", f"input={inp}", name="predict", run="pred"))
    row = json.loads(out.read_text())
    assert len(row["tags"]) == len(row["tokens"]) == 8
    for ent in row["entities"]:
        assert row["text"][ent["start"] : ent["end"]] == ent["text"]
        assert ent["type"] in ("PER", "ORG", "LOC", "MISC") and 0.0 <= ent["score"] <= 1.0


def test_windowed_scores_equal_seqeval_on_merged_predictions(make_cfg) -> None:
    """With max_length 16 most sentences are split into windows. The logged val/f1 must
    equal seqeval's F1 on the merged word-level predictions of whole sentences."""
    metrics, _ = train(make_cfg(*NER, "data.max_length=16", "data.stride=4", "head=crf"))
    run = read_checkpoint(metrics["best_checkpoint"])
    module, data = restore(run)
    data.load_examples()
    sentences = data.examples["validation"]
    assert max(len(s.tokens) for s in sentences) > 14  # windows are really used
    items = [(" ".join(s.tokens), s.tokens, [(0, 0)] * len(s.tokens)) for s in sentences]
    predicted = [row["tags"] for row in predict_entities(module, data, items)]
    gold = [s.tags for s in sentences]
    assert all(len(p) == len(g) for p, g in zip(predicted, gold))
    assert metrics["val/f1"] == pytest.approx(f1_score(gold, predicted), abs=1e-6)


def test_long_sentence_every_word_one_prediction(make_cfg, tmp_path: Path) -> None:
    metrics, _ = train(make_cfg(*NER, "trainer.max_epochs=1", "data.max_length=32"))
    run = read_checkpoint(metrics["best_checkpoint"])
    module, data = restore(run)
    words = [f"word{i % 37}" if i % 5 else "Berlin" for i in range(600)]
    text = " ".join(words)
    spans, pos = [], 0
    for w in words:
        spans.append((pos, pos + len(w)))
        pos += len(w) + 1
    [row] = list(predict_entities(module, data, [(text, words, spans)]))
    assert len(row["tags"]) == 600
    assert len(data.encode_words([words])) > 10  # it really was windowed


def test_bioes_training_reports_iob2_entities(make_cfg) -> None:
    metrics, objects = train(
        make_cfg(*NER, "trainer.max_epochs=1", "data.train_scheme=BIOES", "head=crf")
    )
    labels = objects["module"].labels
    assert any(t.startswith("S-") for t in labels) and any(t.startswith("E-") for t in labels)
    assert 0.0 <= metrics["val/f1"] <= 1.0


def test_ner_export_reloads_with_same_predictions(make_cfg, tmp_path: Path) -> None:
    from nlp_transfer.export import export

    metrics, _ = train(make_cfg(*NER, "trainer.max_epochs=1", "head=crf"))
    out = tmp_path / "export"
    result = export(
        make_cfg(
            f"ckpt_path={metrics['best_checkpoint']}", f"output_dir={out}", name="export", run="e"
        )
    )
    assert result["verified_examples"] > 0 and result["max_prob_diff"] <= 1e-4
