"""Wall-time overhead of sweep statistics on a synthetic 100-job sweep.

    python benchmarks/aggregate_overhead.py [--jobs 100] [--task both] [--resamples 2000]

Builds synthetic job dirs (10 groups × 10 seeds) with per-example predictions of realistic
size (SST-2 validation: 872 examples, 1,821 test; CoNLL-2003: 3,250 validation and 3,453 test
sentences), then times ``aggregate`` with the statistics and the predictions-free baseline
(the same jobs without predictions files), and prints the numbers. The package's torch /
torchmetrics imports are done before timing, as a multirun's process has them loaded.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

import nlp_transfer.metrics.entity  # noqa: F401  (imported by training already: not timed)
from nlp_transfer.sweeps.aggregate import aggregate
from nlp_transfer.training.predictions import Predictions, write_predictions

SIZES = {"sst2": {"val": 872, "test": 1821}, "conll": {"val": 3250, "test": 3453}}
TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def _predictions(
    task: str, split: str, n: int, acc: float, rng: np.random.Generator
) -> Predictions:
    data = np.random.default_rng(hash((task, split)) % 2**32)
    if task == "sst2":
        gold = data.integers(0, 2, n)
        pred = np.where(rng.random(n) < acc, gold, 1 - gold)
        return Predictions("classification", ["negative", "positive"], np.arange(n), gold, pred)
    lengths = data.integers(2, 30, n)
    gold = np.where(data.random(lengths.sum()) < 0.8, 0, data.integers(1, len(TAGS), lengths.sum()))
    pred = np.where(rng.random(len(gold)) < acc, gold, rng.integers(0, len(TAGS), len(gold)))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return Predictions("sequence_labeling", TAGS, np.arange(n), gold, pred, offsets)


def build(root: Path, task: str, jobs: int, with_predictions: bool) -> None:
    metric = "val/acc" if task == "sst2" else "val/f1"
    for num in range(jobs):
        group, seed = divmod(num, 10)
        job = root / str(num)
        (job / ".hydra").mkdir(parents=True)
        overrides = [f"strategy=s{group}", f"seed={seed}"]
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (job / ".hydra" / "config.yaml").write_text(
            yaml.safe_dump({"seed": seed, "monitor": metric})
        )
        rng = np.random.default_rng(num)
        acc = 0.8 + 0.01 * group
        metrics = {"seed": seed, metric: acc, metric.replace("val/", "test/"): acc}
        if with_predictions:
            for split, n in SIZES[task].items():
                write_predictions(job, split, _predictions(task, split, n, acc, rng))
        (job / "metrics.json").write_text(json.dumps(metrics))
        (job / "status.json").write_text(json.dumps({"status": "completed", "wall_s": 60.0}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--task", choices=["sst2", "conll", "both"], default="both")
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()
    for task in ["sst2", "conll"] if args.task == "both" else [args.task]:
        times = {}
        for with_predictions in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                root = Path(tmp)
                build(root, task, args.jobs, with_predictions)
                start = time.perf_counter()
                aggregate(root, n_resamples=args.resamples)
                times[with_predictions] = time.perf_counter() - start
        sizes = ", ".join(f"{k} {v}" for k, v in SIZES[task].items())
        print(
            f"{task}: {args.jobs} jobs ({sizes} examples), {args.resamples} resamples: "
            f"aggregate {times[True]:.2f} s with predictions, {times[False]:.2f} s without "
            f"(overhead of example-level statistics {times[True] - times[False]:.2f} s)"
        )


if __name__ == "__main__":
    main()
