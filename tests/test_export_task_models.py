"""Exports load as transformers task models: ``pipeline(...)`` predicts what the template
predicts where the head maps onto transformers' classifier; otherwise the export says so."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import pipeline

from nlp_transfer.checkpoint import read_checkpoint, restore
from nlp_transfer.data.sequence_labeling import split_words
from nlp_transfer.errors import ConfigError
from nlp_transfer.export import export, export_module, load_export
from nlp_transfer.heads.classification import SequenceClassificationHead
from nlp_transfer.module import TransferModule
from nlp_transfer.predict import predict_texts
from nlp_transfer.safe_targets import UnsafeConfigError
from nlp_transfer.strategies.base import TransferStrategy
from nlp_transfer.train import train

TEXTS = [
    "what a great film , truly wonderful",
    "the plot was dull and the acting terrible",
    "not bad at all",
    "Paris is lovely in spring",
    "I expected the sushi place to be fantastic, yet it turned out lousy.",
]
SENTENCES = [
    "John Smith works for Acme in Berlin .",
    "Paris is in France and Rome is in Italy",
    "the European Union met in Brussels on Monday",
]


def _scramble_head(module: TransferModule, seed: int = 0) -> None:
    """Large random head weights: a briefly trained tiny model predicts one class almost
    everywhere, which would make 'same predictions' an empty check."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 3)


