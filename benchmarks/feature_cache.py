"""Frozen-encoder runs with and without the shared feature cache.

Usage (from the repository root)::

    .venv/bin/python benchmarks/feature_cache.py                       # SST-2, 2000 train
    .venv/bin/python benchmarks/feature_cache.py --max-train 2000 --epochs 3 --json out.json

K = 5 frozen-encoder runs of the packaged MiniLM (``encoder=minilm``) on an SST-2 slice
(``../shared/data/sst2``), sentence features mean-pooled, differing in head and layer:

1. ``linear``: linear head on the top layer;
2. ``mlp``: MLP head on the top layer;
3. ``linear-2nd-last``: linear head on the second-to-last layer (``layer_pooling``);
4. ``logreg``: scikit-learn logistic regression on the top layer;
5. ``svm``: scikit-learn linear SVM on the top layer.

Each run is done twice, in one process, through ``nlp_transfer.train.train``: first without
the cache (torch heads run the encoder every epoch; sklearn heads compute the features once
for the run), then with ``features.cache=true`` on a cache that starts empty, so the first
cached run pays for the extraction and the others reuse it. Wall time is the whole
``train(cfg)`` call (model load, data, training, validation, test, checkpoints). The
script prints a table: run, wall time without / with the cache, ``val/acc`` and ``test/acc``
without / with, the largest difference over every val/test metric, totals and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NLP_TRANSFER_SHARED_DATA", ROOT.parent / "shared" / "data"))

RUNS: list[tuple[str, list[str]]] = [
    ("linear", ["head=linear"]),
    ("mlp", ["head=mlp"]),
    ("linear-2nd-last", ["head=linear", "layer_pooling=second_to_last"]),
    ("logreg", ["head=logreg"]),
    ("svm", ["head=svm"]),
]


def base_overrides(args: argparse.Namespace) -> list[str]:
    """What every run shares: data slice, encoder, frozen strategy, CPU trainer."""
    out = [
        "data=sst2",
        f"data.data_dir={args.data_dir}",
        f"data.max_train_examples={args.max_train}",
        "encoder=minilm",
        "strategy=frozen",
        "head.pooling=mean",
        "trainer=cpu",
        f"trainer.max_epochs={args.epochs}",
        "trainer.enable_progress_bar=false",
        "trainer.num_sanity_val_steps=0",
        "callbacks.model_summary=null",
        "extras.print_config=false",
        "optimizer.lr=1e-3",
        "monitor=val/acc",
        f"seed={args.seed}",
    ]
    if args.max_eval:
        out.append(f"data.max_eval_examples={args.max_eval}")
    return out


def compose_run(overrides: list[str], output_dir: Path, cache_dir: Path) -> Any:
    """Compose ``train`` like the CLI, with the run's output and cache dirs pinned."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from nlp_transfer.utils.resolvers import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache_dir)
    GlobalHydra.instance().clear()
    return cfg


def timed_run(overrides: list[str], output_dir: Path, cache_dir: Path) -> tuple[float, dict]:
    from nlp_transfer.train import train

    cfg = compose_run(overrides, output_dir, cache_dir)
    start = time.perf_counter()
    metrics, _ = train(cfg)
    return time.perf_counter() - start, metrics


def scores(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if k.startswith(("val/", "test/")) and isinstance(v, int | float)
    }


def max_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    sa, sb = scores(a), scores(b)
    if set(sa) != set(sb):
        return float("nan")
    return max((abs(sa[k] - sb[k]) for k in sa), default=0.0)


def render(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the runs plus totals."""
    header = (
        "| run | wall no cache (s) | wall cache (s) | speedup | val/acc no cache | "
        "val/acc cache | test/acc no cache | test/acc cache | max metric diff |"
    )
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['wall_plain']:.1f} | {r['wall_cached']:.1f} | "
            f"{r['wall_plain'] / r['wall_cached']:.1f}x | {r['val_plain']:.4f} | "
            f"{r['val_cached']:.4f} | {r['test_plain']:.4f} | {r['test_cached']:.4f} | "
            f"{r['max_diff']:.1e} |"
        )
    plain = sum(r["wall_plain"] for r in rows)
    cached = sum(r["wall_cached"] for r in rows)
    worst = max(r["max_diff"] for r in rows)
    lines.append(
        f"| **total** | {plain:.1f} | {cached:.1f} | **{plain / cached:.1f}x** | | | | | "
        f"{worst:.1e} |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=SHARED / "sst2")
    parser.add_argument("--max-train", type=int, default=2000)
    parser.add_argument("--max-eval", type=int, default=None, help="cap val/test (default: all)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--keep", type=Path, default=None, help="keep run dirs under here")
    args = parser.parse_args(argv)
    if not args.data_dir.is_dir():
        print(f"SST-2 not found at {args.data_dir} (--data-dir)", file=sys.stderr)
        return 2

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="feature_cache_bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"  # tokenization (shared by both sides) and features (empty)
    shutil.rmtree(cache / "features", ignore_errors=True)
    base = base_overrides(args)
    rows = []
    try:
        for name, extra in RUNS:
            wall_plain, plain = timed_run([*base, *extra], work / f"{name}-plain", cache)
            wall_cached, cached = timed_run(
                [*base, *extra, "features.cache=true"], work / f"{name}-cached", cache
            )
            row = {
                "run": name,
                "overrides": extra,
                "wall_plain": wall_plain,
                "wall_cached": wall_cached,
                "val_plain": plain["val/acc"],
                "val_cached": cached["val/acc"],
                "test_plain": plain.get("test/acc", float("nan")),
                "test_cached": cached.get("test/acc", float("nan")),
                "max_diff": max_difference(plain, cached),
            }
            rows.append(row)
            print(
                f"[{name}] {wall_plain:.1f}s -> {wall_cached:.1f}s, val/acc "
                f"{row['val_plain']:.4f} / {row['val_cached']:.4f}",
                flush=True,
            )
            if not args.keep:  # checkpoints hold the encoder: free the disk as we go
                shutil.rmtree(work / f"{name}-plain", ignore_errors=True)
                shutil.rmtree(work / f"{name}-cached", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        f"SST-2 slice: {args.max_train} train, "
        f"{'all' if not args.max_eval else args.max_eval} val/test; MiniLM frozen, "
        f"{args.epochs} epochs for torch heads; torch threads {torch.get_num_threads()}"
    )
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
