"""Sweep statistics: confidence intervals, paired comparisons, failed runs, budget curves.

Used by :func:`nlp_transfer.sweeps.aggregate.aggregate` (so by the multirun callback, the
``python -m nlp_transfer.aggregate`` CLI and the notebook alike).

- **Replicates.** A group (one combination of the swept axes) holds replicate runs that
  differ only in ``seed`` and ``data.fold`` (k-fold): statistics are over replicates.
- **Example statistics.** Where a run wrote per-example predictions
  (:mod:`nlp_transfer.training.predictions`), each example gets sufficient statistics
  (classification: correct / per-class tp, fp, fn; NER: per-sentence entity tp, predicted,
  gold, from :func:`nlp_transfer.metrics.entity.sentence_counts`) from which the metric of any
  resample is recomputed exactly: F1 is never averaged over examples.
- **CIs.** ``seeds``: percentile bootstrap over the replicates' scores
  (``scipy.stats.bootstrap``); ``seeds×examples``: two-level bootstrap, replicates resampled
  and examples resampled (one draw per replicate set that shares the same examples, since every
  seed is scored on the same test examples) with the metric recomputed per replicate.
- **Comparisons.** Paired approximate randomisation over examples (per example, the two
  groups' outputs are swapped at random in every seed pair; p two-sided) with a paired
  bootstrap CI of the difference; and, with >= 3 replicates in both groups, a permutation test
  over the replicates' scores (``scipy.stats.permutation_test``). Holm–Bonferroni per family.
  The decision is the example test's where predictions exist, else the seed test's.
- **Budget.** Expected maximum validation score over ``n`` trials (Dodge et al. 2019/2021).

Every random draw comes from a generator seeded by the group names, so re-running gives
the same numbers.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REPLICATE_KEYS = ("seed", "data.fold")
LEARNING_AXES = ("data.max_train_examples", "data.train_fraction")
CONFIDENCE = 0.95
ALPHA = 0.05
CI_SEEDS = "seeds"
CI_TWO_LEVEL = "seeds×examples"
DIVERGED = "diverged"
DEGENERATE = "degenerate"
_EPS = 1e-9

ScoreFn = Callable[[np.ndarray], np.ndarray]


def _rng(*parts: Any) -> np.random.Generator:
    """A generator seeded by ``parts`` (stable across processes, unlike ``hash``)."""
    return np.random.default_rng(zlib.crc32("\x1f".join(map(str, parts)).encode()))


# --------------------------------------------------------------------------- example stats


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def _ratio(totals: np.ndarray) -> np.ndarray:
    return _safe_div(totals[..., 0], totals[..., 1])


def _macro_f1(totals: np.ndarray) -> np.ndarray:
    """Macro F1 from ``[..., 3C]`` (tp, fp, fn per class); classes absent from both gold and
    predictions are left out of the average (as torchmetrics does)."""
    tp, fp, fn = totals[..., 0::3], totals[..., 1::3], totals[..., 2::3]
    den = 2 * tp + fp + fn
    f1 = _safe_div(2 * tp, den)
    present = (den > 0).sum(-1)
    return _safe_div(f1.sum(-1), present)


def _entity_f1(totals: np.ndarray) -> np.ndarray:
    return _safe_div(2 * totals[..., 0], totals[..., 1] + totals[..., 2])


def _entity_precision(totals: np.ndarray) -> np.ndarray:
    return _safe_div(totals[..., 0], totals[..., 1])


def _entity_recall(totals: np.ndarray) -> np.ndarray:
    return _safe_div(totals[..., 0], totals[..., 2])


def metric_kind(task: str, metric: str) -> str | None:
    """The recomputable statistic behind ``metric`` (``val/acc`` → ``acc``), or None."""
    name = metric.split("/", 1)[-1]
    if task == "classification" and name in ("acc", "f1_micro", "f1_macro"):
        return "acc" if name != "f1_macro" else "f1_macro"
    if task == "sequence_labeling" and name in ("f1", "precision", "recall"):
        return name
    return None


def example_statistics(preds: Any, kind: str) -> tuple[np.ndarray, np.ndarray, ScoreFn]:
    """``(index, stats [N, K], score_fn)`` of one run's split, sorted by example index;
    ``score_fn(stats.sum(0))`` is the metric ``kind`` on that split."""
    order = np.argsort(preds.index, kind="stable")
    index = preds.index[order]
    if preds.task == "classification":
        gold, pred = preds.gold[order], preds.pred[order]
        if kind == "acc":
            stats = np.stack([gold == pred, np.ones_like(gold, dtype=bool)], 1)
            return index, stats.astype(np.float64), _ratio
        classes = np.arange(len(preds.labels))[None, :]
        g, p = gold[:, None] == classes, pred[:, None] == classes
        stats = np.stack([g & p, p & ~g, g & ~p], axis=2).reshape(len(gold), -1)
        return index, stats.astype(np.float64), _macro_f1
    import torch

    from nlp_transfer.metrics.entity import sentence_counts

    # small tensor ops: torch's intra-op threads cost far more than they save (20x here)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        counts = sentence_counts(preds.labels, preds.gold, preds.pred, preds.offsets)[order]
    finally:
        torch.set_num_threads(threads)
    fn = {"f1": _entity_f1, "precision": _entity_precision, "recall": _entity_recall}[kind]
    return index, counts.astype(np.float64), fn


def chance_score(preds: Any, kind: str, stats: np.ndarray | None = None) -> float:
    """The score of the best constant prediction on this split's gold labels: the majority
    class (classification) or all-``O`` (sequence labeling: no entity predicted, so the
    counts are ``(0, 0, gold entities)``; ``stats`` are the run's per-sentence counts)."""
    if preds.task == "sequence_labeling":
        if stats is None:
            stats = example_statistics(preds, kind)[1]
        fn = {"f1": _entity_f1, "precision": _entity_precision, "recall": _entity_recall}[kind]
        return float(fn(np.array([0.0, 0.0, stats[:, 2].sum()])))
    best = -math.inf
    for c in np.unique(preds.gold):
        const = type(preds)(
            preds.task, preds.labels, preds.index, preds.gold, np.full_like(preds.gold, c)
        )
        _, stats, fn = example_statistics(const, kind)
        best = max(best, float(fn(stats.sum(0))))
    return best


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One completed job as the statistics see it."""

    job_dir: str
    group: tuple[str, ...]
    replicate: tuple[str, ...]
    score: float  # primary metric from metrics.json (nan when missing)
    test_score: float
    wall_s: float | None
    splits: dict[str, tuple[np.ndarray, np.ndarray, ScoreFn]] = field(default_factory=dict)
    chance: float | None = None
    failed: str | None = None  # None, "diverged" or "degenerate"

    @property
    def ok(self) -> bool:
        return self.failed is None and math.isfinite(self.score)


def load_run(
    job_path: Path,
    job_dir: str,
    group: tuple[str, ...],
    replicate: tuple[str, ...],
    metrics: dict[str, Any],
    primary: str,
    test_metric: str | None,
    wall_s: float | None,
    lower_is_better: bool,
) -> Run:
    """Read a completed job's predictions (if any) and classify it as failed or not."""
    from nlp_transfer.training.predictions import load_run_predictions

    score = _as_float(metrics.get(primary))
    test_score = _as_float(metrics.get(test_metric)) if test_metric else math.nan
    run = Run(job_dir, group, replicate, score, test_score, wall_s)
    try:
        preds = load_run_predictions(job_path)
    except Exception as e:  # a corrupt file must not stop the aggregation
        log.warning("%s: cannot read predictions: %s", job_path, e)
        preds = {}
    for split, p in preds.items():
        kind = metric_kind(p.task, primary)
        if kind is not None:
            run.splits[split] = example_statistics(p, kind)
            if split == "val" and primary.startswith("val/") and not lower_is_better:
                run.chance = chance_score(p, kind, run.splits[split][1])
    if not math.isfinite(score):
        run.failed = DIVERGED
    elif run.chance is not None and score <= run.chance + _EPS:
        run.failed = DEGENERATE
    return run


def _as_float(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def diverged_error(error: str | None) -> bool:
    """Whether a failed job's recorded error is a NaN/inf stop."""
    text = str(error or "")
    return text.startswith(("NonFiniteLossError", "FloatingPointError")) or "loss is nan" in text


# --------------------------------------------------------------------------- intervals


def seed_interval(values: Sequence[float], key: str, n_resamples: int) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over replicates; (nan, nan) below 2 values, and
    the point itself for identical values."""
    from scipy.stats import bootstrap

    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return math.nan, math.nan
    if np.ptp(x) == 0:
        return float(x[0]), float(x[0])
    res = bootstrap(
        (x,),
        np.mean,
        confidence_level=CONFIDENCE,
        n_resamples=n_resamples,
        method="percentile",
        vectorized=True,
        random_state=_rng("seeds", key),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _example_counts(rng: np.random.Generator, b: int, n: int) -> np.ndarray:
    """``[b, n]`` resampling counts (each row sums to ``n``)."""
    draws = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
    return np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def _replicate_scores(
    runs: Sequence[tuple[np.ndarray, np.ndarray, ScoreFn]], rng: np.random.Generator, b: int
) -> np.ndarray:
    """``[b, R]`` scores of each run on ``b`` example resamples; runs scored on the same
    examples share each resample."""
    out = np.empty((b, len(runs)))
    by_examples: dict[bytes, list[int]] = {}
    for r, (index, _, _) in enumerate(runs):
        by_examples.setdefault(index.tobytes(), []).append(r)
    for members in by_examples.values():
        n = len(runs[members[0]][0])
        stacked = np.concatenate([runs[r][1] for r in members], axis=1)  # [N, R*K]
        k = runs[members[0]][1].shape[1]
        for lo in range(0, b, 500):
            hi = min(b, lo + 500)
            totals = (_example_counts(rng, hi - lo, n) @ stacked).reshape(hi - lo, len(members), k)
            for j, r in enumerate(members):
                out[lo:hi, r] = runs[r][2](totals[:, j, :])
    return out


def two_level_interval(
    runs: Sequence[tuple[np.ndarray, np.ndarray, ScoreFn]], key: str, n_resamples: int
) -> tuple[float, float]:
    """Two-level percentile bootstrap CI of the mean over replicates: replicates resampled,
    examples resampled, the metric recomputed from the resampled sufficient statistics."""
    rng = _rng("two-level", key)
    scores = _replicate_scores(runs, rng, n_resamples)
    r = scores.shape[1]
    pick = rng.integers(0, r, size=(n_resamples, r))
    boot = np.take_along_axis(scores, pick, axis=1).mean(axis=1)
    lo, hi = np.quantile(boot, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return float(lo), float(hi)


@dataclass
class Interval:
    mean: float
    low: float
    high: float
    kind: str
    n: int

    def text(self) -> str:
        if math.isnan(self.mean):
            return "–"
        if math.isnan(self.low):
            return f"{_fmt(self.mean)} (n={self.n}: no CI)"
        if self.kind == CI_SEEDS and self.n == 2:  # a bootstrap of two values is their range
            return f"{_fmt(self.mean)} (n=2: range {_fmt(self.low)}–{_fmt(self.high)})"
        return f"{_fmt(self.mean)} [{_fmt(self.low)}, {_fmt(self.high)}]"


def _fmt(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}" if abs(x) < 1000 else f"{x:.1f}"


def group_interval(
    runs: Sequence[Run], split: str, key: str, n_resamples: int, test: bool = False
) -> Interval:
    """Mean over the runs' scores with the best CI the data allow."""
    values = [r.test_score if test else r.score for r in runs]
    values = [v for v in values if math.isfinite(v)]
    mean = float(np.mean(values)) if values else math.nan
    with_preds = [r.splits[split] for r in runs if split in r.splits]
    if values and len(with_preds) == len(runs) == len(values):
        low, high = two_level_interval(with_preds, f"{key}/{split}", n_resamples)
        return Interval(mean, low, high, CI_TWO_LEVEL, len(values))
    low, high = seed_interval(values, f"{key}/{split}/{test}", n_resamples)
    return Interval(mean, low, high, CI_SEEDS, len(values))


# --------------------------------------------------------------------------- comparisons


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (nan stays nan)."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    m = len(order)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def _pair_runs(a: Sequence[Run], b: Sequence[Run]) -> list[tuple[Run, Run]]:
    """Replicates matched by (seed, fold) where both groups have them, else by order."""
    by_b = {r.replicate: r for r in b}
    common = [r for r in a if r.replicate in by_b]
    if common:
        return [(r, by_b[r.replicate]) for r in sorted(common, key=lambda r: r.replicate)]
    sa, sb = sorted(a, key=lambda r: r.replicate), sorted(b, key=lambda r: r.replicate)
    return list(zip(sa, sb))


def paired_example_test(
    pairs: Sequence[tuple[Run, Run]], split: str, key: str, n_resamples: int
) -> dict[str, float] | None:
    """Paired test over examples pooled across the seed pairs: the difference of mean scores,
    a paired bootstrap CI of it, and an approximate-randomisation p-value (two-sided)."""
    if not pairs or any(split not in a.splits or split not in b.splits for a, b in pairs):
        return None
    common = None
    for a, b in pairs:
        for run in (a, b):
            idx = run.splits[split][0]
            common = idx if common is None else np.intersect1d(common, idx)
    if common is None or len(common) == 0:
        return None

    def restrict(run: Run) -> np.ndarray:
        idx, stats, _ = run.splits[split]
        return stats[np.searchsorted(idx, common)]

    fn = pairs[0][0].splits[split][2]
    sa = np.concatenate([restrict(a) for a, _ in pairs], axis=1)  # [N, J*K]
    sb = np.concatenate([restrict(b) for _, b in pairs], axis=1)
    j, k = len(pairs), sa.shape[1] // len(pairs)

    def delta(ta: np.ndarray, tb: np.ndarray) -> np.ndarray:
        shape = (*ta.shape[:-1], j, k)
        return fn(ta.reshape(shape)).mean(-1) - fn(tb.reshape(shape)).mean(-1)

    ta, tb = sa.sum(0), sb.sum(0)
    observed = float(delta(ta, tb))
    rng = _rng("paired", key, split)
    n = len(common)
    boots, extreme, diff = [], 0, sb - sa
    for lo in range(0, n_resamples, 500):
        size = min(n_resamples, lo + 500) - lo
        counts = _example_counts(rng, size, n)
        boots.append(delta(counts @ sa, counts @ sb))
        swap = (rng.random((size, n)) < 0.5).astype(np.float64)
        moved = swap @ diff
        extreme += int((np.abs(delta(ta + moved, tb - moved)) >= abs(observed) - _EPS).sum())
    low, high = np.quantile(np.concatenate(boots), [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return {
        "diff": observed,
        "low": float(low),
        "high": float(high),
        "p": (extreme + 1) / (n_resamples + 1),
        "examples": n,
        "pairs": j,
    }


def seed_permutation_test(a: Sequence[float], b: Sequence[float], key: str) -> float:
    """Two-sided permutation test of the difference of mean scores over replicates
    (``scipy.stats.permutation_test``, exact for small groups); nan below 3 per group."""
    from scipy.stats import permutation_test

    if len(a) < 3 or len(b) < 3:
        return math.nan
    res = permutation_test(
        (np.asarray(a), np.asarray(b)),
        lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis),
        permutation_type="independent",
        vectorized=True,
        n_resamples=9999,
        alternative="two-sided",
        random_state=_rng("seed-perm", key),
    )
    return float(res.pvalue)


# --------------------------------------------------------------------------- budget


def expected_max(values: Sequence[float], n: int, replacement: bool = False) -> float:
    """Expected maximum of ``n`` trials drawn from ``values``.

    ``replacement=False``: the unbiased estimator (Dodge et al. 2021): the mean of the maximum
    over all size-``n`` subsets, ``sum_i v_(i) C(i-1, n-1) / C(N, n)`` (``n <= N``).
    ``replacement=True``: "show your work" (Dodge et al. 2019) with the empirical CDF,
    ``sum_i v_(i) [(i/N)^n - ((i-1)/N)^n]``.
    """
    from scipy.special import gammaln

    v = np.sort(np.asarray(values, dtype=np.float64))
    big = len(v)
    if big == 0 or n < 1:
        return math.nan
    i = np.arange(1, big + 1, dtype=np.float64)
    if replacement:
        weights = (i / big) ** n - ((i - 1) / big) ** n
    else:
        if n > big:
            return math.nan
        ok = i >= n
        log_c = lambda a, b: gammaln(a + 1) - gammaln(b + 1) - gammaln(a - b + 1)  # noqa: E731
        weights = np.where(ok, np.exp(log_c(np.maximum(i - 1, n - 1), n - 1) - log_c(big, n)), 0)
    return float(weights @ v)


# --------------------------------------------------------------------------- whole sweep


@dataclass
class GroupStats:
    group: tuple[str, ...]
    label: str
    runs: list[Run]
    all_runs: Interval  # primary, failed runs included
    ok_runs: Interval  # primary, failed runs left out
    test: Interval
    jobs_failed: int
    diverged: int
    degenerate: int
    chance_checked: bool
    wall_s: float
    similar_to_best: str = ""


def analyse_groups(
    groups: dict[tuple[str, ...], list[Run]],
    labels: dict[tuple[str, ...], str],
    job_failures: dict[tuple[str, ...], tuple[int, int]],
    lower_is_better: bool,
    n_resamples: int,
) -> list[GroupStats]:
    """CIs per group; ``job_failures[group] = (failed jobs, of them diverged)``."""
    out = []
    for g, runs in groups.items():
        key = labels[g]
        ok = [r for r in runs if r.ok]
        jobs_failed, diverged_jobs = job_failures.get(g, (0, 0))
        walls = [r.wall_s for r in runs if r.wall_s is not None]
        out.append(
            GroupStats(
                group=g,
                label=key,
                runs=runs,
                all_runs=group_interval(
                    [r for r in runs if math.isfinite(r.score)], "val", key, n_resamples
                ),
                ok_runs=group_interval(ok, "val", key + "/ok", n_resamples),
                test=group_interval(ok, "test", key + "/ok", n_resamples, test=True),
                jobs_failed=jobs_failed,
                diverged=diverged_jobs + sum(r.failed == DIVERGED for r in runs),
                degenerate=sum(r.failed == DEGENERATE for r in runs),
                chance_checked=bool(runs) and all(r.chance is not None for r in runs),
                wall_s=float(np.mean(walls)) if walls else math.nan,
            )
        )
    sign = 1 if lower_is_better else -1
    out.sort(key=lambda s: (math.isnan(s.ok_runs.mean), sign * np.nan_to_num(s.ok_runs.mean)))
    return out


def reference_group(
    s: GroupStats, pattern: tuple[str, ...], stats: list[GroupStats]
) -> GroupStats | None:
    """The baseline group for ``s``: the pattern's values, and ``s``'s own on ``*`` axes."""
    want = tuple(v if b == "*" else b for b, v in zip(pattern, s.group))
    return next((g for g in stats if g.group == want), None)


def compare_pair(s: GroupStats, ref: GroupStats, family: str, n_resamples: int) -> dict[str, Any]:
    """One comparison of ``s`` with ``ref`` (successful runs only): the seed-level
    permutation test and the paired example test (on test where every run has test
    predictions, else val). Holm correction and the verdict come with :func:`decide`."""
    a = [r for r in s.runs if r.ok]
    b = [r for r in ref.runs if r.ok]
    run_pairs = _pair_runs(a, b)
    key = f"{s.label}|{ref.label}"
    split = "test" if all("test" in r.splits for p in run_pairs for r in p) else "val"
    ex = paired_example_test(run_pairs, split, key, n_resamples)
    return {
        "family": family,
        "group": s.label,
        "reference": ref.label,
        "n_group": len(a),
        "n_reference": len(b),
        "diff_seeds": (s.ok_runs.mean - ref.ok_runs.mean),
        "p_seeds": seed_permutation_test([r.score for r in a], [r.score for r in b], key),
        "split": split if ex else "",
        "seed_pairs": ex["pairs"] if ex else 0,
        "examples": ex["examples"] if ex else 0,
        "diff_examples": ex["diff"] if ex else math.nan,
        "diff_low": ex["low"] if ex else math.nan,
        "diff_high": ex["high"] if ex else math.nan,
        "p_examples": ex["p"] if ex else math.nan,
    }


def decide(family_rows: list[dict[str, Any]], lower_is_better: bool) -> list[dict[str, Any]]:
    """Holm-correct one family of :func:`compare_pair` rows in place and add the verdict
    (``better`` / ``worse`` / ``not distinguishable`` / ``not testable``) and ``decided_by``."""
    for col in ("p_examples", "p_seeds"):
        adjusted = holm([r[col] for r in family_rows])
        for r, p in zip(family_rows, adjusted):
            r[col + "_holm"] = p
    for r in family_rows:
        # the paired example test decides where predictions exist (with 3 seeds a group,
        # an exact permutation test over seeds cannot go below p = 0.1); else the seeds
        p = r["p_examples_holm"] if not math.isnan(r["p_examples_holm"]) else r["p_seeds_holm"]
        r["decided_by"] = (
            "examples"
            if not math.isnan(r["p_examples_holm"])
            else "seeds"
            if not math.isnan(p)
            else ""
        )
        if math.isnan(p):
            r["decision"] = "not testable"
        elif p < ALPHA:
            # the direction of the test that decided (the example test scores the test
            # split, diff_seeds the primary val metric: their signs can differ)
            diff = r["diff_examples"] if r["decided_by"] == "examples" else r["diff_seeds"]
            better = (diff < 0) == lower_is_better
            r["decision"] = "better" if better else "worse"
        else:
            r["decision"] = "not distinguishable"
    return family_rows


def compare(
    stats: list[GroupStats],
    baseline: tuple[str, ...] | None,
    lower_is_better: bool,
    n_resamples: int,
) -> list[dict[str, Any]]:
    """One row per (group, reference) pair: vs the best group, and vs ``baseline``.

    ``baseline`` holds a value per axis; ``"*"`` on an axis compares every group with the
    baseline group at its own value of that axis (e.g. each recipe with the default recipe
    at the same training size). Each family is Holm-corrected as a whole."""
    rows: list[dict[str, Any]] = []
    if not stats:
        return rows
    families: list[tuple[str, list[tuple[GroupStats, GroupStats]]]] = [
        ("best", [(s, stats[0]) for s in stats if s is not stats[0]])
    ]
    if baseline is not None:
        refs = [(s, reference_group(s, baseline, stats)) for s in stats]
        families.append(("baseline", [(s, r) for s, r in refs if r is not None and r is not s]))
    for family, members in families:
        family_rows = [compare_pair(s, ref, f"vs {family}", n_resamples) for s, ref in members]
        rows += decide(family_rows, lower_is_better)
    by_label = {s.label: s for s in stats}
    stats[0].similar_to_best = "best"
    for r in rows:
        if r["family"] == "vs best":
            s = by_label[r["group"]]
            s.similar_to_best = {"not distinguishable": "≈ best", "not testable": "?"}.get(
                r["decision"], ""
            )
    return rows


def budget_table(trials: dict[str, list[float]], lower_is_better: bool) -> list[dict[str, Any]]:
    """Rows ``(group, trials, expected_max, expected_max_with_replacement)``."""
    rows = []
    sign = -1.0 if lower_is_better else 1.0
    for label, values in trials.items():
        vals = [sign * v for v in values if math.isfinite(v)]
        for n in range(1, len(vals) + 1):
            rows.append(
                {
                    "group": label,
                    "trials": n,
                    "expected_best": sign * expected_max(vals, n),
                    "expected_best_with_replacement": sign * expected_max(vals, n, True),
                    "available_trials": len(vals),
                }
            )
    return rows