def _centre_classifier(module: TransferModule, data) -> None:
    """Shift the bias so the texts' mean logits are equal: random tiny encoders give
    similar CLS features for every text, so otherwise one class would win everywhere."""
    module.eval()
    with torch.no_grad():
        logits, _ = module(data.collate(data.encode_texts(TEXTS)))
        last = [m for m in module.head.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.bias -= logits.mean(0)


def _trained(make_cfg, *overrides: str):
    quick = ("test=false", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1")
    metrics, _ = train(make_cfg(*overrides, *quick))
    return restore(read_checkpoint(metrics["best_checkpoint"]))


# a linear CLS head goes through BERT's tanh pooler's linear range, a tanh MLP of the
# encoder's width is the pooler itself
@pytest.mark.parametrize(
    ("head", "exact"),
    [
        ([], False),
        (["head=mlp", "head.pooling=cls", "head.activation=tanh", "head.hidden_dim=32"], True),
    ],
)
def test_text_classification_pipeline_matches_template(
    head: list[str], exact: bool, make_cfg, tmp_path: Path
) -> None:
    module, data = _trained(make_cfg, *head)
    _scramble_head(module)
    _centre_classifier(module, data)
    out = export_module(module, tmp_path / "export")
    meta = json.loads((out / "nlp_transfer.json").read_text())
    assert meta["task_model"]["exact"] is exact
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}
    loaded, data = load_export(out)
    ours = list(predict_texts(loaded, data, TEXTS))
    nlp = pipeline("text-classification", model=str(out), top_k=None, device="cpu")
    theirs = nlp(TEXTS)
    assert len({r["label"] for r in ours}) == 2  # both classes occur: a real comparison
    for mine, scores in zip(ours, theirs):
        probs = {s["label"]: s["score"] for s in scores}
        assert max(probs, key=probs.get) == mine["label"]
        for label, p in mine["probs"].items():
            assert probs[label] == pytest.approx(p, abs=1e-5)
    assert "text-classification" in (out / "README.md").read_text()


def test_token_classification_pipeline_matches_template(make_cfg, tmp_path: Path) -> None:
    module, _ = _trained(make_cfg, "experiment=demo_ner", "encoder=tiny", "head=token_linear")
    _scramble_head(module, seed=1)
    out = export_module(module, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForTokenClassification"]
    assert config["id2label"] == {str(i): t for i, t in enumerate(module.labels)}
    loaded, data = load_export(out)
    nlp = pipeline(
        "token-classification",
        model=str(out),
        aggregation_strategy="none",
        ignore_labels=[],
        device="cpu",
    )
    seen: set[str] = set()
    for text in SENTENCES:
        words, spans = split_words(text)
        batch = data.collate(data.encode_words([words]))
        with torch.no_grad():
            step = loaded.predict_step(batch, 0)
        tags = [loaded.labels[i] for i in step["preds"][0, : len(words)].tolist()]
        probs = step["probs"][0, : len(words)].max(-1).values.tolist()
        by_start = {}
        for token in nlp(text):
            by_start.setdefault(token["start"], token)  # a word's first subtoken
        firsts = [by_start[start] for start, _ in spans]
        assert [t["entity"] for t in firsts] == tags
        assert [t["score"] for t in firsts] == pytest.approx(probs, abs=1e-5)
        seen.update(tags)
    assert len(seen) >= 3


@pytest.mark.parametrize(
    ("overrides", "auto_class"),
    [
        ([], "AutoModelForSequenceClassification"),
        (["experiment=demo_ner", "encoder=tiny"], "AutoModelForTokenClassification"),
    ],
)
def test_export_verifies_the_task_model(
    overrides: list[str], auto_class: str, make_cfg, tmp_path: Path, monkeypatch
) -> None:
    import nlp_transfer.export as export_mod

    metrics, _ = train(make_cfg(*overrides, "test=false", "+trainer.limit_train_batches=2"))
    checked = []
    original = export_mod.task_model_predictions

    def spy(*args, **kwargs):
        rows = original(*args, **kwargs)
        checked.extend(r for r in rows if r is not None)
        return rows

    monkeypatch.setattr(export_mod, "task_model_predictions", spy)
    result = export(
        make_cfg(
            f"ckpt_path={metrics['best_checkpoint']}",
            f"output_dir={tmp_path / 'e'}",
            name="export",
            run="e",
        )
    )
    assert result["task_model"] == auto_class
    assert result["task_model_max_prob_diff"] <= 1e-5
    assert len(checked) == result["verified_examples"] > 0  # every text compared


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["head=mlp", "head.pooling=cls"], "MLP head"),
        (["head.pooling=mean"], "head.pooling='mean'"),
        (["layer_pooling=scalar_mix"], "scalar_mix"),
        (["experiment=demo_ner", "encoder=tiny", "head=crf"], "CRFHead"),
    ],
)
def test_unmappable_heads_say_so(
    overrides: list[str], reason: str, make_cfg, tmp_path: Path, caplog
) -> None:
    module, _ = _trained(make_cfg, *overrides)
    with caplog.at_level(logging.WARNING, logger="nlp_transfer.export"):
        out = export_module(module, tmp_path / "export")
    assert any("load_export" in r.message and reason in r.message for r in caplog.records)
    card = (out / "README.md").read_text()
    assert reason in card and "load_export" in card and "randomly" in card
    meta = json.loads((out / "nlp_transfer.json").read_text())
    assert meta["task_model"]["class"] is None
    assert "architectures" not in json.loads((out / "config.json").read_text()) or json.loads(
        (out / "config.json").read_text()
    )["architectures"] == ["BertModel"]
    load_export(out)  # the full model still loads


class UserHead(SequenceClassificationHead):
    """A user's own head, outside nlp_transfer (opted in with ``safe_targets_extra``)."""


def test_export_with_a_users_head_loads_when_opted_in(make_cfg, tmp_path: Path) -> None:
    target = f"{__name__}.UserHead"
    quick = ("test=false", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1")
    metrics, _ = train(make_cfg(f"head._target_={target}", *quick))
    ckpt = metrics["best_checkpoint"]
    out = tmp_path / "export"
    overrides = (f"ckpt_path={ckpt}", f"output_dir={out}", f"safe_targets_extra=[{target}]")
    result = export(make_cfg(*overrides, name="export", run="exp"))
    assert result["verified_examples"] > 0  # the reload inside export opted in too
    with pytest.raises(UnsafeConfigError, match="safe_targets_extra"):
        load_export(out)  # not opted in: refused
    loaded, _ = load_export(out, extra_targets=[target])
    assert type(loaded.head) is UserHead
    # a predictor: no optimizer, no strategy of the training run behind it
    assert loaded.optimizer_factory is None and type(loaded.strategy) is TransferStrategy
    with pytest.raises(ConfigError, match="built for prediction"):
        loaded.configure_optimizers()
