"""Layer probing: ``python -m nlp_transfer.probe [overrides]`` (config ``conf/probe.yaml``).

One frozen pass over each split (through the feature cache, so a second probe of the same
data and encoder runs no encoder at all), then a probe, the ``head`` sklearn estimator
(logistic regression by default), fitted per hidden state (``0`` = embeddings) and per
pooling (``probe.poolings``). Scores use the metric code of training runs. Writes
``probe.csv`` (one row per layer and pooling: ``layer``, ``pooling``, ``val/<m>``,
``test/<m>``, ``fit_s``) and ``probe.png`` (the chosen metric per layer) into the run dir,
and returns the table as a :class:`pandas.DataFrame`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
from omegaconf import DictConfig, ListConfig
from pytorch_lightning import seed_everything

from nlp_transfer.builders import build_datamodule, build_encoder, check_required
from nlp_transfer.errors import ConfigError
from nlp_transfer.features.extract import (
    SENTENCE,
    WORD,
    FeatureSpec,
    cache_from_config,
    get_features,
    resolve_device,
    resolve_precision,
    split_labels,
)
from nlp_transfer.features.sklearn_train import build_estimator, score_predictions, split_matrix
from nlp_transfer.utils.config_tree import print_config_tree
from nlp_transfer.utils.io import guard_new_output
from nlp_transfer.utils.resolvers import CONFIG_DIR

log = logging.getLogger(__name__)

CSV_FILE = "probe.csv"
PNG_FILE = "probe.png"


def probe_poolings(cfg: DictConfig, task: str) -> list[str]:
    """``probe.poolings``, or the one pooling the head / subword pooling config names."""
    chosen = (cfg.get("probe") or {}).get("poolings")
    if chosen is not None:
        values = list(chosen) if isinstance(chosen, ListConfig | list | tuple) else [chosen]
        if not values:
            raise ConfigError("probe.poolings is empty")
        return [str(v) for v in values]
    if task == "sequence_labeling":
        return [str((cfg.get("subword_pooling") or {}).get("mode", "first"))]
    return [str(cfg.head.get("pooling", "cls"))]


def probe_layers(cfg: DictConfig, num_states: int) -> list[int]:
    """Hidden-state indices to probe, normalised to ``0..num_states-1``."""
    chosen = (cfg.get("probe") or {}).get("layers", "all")
    if chosen is None or chosen == "all":
        return list(range(num_states))
    values = list(chosen) if isinstance(chosen, ListConfig | list | tuple) else [chosen]
    layers = []
    for v in values:
        i = int(v)
        if not -num_states <= i < num_states:
            raise ConfigError(f"probe.layers: {i} out of range for {num_states} hidden states")
        layers.append(i % num_states)
    return layers


def probe_metric(cfg: DictConfig, task: str) -> str:
    metric = (cfg.get("probe") or {}).get("metric")
    if metric:
        return str(metric)
    return "val/f1_macro" if task == "classification" else "val/f1"


def plot_probe(table: pd.DataFrame, metric: str, path: Path, title: str = "") -> None:
    """Score per layer, one line per pooling (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for pooling, rows in table.groupby("pooling", sort=False):
        rows = rows.sort_values("layer")
        (line,) = ax.plot(rows["layer"], rows[metric], marker="o", label=f"{pooling} ({metric})")
        test_metric = "test/" + metric.split("/", 1)[-1]
        if test_metric in rows and rows[test_metric].notna().any():
            ax.plot(
                rows["layer"],
                rows[test_metric],
                marker=".",
                linestyle="--",
                alpha=0.6,
                color=line.get_color(),
                label=f"{pooling} ({test_metric})",
            )
    ax.set_xlabel("hidden state (0 = embeddings)")
    ax.set_ylabel(metric)
    ax.set_xticks(sorted(table["layer"].unique()))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def probe(cfg: DictConfig) -> pd.DataFrame:
    """Fit one probe per layer (and pooling); write ``probe.csv`` / ``probe.png``."""
    check_required(cfg)
    out_dir = Path(cfg.paths.output_dir)
    guard_new_output(out_dir / CSV_FILE, "probe table")
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("extras", {}).get("print_config", True):
        print_config_tree(cfg, save_to=out_dir / "config_tree.log")
    if cfg.get("seed") is not None:
        seed_everything(int(cfg.seed), workers=True)
    if cfg.head.get("kind") != "sklearn":
        raise ConfigError("the probe is a sklearn head: use head=logreg|svm|random_forest")

    encoder = build_encoder(cfg)
    datamodule = build_datamodule(cfg, encoder)
    datamodule.prepare_data()
    datamodule.setup(None)
    task, labels = datamodule.task, datamodule.labels
    level = WORD if task == "sequence_labeling" else SENTENCE
    features = cfg.get("features") or {}
    cache = cache_from_config(cfg)
    layers = probe_layers(cfg, encoder.num_layers + 1)
    splits = [("train", "train"), ("val", "validation")]
    if cfg.get("test", True) and "test" in datamodule.examples:
        splits.append(("test", "test"))

    rows: list[dict[str, Any]] = []
    for pooling in probe_poolings(cfg, task):
        spec = FeatureSpec(
            level=level,
            pooling=pooling,
            dtype=str(features.get("dtype", "float32")),
            precision=resolve_precision(cfg),
            device=resolve_device(cfg),
        )
        arrays = {
            split: get_features(encoder, datamodule, split, spec, cache) for _, split in splits
        }
        targets = {split: split_labels(datamodule, split) for _, split in splits}
        for layer in layers:
            data = {
                stage: split_matrix(arrays[split], targets[split], level, [layer])
                for stage, split in splits
            }
            estimator = build_estimator(cfg.head)
            start = time.perf_counter()
            estimator.fit(data["train"].x, data["train"].y)
            row: dict[str, Any] = {"layer": layer, "pooling": pooling}
            row["fit_s"] = round(time.perf_counter() - start, 3)
            for stage, _ in splits[1:]:
                preds = estimator.predict(data[stage].x)
                row.update(score_predictions(preds, data[stage], labels, task, stage))
            rows.append(row)
            log.info("probe layer %d (%s): %s", layer, pooling, row)
    table = pd.DataFrame(rows)
    table = table[[c for c in table.columns if "/" not in c.split("/", 1)[-1]]]  # no per type
    metric = probe_metric(cfg, task)
    if metric not in table:
        raise ConfigError(f"probe.metric={metric!r} is not a column; choose one of {list(table)}")
    table.attrs["metric"] = metric
    table.to_csv(out_dir / CSV_FILE, index=False)
    title = f"{getattr(encoder, 'name_or_path', type(encoder).__name__)}".rsplit("/", 1)[-1]
    plot_probe(table, metric, out_dir / PNG_FILE, title=f"{title}: {metric} per layer")
    best = table.loc[table[metric].idxmax()]
    log.info(
        "probe table %s: best %s = %.4f at layer %d (%s)",
        out_dir / CSV_FILE,
        metric,
        best[metric],
        best["layer"],
        best["pooling"],
    )
    return table


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="probe")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the best probe score (for sweepers)."""
    table = probe(cfg)
    return float(table[table.attrs["metric"]].max())


if __name__ == "__main__":
    main()
