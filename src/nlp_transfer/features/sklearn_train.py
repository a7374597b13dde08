"""scikit-learn heads (SVM, random forest, logistic regression) on frozen-encoder features.

``python -m nlp_transfer.train head=svm|logreg|random_forest [features.cache=true]`` lands
here (``head.kind: sklearn``). The estimator (``head.estimator``, built by Hydra) is fitted on
the train split's features: one pooled vector per sentence for classification, one vector per
word for sequence labeling. Validation and test are scored with the metric code of torch runs
(:func:`~nlp_transfer.metrics.classification.classification_metrics`,
:class:`~nlp_transfer.metrics.classification.PerClassReport`,
:class:`~nlp_transfer.metrics.entity.EntityF1`), so ``metrics.json`` has the same keys.

Head config keys: ``pooling`` (sentence features: ``cls`` / ``mean`` / ``max``), ``layer``
(``null``: as the ``layer_pooling`` group says, the top layer when unset; an index, ``0`` =
embeddings, ``-1`` = top; or a list of indices), ``layer_combine`` (a list's combination:
``concat`` / ``sum`` / ``mean``), ``scale`` (standardise features first) and ``estimator``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from nlp_transfer.builders import build_datamodule, build_encoder, plain_config
from nlp_transfer.errors import ConfigError
from nlp_transfer.features.extract import (
    FEATURES,
    SENTENCE,
    WORD,
    FeatureArrays,
    cache_from_config,
    feature_spec,
    get_features,
    select_layers,
    split_labels,
)
from nlp_transfer.tasks import build_task
from nlp_transfer.training.hardware import apply_hardware_settings, metrics_record
from nlp_transfer.training.predictions import Predictions, write_predictions
from nlp_transfer.training.resume import RunPlan, slurm_fields
from nlp_transfer.training.run import prepare_run
from nlp_transfer.utils.io import OutputExistsError, atomic_write_json, write_atomically

log = logging.getLogger(__name__)

MODEL_FILE = "model.joblib"
_EVAL_SPLITS = (("val", "validation"), ("test", "test"))


@dataclass
class SplitData:
    """Feature matrix of one split: ``x`` ``[n, D]``, ``y`` ``[n]`` and, for word-level
    data, sentence boundaries ``offsets`` ``[sentences + 1]`` into the rows."""

    x: np.ndarray
    y: np.ndarray
    offsets: np.ndarray | None = None


def layer_choice(
    cfg: DictConfig, num_hidden_states: int, hidden_size: int
) -> tuple[list[int], str]:
    """Hidden states a sklearn head reads and how they combine (``concat``/``sum``/``mean``):
    ``head.layer`` (with ``head.layer_combine``) if set, else what the configured
    ``layer_pooling`` reads (:meth:`LayerPooling.selection`), else the top layer."""
    head = cfg.head
    layer = head.get("layer")
    combine = str(head.get("layer_combine", "concat"))
    if isinstance(layer, ListConfig | list | tuple):
        return [int(i) for i in layer], combine
    if layer is not None:
        return [int(layer)], combine
    if not cfg.get("layer_pooling"):
        return [-1], "concat"
    pooling = instantiate(
        cfg.layer_pooling, num_hidden_states=num_hidden_states, hidden_size=hidden_size
    )
    layers, combine = pooling.selection()
    if combine == "mix":
        raise ConfigError(
            f"layer_pooling mode {pooling.mode!r} is learned and cannot feed a sklearn head; "
            "set head.layer=<index> or a list of indices (with head.layer_combine)"
        )
    return layers, combine


def build_estimator(head: DictConfig) -> Any:
    """The configured estimator, behind a ``StandardScaler`` when ``head.scale`` is true."""
    if head.get("estimator") is None:
        raise ConfigError("a sklearn head needs an `estimator:` node with a _target_")
    estimator = instantiate(head.estimator)
    return make_pipeline(StandardScaler(), estimator) if head.get("scale", False) else estimator


def split_matrix(
    arrays: FeatureArrays,
    labels: list[Any],
    level: str,
    layers: list[int],
    combine: str = "concat",
) -> SplitData:
    """Rows for the estimator: one per sentence, or one per word with sentence offsets."""
    x = select_layers(arrays[FEATURES], layers, combine)
    if level == SENTENCE:
        return SplitData(x=x, y=np.asarray(labels, dtype=np.int64))
    if level != WORD:
        raise ConfigError(f"sklearn heads read sentence or word features, not {level!r}")
    offsets = np.asarray(arrays[FEATURES + ".offsets"], dtype=np.int64)
    y = np.concatenate([np.asarray(t, dtype=np.int64) for t in labels]) if labels else np.empty(0)
    if len(y) != len(x) or len(offsets) != len(labels) + 1:
        raise RuntimeError(f"{len(x)} word vectors for {len(y)} word labels")
    return SplitData(x=x, y=y, offsets=offsets)


def score_predictions(
    preds: np.ndarray,
    data: SplitData,
    labels: list[str],
    task: str,
    stage: str,
    per_class: bool = False,
) -> dict[str, float]:
    """``{stage}/<metric>`` for predicted label ids, scored by the task like a torch run."""
    scorer = build_task(task, labels)
    scorer.update_examples(stage, preds, data.y, data.offsets)
    out = {f"{stage}/{k}": v for k, v in scorer.compute(stage).items()}
    if per_class:
        out.update({f"{stage}/per_class/{k}": v for k, v in scorer.report().items()})
    return out


def split_predictions(
    preds: np.ndarray, data: SplitData, labels: list[str], task: str
) -> Predictions:
    """The per-example predictions file of a split (the rows :func:`score_predictions`
    scores: one per example, or every word of every sentence)."""
    preds = np.asarray(preds, dtype=np.int64)
    if task == "classification":
        index = np.arange(len(data.y), dtype=np.int64)
        return Predictions(task=task, labels=labels, index=index, gold=data.y, pred=preds)
    assert data.offsets is not None
    return Predictions(
        task=task,
        labels=labels,
        index=np.arange(len(data.offsets) - 1, dtype=np.int64),
        gold=data.y,
        pred=preds,
        offsets=data.offsets,
    )


def fitted_parameter_count(estimator: Any) -> int | None:
    """Numbers a linear model / SVM learned (coefficients, support vectors); None for trees."""
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    names = ("coef_", "intercept_", "dual_coef_", "support_vectors_")
    arrays = [getattr(final, n) for n in names if hasattr(final, n)]
    if not arrays:
        return None
    return int(sum(np.asarray(a).size for a in arrays))


class SklearnRunner:
    """A scikit-learn estimator on frozen features (``runner=sklearn``, set by the sklearn
    heads)."""

    def __call__(self, cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
        if cfg.head.get("kind") != "sklearn":
            raise ConfigError(
                f"runner=sklearn needs a sklearn head (head=svm|logreg|random_forest), not "
                f"head._target_={cfg.head.get('_target_')}"
            )
        return train_sklearn(cfg)


def train_sklearn(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit ``head.estimator`` on frozen features, score val/test, save the model (joblib)
    and ``metrics.json``; returns ``(metrics, objects)`` like :func:`nlp_transfer.train.train`."""
    apply_hardware_settings(cfg)  # features.precision null follows trainer.precision (auto)
    out_dir = Path(cfg.paths.output_dir)
    if cfg.get("ckpt_path"):
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: sklearn heads (head.kind=sklearn) "
            "are fitted in one pass on frozen features and cannot start from a training "
            "checkpoint; drop ckpt_path"
        )
    if cfg.get("resume") not in (None, False, ""):
        log.info("sklearn head: one-pass fit, nothing to resume; fitting from the start")
    if (out_dir / "metrics.json").exists():
        raise OutputExistsError(
            f"{out_dir} already holds metrics.json of another run; nothing was overwritten. "
            "Use a new hydra.run.dir."
        )
    prepare_run(cfg, RunPlan(out_dir))
    strategy = str((cfg.get("strategy") or {}).get("_target_", "")).rsplit(".", 1)[-1]
    if strategy and strategy != "FrozenEncoder":
        log.info("sklearn head: the encoder stays frozen whatever strategy=%s says", strategy)

    encoder = build_encoder(cfg)
    datamodule = build_datamodule(cfg, encoder)
    datamodule.prepare_data()
    datamodule.setup(None)
    task, labels = datamodule.task, datamodule.labels
    spec = feature_spec(cfg, task, level=None if task != "classification" else SENTENCE)
    layers, combine = layer_choice(cfg, encoder.num_layers + 1, encoder.hidden_size)
    cache = cache_from_config(cfg)

    def load(split: str) -> SplitData:
        arrays = get_features(encoder, datamodule, split, spec, cache)
        return split_matrix(arrays, split_labels(datamodule, split), spec.level, layers, combine)

    start = time.perf_counter()
    train_data = load("train")
    feature_s = time.perf_counter() - start
    estimator = build_estimator(cfg.head)
    start = time.perf_counter()
    estimator.fit(train_data.x, train_data.y)
    wall = time.perf_counter() - start
    log.info(
        "fitted %s on %d x %d features in %.2fs",
        type(estimator).__name__,
        *train_data.x.shape,
        wall,
    )

    metrics: dict[str, Any] = {}
    for stage, split in _EVAL_SPLITS:
        if split not in datamodule.examples or (stage == "test" and not cfg.get("test", True)):
            continue
        data = load(split)
        predicted = estimator.predict(data.x)
        metrics.update(
            score_predictions(predicted, data, labels, task, stage, per_class=stage == "test")
        )
        if cfg.get("save_predictions", True):
            write_predictions(out_dir, stage, split_predictions(predicted, data, labels, task))
    model_path = out_dir / MODEL_FILE
    fitted_model = {
        "estimator": estimator,
        "labels": labels,
        "task": task,
        "layers": layers,
        "layer_combine": combine,
        "features": {"level": spec.level, "pooling": spec.pooling, "dtype": spec.dtype},
        "encoder": encoder.identity(),
        "config": plain_config(cfg),
    }
    write_atomically(model_path, lambda tmp: joblib.dump(fitted_model, tmp))
    encoder_params = sum(p.numel() for p in encoder.parameters())
    fitted = fitted_parameter_count(estimator)
    metrics.update(
        {
            "best_checkpoint": str(model_path.resolve()),
            "best_epoch": None,
            "epochs": None,
            "global_steps": None,
            "train_wall_s": round(wall, 3),
            "feature_wall_s": round(feature_s, 3),
            "train_examples": len(datamodule.examples["train"]),
            "trainable_params": fitted,
            "trainable_params_max": fitted,
            "total_params": encoder_params + (fitted or 0),
            "frozen_params": encoder_params,
            "seed": cfg.get("seed"),
            "task": task,
            "strategy": "frozen",
            "estimator": type(estimator[-1] if hasattr(estimator, "steps") else estimator).__name__,
            **metrics_record(cfg),
            "feature_precision": spec.precision,  # the encoder pass's (autocast) precision
        }
    )
    metrics.update(slurm_fields())  # the SLURM job (array task) id, inside a SLURM job
    atomic_write_json(out_dir / "metrics.json", metrics)
    shown = {
        k: v
        for k, v in metrics.items()
        if k.startswith(("val/", "test/")) and "/per_class/" not in k
    }
    log.info("final metrics (%s): %s", out_dir / "metrics.json", shown)
    return metrics, {
        "estimator": estimator,
        "encoder": encoder,
        "datamodule": datamodule,
        "train_data": train_data,
        "cfg": cfg,
    }
