"""Training on cached frozen-encoder features: torch heads (same results as without the
cache, no encoder forward in the epoch loop) and sklearn heads (metrics equal to ones
computed by hand with sklearn.metrics / seqeval)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from seqeval.metrics import f1_score, precision_score, recall_score
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from sklearn.metrics import f1_score as sk_f1

from nlp_transfer.builders import build_datamodule, build_encoder
from nlp_transfer.encoders.subword_pooling import SubwordPooling
from nlp_transfer.encoders.transformer import TransformerEncoder
from nlp_transfer.errors import ConfigError
from nlp_transfer.features.cache import FeatureCache, default_root
from nlp_transfer.features.extract import FEATURES, feature_spec, get_features
from nlp_transfer.features.sklearn_train import build_estimator, layer_choice
from nlp_transfer.train import train
from nlp_transfer.utils.resolvers import CONFIG_DIR, PROJECT_ROOT

# Lightning 2.x never calls module.train(), so a randomly initialised encoder (built in train
# mode) keeps its dropout active in an *uncached* frozen run: its features are random. The
# cached run extracts in eval mode. To compare the two paths exactly, the tiny encoder gets
# dropout 0 (MiniLM, loaded with from_pretrained, is in eval mode anyway).
NO_DROPOUT = [
    "+encoder.config_overrides.hidden_dropout_prob=0.0",
    "+encoder.config_overrides.attention_probs_dropout_prob=0.0",
]
FROZEN = ["strategy=frozen", "optimizer.lr=3e-3", *NO_DROPOUT]
NER = [
    "data=demo_ner",
    "monitor=val/f1",
    "data.max_train_examples=120",
    "data.max_eval_examples=60",
]


def _scores(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith(("val/", "test/"))}


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert set(_scores(a)) == set(_scores(b))
    for key, value in _scores(a).items():
        assert math.isclose(value, b[key], rel_tol=0.0, abs_tol=1e-6), (key, value, b[key])


def _no_forward(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the encoder ran although its features are cached")


@pytest.mark.parametrize(
    "overrides",
    [
        ["head=mlp", "trainer.max_epochs=2"],  # mean pooling, then dropout, then an MLP
        [*NER, "head=crf"],
    ],
    ids=["classification-mlp", "ner-crf"],
)
def test_cached_frozen_run_equals_uncached(
    overrides: list[str], make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same seed, same metrics with and without the cache; once the cache is filled a run
    needs no encoder forward at all (here: forward raises)."""
    plain, _ = train(make_cfg(*FROZEN, *overrides, run="plain"))
    cached, objects = train(make_cfg(*FROZEN, *overrides, "features.cache=true", run="fill"))
    assert type(objects["datamodule"]).__name__ == "CachedFeatureDataModule"
    assert objects["datamodule"].cache is not None
    _assert_same(plain, cached)

    monkeypatch.setattr(TransformerEncoder, "forward", _no_forward)
    again, _ = train(make_cfg(*FROZEN, *overrides, "features.cache=true", run="hit"))
    _assert_same(plain, again)
    assert again["trainable_params"] == plain["trainable_params"]
    assert again["total_params"] == plain["total_params"]


def test_cache_needs_a_frozen_encoder(make_cfg) -> None:
    with pytest.raises(ConfigError, match="strategy=frozen"):
        train(make_cfg("strategy=full", "features.cache=true"))


@pytest.mark.parametrize("strategy", ["lp_ft", "gradual_unfreeze"])
def test_cache_refused_for_an_encoder_that_trains_later(make_cfg, strategy: str) -> None:
    """LP-FT and gradual unfreezing start frozen, but their encoder trains in a later stage:
    cached features would leave it training on nothing."""
    with pytest.raises(ConfigError, match=f"strategy={strategy}, whose encoder trains later"):
        train(make_cfg(f"strategy={strategy}", "features.cache=true"))


def test_cli_default_root_is_the_configs_cache_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m nlp_transfer.features.cache list`` looks where runs write by default."""

    def configured() -> Path:
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            cfg = compose("train")
        GlobalHydra.instance().clear()
        return Path(cfg.features.cache_dir)

    monkeypatch.delenv("NLP_TRANSFER_FEATURE_CACHE", raising=False)
    monkeypatch.delenv("NLP_TRANSFER_ROOT", raising=False)
    monkeypatch.delenv("NLP_TRANSFER_CACHE", raising=False)
    # the user cache folder (XDG), never inside the repository
    assert configured() == default_root()
    assert PROJECT_ROOT not in default_root().parents
    monkeypatch.setenv("NLP_TRANSFER_CACHE", "/somewhere/cache")
    assert configured() == default_root() == Path("/somewhere/cache/features")


def test_windows_are_merged_into_whole_sentences(make_cfg) -> None:
    """max_length 16 splits long sentences; each word still appears once, with the
    features of the window that owns it."""
    cfg = make_cfg(*NER, "data.max_length=16", "data.stride=4")
    encoder = build_encoder(cfg)
    data = build_datamodule(cfg, encoder)
    data.setup("fit")
    spec = feature_spec(cfg, data.task)
    arrays = get_features(encoder, data, "validation", spec, cache=None)
    sentences = data.examples["validation"]
    assert max(len(s.tokens) for s in sentences) > 14  # windows are really used
    assert arrays.num_items(FEATURES) == len(sentences)
    for i, s in enumerate(sentences):
        assert arrays.ragged(FEATURES, i).shape == (len(s.tokens), 3, 32)
    # word features recomputed window by window, keeping owned words only
    expected: dict[int, list[np.ndarray]] = {}
    pool = SubwordPooling("first")
    encoder.eval()
    with torch.no_grad():
        for batch in data.split_dataloader("validation"):
            hidden = encoder(batch["input_ids"], batch["attention_mask"])[-1]
            words = pool(hidden, batch["word_map"], batch["word_mask"].shape[1])
            for b in range(len(words)):
                owned = batch["owned_mask"][b] & batch["word_mask"][b]
                expected.setdefault(int(batch["sentence_id"][b]), []).append(words[b][owned])
    for sid, parts in expected.items():
        np.testing.assert_allclose(
            arrays.ragged(FEATURES, sid)[:, -1], torch.cat(parts).numpy(), atol=1e-6
        )


# -- sklearn heads -------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["svm", "random_forest", "logreg"])
def test_sklearn_head_configs(head: str, make_cfg) -> None:
    cfg = make_cfg(f"head={head}", "seed=7", fast=False)
    assert cfg.head.kind == "sklearn" and cfg.head.pooling in ("cls", "mean", "max")
    estimator = build_estimator(cfg.head)
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    assert hasattr(final, "fit") and final.random_state == 7
    assert layer_choice(cfg, 5, 8) == ([-1], "concat")
    assert layer_choice(make_cfg(f"head={head}", "layer_pooling=second_to_last"), 5, 8) == (
        [-2],
        "concat",
    )
    assert layer_choice(make_cfg(f"head={head}", "head.layer=[0,-1]"), 5, 8) == ([0, -1], "concat")
    assert layer_choice(make_cfg(f"head={head}", "layer_pooling=sum_last_four"), 5, 8) == (
        [-4, -3, -2, -1],
        "sum",
    )
    with pytest.raises(ConfigError, match="learned"):
        layer_choice(make_cfg(f"head={head}", "layer_pooling=scalar_mix"), 5, 8)


def _sentence_features(encoder: Any, data: Any, split: str) -> np.ndarray:
    """CLS vector of the top layer, computed directly with the encoder."""
    rows = []
    encoder.eval()
    with torch.no_grad():
        for batch in data.split_dataloader(split):
            rows.append(encoder(batch["input_ids"], batch["attention_mask"])[-1][:, 0])
    return torch.cat(rows).numpy()


@pytest.mark.parametrize("head", ["svm", "random_forest", "logreg"])
def test_sklearn_head_classification_metrics_by_hand(head: str, make_cfg) -> None:
    metrics, objects = train(make_cfg(f"head={head}", "features.cache=true"))
    assert FeatureCache(make_cfg().features.cache_dir).list_entries()  # shared cache filled
    saved = joblib.load(metrics["best_checkpoint"])
    estimator, labels = saved["estimator"], saved["labels"]
    assert metrics["strategy"] == "frozen" and metrics["task"] == "classification"
    if head == "random_forest":
        assert metrics["trainable_params"] is None
    else:
        assert metrics["trainable_params"] > 0
    encoder, data = objects["encoder"], objects["datamodule"]
    for stage, split in (("val", "validation"), ("test", "test")):
        x = _sentence_features(encoder, data, split)
        gold = np.array([labels.index(e.label) for e in data.examples[split]])
        pred = estimator.predict(x)
        assert metrics[f"{stage}/acc"] == pytest.approx(accuracy_score(gold, pred), abs=1e-6)
        macro = sk_f1(gold, pred, average="macro", labels=range(len(labels)), zero_division=0)
        assert metrics[f"{stage}/f1_macro"] == pytest.approx(macro, abs=1e-6)
    p, r, f, support = precision_recall_fscore_support(
        gold, pred, labels=range(len(labels)), zero_division=0
    )
    for i, name in enumerate(labels):
        assert metrics[f"test/per_class/{name}/precision"] == pytest.approx(p[i], abs=1e-6)
        assert metrics[f"test/per_class/{name}/recall"] == pytest.approx(r[i], abs=1e-6)
        assert metrics[f"test/per_class/{name}/f1"] == pytest.approx(f[i], abs=1e-6)
        assert metrics[f"test/per_class/{name}/support"] == support[i]


def test_sklearn_head_ner_metrics_equal_seqeval(make_cfg) -> None:
    metrics, objects = train(make_cfg(*NER, "head=logreg"))
    saved = joblib.load(metrics["best_checkpoint"])
    estimator, labels = saved["estimator"], saved["labels"]
    encoder, data = objects["encoder"], objects["datamodule"]
    pool = SubwordPooling("first")
    encoder.eval()
    for stage, split in (("val", "validation"), ("test", "test")):
        predicted: dict[int, list[str]] = {}
        with torch.no_grad():
            for batch in data.split_dataloader(split):
                hidden = encoder(batch["input_ids"], batch["attention_mask"])[-1]
                words = pool(hidden, batch["word_map"], batch["word_mask"].shape[1])
                for b in range(len(words)):
                    assert int(batch["word_offset"][b]) == 0  # demo sentences fit one window
                    ids = estimator.predict(words[b][batch["word_mask"][b]].numpy())
                    predicted[int(batch["sentence_id"][b])] = [labels[i] for i in ids]
        sentences = data.examples[split]
        gold = [list(s.tags) for s in sentences]
        pred = [predicted[i] for i in range(len(sentences))]
        assert metrics[f"{stage}/f1"] == pytest.approx(f1_score(gold, pred), abs=1e-6)
        assert metrics[f"{stage}/precision"] == pytest.approx(precision_score(gold, pred), abs=1e-6)
        assert metrics[f"{stage}/recall"] == pytest.approx(recall_score(gold, pred), abs=1e-6)
    assert metrics["task"] == "sequence_labeling"
    assert Path(metrics["best_checkpoint"]).name == "model.joblib"


def test_sklearn_head_refuses_a_training_checkpoint(make_cfg, tmp_path) -> None:
    from nlp_transfer.errors import ConfigError
    from nlp_transfer.train import train

    cfg = make_cfg("head=logreg", f"ckpt_path={tmp_path / 'some.ckpt'}")
    with pytest.raises(ConfigError, match="cannot start from a training checkpoint"):
        train(cfg)
