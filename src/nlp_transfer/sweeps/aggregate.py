"""Collect a (multi)run folder's jobs into tables and a plot.

``aggregate(sweep_dir)`` finds every job dir below ``sweep_dir`` (a folder holding
``.hydra/``), reads its overrides, ``status.json`` and ``metrics.json``, and writes into
``sweep_dir``:

- ``results.csv``: one row per job (overrides as ``override.<key>`` columns, seed, status,
  error, every final metric except per-class ones);
- ``results_per_class.csv``: the same jobs with their per-class metrics (when any exist);
- ``summary.md``: mean ± std and n per group of the swept axes (every override key whose
  value varies across jobs, except the seed), sorted by the primary metric;
- ``summary.png``: the groups on the primary metric, mean with std error bars and one dot
  per seed.

Every file is written to a temporary file and renamed into place, so a crash never leaves a
partial file, and the outputs depend only on the job dirs: re-running gives the same bytes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pandas as pd
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from nlp_transfer.sweeps import stats as st
from nlp_transfer.sweeps.stats import REPLICATE_KEYS

log = logging.getLogger(__name__)

RESULTS_CSV = "results.csv"
PER_CLASS_CSV = "results_per_class.csv"
SUMMARY_MD = "summary.md"
SUMMARY_PNG = "summary.png"

COMPLETED = "completed"
FAILED = "failed"
PENDING = "running-or-missing"

OVERRIDE_PREFIX = "override."
SEED_KEY = "seed"
PER_CLASS_MARK = "/per_class/"
UNSET = "(unset)"
# job-level columns shown in the summary beside the val/test metrics, when present
COST_COLUMNS = ("train_wall_s", "peak_rss_mb", "peak_gpu_mem_mb")
_LOWER_IS_BETTER = re.compile(r"loss|err|perplexity|ppl|wer|cer|mae|mse|rmse", re.IGNORECASE)


class NoJobsError(ValueError):
    """The sweep dir holds no job dir (no folder with a ``.hydra/`` below it)."""


class UnknownMetricError(ValueError):
    """The requested primary metric is reported by no job."""


@dataclass
class Job:
    """One job of a sweep, as read from its folder (or expected from ``multirun.yaml``)."""

    job_dir: str
    overrides: dict[str, str]
    raw_overrides: list[str]
    status: str
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    wall_s: float | None = None
    seed: Any = None


def preload() -> None:
    """Import what ``aggregate`` imports lazily: an exit hook cannot import (some modules
    register their own exit hooks on import, which Python refuses during shutdown)."""
    import numpy  # noqa: F401
    from hydra._internal.core_plugins import basic_sweeper  # noqa: F401
    from hydra.core.override_parser import overrides_parser  # noqa: F401
    from matplotlib.backends import backend_agg  # noqa: F401
    from matplotlib.figure import Figure  # noqa: F401


# --------------------------------------------------------------------------- discovery


def natural_key(text: str) -> list[Any]:
    """Sort ``2`` before ``10``: digit runs compare as numbers."""
    return [(0, int(t), t) if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t]


def find_job_dirs(sweep_dir: str | Path) -> list[Path]:
    """Every folder at or below ``sweep_dir`` holding a ``.hydra/`` folder, naturally sorted."""
    root = Path(sweep_dir)
    found: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root):
        if ".hydra" in dirnames:
            found.append(Path(dirpath))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(found, key=lambda p: natural_key(p.relative_to(root).as_posix()))


def _multirun_dirs(sweep_dir: Path) -> list[Path]:
    """Folders at or below ``sweep_dir`` holding Hydra's ``multirun.yaml``."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(sweep_dir):
        if "multirun.yaml" in filenames:
            out.append(Path(dirpath))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(out)


# --------------------------------------------------------------------------- reading jobs


def parse_override(text: str) -> tuple[str, str]:
    """``+a.b=1`` → ``("a.b", "1")``; a deletion ``~a.b`` → ``("a.b", "~")``."""
    key, sep, value = str(text).partition("=")
    deleted = key.startswith("~")
    key = key.lstrip("+~").strip()
    if not sep:
        value = "~" if deleted else ""
    return key, value.strip()


def _read_json(path: Path) -> tuple[Any, str | None]:
    """``(object, None)``; ``(None, None)`` when missing; ``(None, why)`` when unreadable."""
    if not path.is_file():
        return None, None
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f), None
    except (OSError, ValueError) as e:
        return None, f"{path.name} unreadable: {type(e).__name__}: {e}"


def _read_raw_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        log.warning("cannot read %s: %s", path, e)
        return []
    return [str(o) for o in loaded] if isinstance(loaded, list) else []


def _load_config(job_dir: Path) -> DictConfig | None:
    path = job_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:
        log.warning("cannot read %s: %s", path, e)
        return None
    return cfg if isinstance(cfg, DictConfig) else None


def _select(cfg: DictConfig | None, key: str) -> Any:
    """A config value with its interpolations resolved, or None where that fails."""
    if cfg is None:
        return None
    try:
        return OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    except Exception:
        return None


def _job_status(status: Any, metrics: Any, metrics_error: str | None) -> tuple[str, str | None]:
    """Status and error of a job from its ``status.json`` and ``metrics.json``."""
    said = status.get("status") if isinstance(status, dict) else None
    if said == FAILED:
        return FAILED, str(status.get("error") or "failed (no error message recorded)")
    if isinstance(metrics, dict):
        return COMPLETED, None
    if said == COMPLETED:
        return (
            FAILED,
            f"status.json says completed but {metrics_error or 'metrics.json is missing'}",
        )
    if metrics is not None:
        return FAILED, "metrics.json is not a JSON object"
    return PENDING, None


def read_job(sweep_dir: Path, job_dir: Path) -> Job:
    """Read one job dir into a :class:`Job`."""
    raw = _read_raw_overrides(job_dir)
    overrides = dict(parse_override(o) for o in raw)
    status, status_error = _read_json(job_dir / "status.json")
    metrics, metrics_error = _read_json(job_dir / "metrics.json")
    state, error = _job_status(status, metrics, metrics_error)
    if status_error is not None:
        state, error = FAILED, status_error
    metrics = metrics if state == COMPLETED and isinstance(metrics, dict) else {}
    seed = metrics.get(SEED_KEY)
    if seed is None:
        seed = overrides.get(SEED_KEY)
    if seed is None:
        seed = _select(_load_config(job_dir), SEED_KEY)
    wall = status.get("wall_s") if isinstance(status, dict) else None
    rel = job_dir.relative_to(sweep_dir).as_posix()
    return Job(rel, overrides, raw, state, error, metrics, wall, seed)


def _expected_overrides(multirun_dir: Path) -> list[list[str]] | None:
    """Each job's overrides as Hydra's basic sweeper expands ``multirun.yaml`` (None: unknown)."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        cfg = OmegaConf.load(multirun_dir / "multirun.yaml")
        target = str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="") or "")
        if not target.endswith("BasicSweeper"):
            return None  # other sweepers (optuna, ...) choose their jobs as they go
        task = OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False)
        params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None)
        params_dict = OmegaConf.to_container(params, resolve=False) if params else {}
        args = [f"{k}={v}" for k, v in dict(params_dict).items()] + [str(t) for t in task]
        parsed = OverridesParser.create().parse_overrides(args)
        batches = BasicSweeper.split_arguments(parsed, None)
    except Exception as e:
        log.debug("cannot expand %s/multirun.yaml: %s", multirun_dir, e)
        return None
    return [list(job) for batch in batches for job in batch]


def _missing_jobs(sweep_dir: Path, jobs: list[Job]) -> list[Job]:
    """Jobs that a basic-sweeper ``multirun.yaml`` expects but that have no folder yet."""
    missing: list[Job] = []
    for mdir in _multirun_dirs(sweep_dir):
        expected = _expected_overrides(mdir)
        if not expected:
            continue
        prefix = mdir.relative_to(sweep_dir).as_posix()
        inside = [
            j
            for j in jobs
            if prefix == "." or j.job_dir == prefix or j.job_dir.startswith(prefix + "/")
        ]
        have = Counter(tuple(j.raw_overrides) for j in inside)
        for num, raw in enumerate(expected):
            if have[tuple(raw)] > 0:
                have[tuple(raw)] -= 1
                continue
            overrides = dict(parse_override(o) for o in raw)
            rel = str(num) if prefix == "." else f"{prefix}/{num}"
            missing.append(Job(rel, overrides, raw, PENDING, seed=overrides.get(SEED_KEY)))
    return missing


def collect_jobs(sweep_dir: str | Path) -> list[Job]:
    """Every job below ``sweep_dir``, plus the ones ``multirun.yaml`` expects but lack a dir."""
    root = Path(sweep_dir)
    jobs = [read_job(root, d) for d in find_job_dirs(root)]
    jobs += _missing_jobs(root, jobs)
    return sorted(jobs, key=lambda j: natural_key(j.job_dir))


# --------------------------------------------------------------------------- tables


def _ordered_union(keys: Iterable[Iterable[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for ks in keys:
        for k in ks:
            seen.setdefault(k, None)
    return list(seen)


def _metric_order(names: Sequence[str]) -> list[str]:
    """``val/*`` first, then ``test/*``, then the rest, each in order of appearance."""
    val = [n for n in names if n.startswith("val/")]
    test = [n for n in names if n.startswith("test/")]
    rest = [n for n in names if n not in val and n not in test]
    return val + test + rest


def _seed_column(seeds: list[Any]) -> Any:
    """Integer seeds as a nullable Int64 array; anything else as it is."""
    try:
        return pd.array([None if s is None else int(s) for s in seeds], dtype="Int64")
    except (TypeError, ValueError):
        return seeds


def build_tables(jobs: list[Job]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(results, per_class)`` DataFrames, one row per job."""
    override_keys = _ordered_union(j.overrides for j in jobs)
    metric_keys = _ordered_union(j.metrics for j in jobs)
    per_class = [k for k in metric_keys if PER_CLASS_MARK in k]
    main = _metric_order([k for k in metric_keys if PER_CLASS_MARK not in k and k != SEED_KEY])

    base: dict[str, Any] = {
        "job_dir": [j.job_dir for j in jobs],
        "status": [j.status for j in jobs],
        "error": [j.error for j in jobs],
        SEED_KEY: _seed_column([j.seed for j in jobs]),
    }
    for key in override_keys:
        base[OVERRIDE_PREFIX + key] = [j.overrides.get(key) for j in jobs]
    results = dict(base)
    for key in main:
        results[key] = [j.metrics.get(key) for j in jobs]
    results["job_wall_s"] = [j.wall_s for j in jobs]
    wide = dict(base)
    for key in per_class:
        wide[key] = [j.metrics.get(key) for j in jobs]
    return _frame(results), _frame(wide) if per_class else pd.DataFrame()


def _frame(columns: dict[str, Any]) -> pd.DataFrame:
    """A DataFrame whose all-integer columns (missing values allowed) are nullable Int64, so
    that a failed job's gap does not turn ``epochs`` into ``2.0`` in results.csv."""
    out = {}
    for name, values in columns.items():
        present = [v for v in values if v is not None]
        if (
            isinstance(values, list)
            and present
            and all(isinstance(v, int) and not isinstance(v, bool) for v in present)
        ):
            out[name] = pd.array(values, dtype="Int64")
        else:
            out[name] = values
    return pd.DataFrame(out)


def swept_axes(results: pd.DataFrame) -> list[str]:
    """Override keys whose value varies across jobs, the seed and the fold excepted."""
    axes = []
    for col in results.columns:
        if not col.startswith(OVERRIDE_PREFIX):
            continue
        key = col[len(OVERRIDE_PREFIX) :]
        if key in REPLICATE_KEYS:  # seeds and k-fold folds are replicates, not groups
            continue
        if results[col].fillna(UNSET).astype(str).nunique() > 1:
            axes.append(key)
    return axes


def _numeric_metrics(results: pd.DataFrame) -> list[str]:
    cols = [c for c in results.columns if c.startswith(("val/", "test/"))]
    cols += [c for c in COST_COLUMNS if c in results.columns]
    return [c for c in cols if pd.api.types.is_numeric_dtype(results[c].dropna().infer_objects())]


def choose_primary_metric(results: pd.DataFrame, configured: Sequence[str | None]) -> str:
    """First of ``configured`` present in the results, else ``val/acc``, else the first
    ``val/`` metric; with no metric at all, the first configured name (or ``val/acc``)."""
    present = [c for c in results.columns if c.startswith(("val/", "test/"))]
    for name in [*configured, "val/acc"]:
        if name and name in present:
            return name
    first_val = next((c for c in present if c.startswith("val/")), None)
    if first_val:
        return first_val
    return next((c for c in configured if c), "val/acc")


def _lower_is_better(metric: str, configured_mode: Any, configured_metric: Any) -> bool:
    if configured_metric == metric and configured_mode in ("min", "max"):
        return configured_mode == "min"
    return bool(_LOWER_IS_BETTER.search(metric.rsplit("/", 1)[-1]))


def summarize(
    results: pd.DataFrame, primary_metric: str, axes: Sequence[str], lower_is_better: bool = False
) -> pd.DataFrame:
    """One row per group of ``axes`` values: job counts, then ``<metric> mean``/``<metric> std``
    (ddof=1) and ``n`` (completed jobs with the primary metric), best group first."""
    metrics = _numeric_metrics(results)
    if primary_metric in metrics:
        metrics.remove(primary_metric)
    metrics.insert(0, primary_metric)
    frame = results.copy()
    cols = [OVERRIDE_PREFIX + a for a in axes]
    for c in cols:
        frame[c] = frame[c].fillna(UNSET).astype(str)
    groups = frame.groupby(cols, sort=False, dropna=False) if cols else [((), frame)]
    rows = []
    for key, g in groups:
        values = key if isinstance(key, tuple) else (key,)
        done = g[g["status"] == COMPLETED]
        row: dict[str, Any] = dict(zip(axes, values))
        row["n"] = int(done[primary_metric].notna().sum()) if primary_metric in done else 0
        row["failed"] = int((g["status"] == FAILED).sum())
        row["running_or_missing"] = int((g["status"] == PENDING).sum())
        for m in metrics:
            vals = pd.to_numeric(done[m], errors="coerce").dropna() if m in done else pd.Series()
            row[f"{m} mean"] = float(vals.mean()) if len(vals) else math.nan
            row[f"{m} std"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
        rows.append(row)
    summary = pd.DataFrame(rows)
    if summary.empty:
        return summary
    labels = [_group_label(r, axes) for _, r in summary.iterrows()]
    summary = summary.iloc[sorted(range(len(labels)), key=lambda i: natural_key(labels[i]))]
    summary = summary.sort_values(
        f"{primary_metric} mean",
        ascending=lower_is_better,
        na_position="last",
        kind="mergesort",
    )
    return summary.reset_index(drop=True)


# --------------------------------------------------------------------------- rendering


def _group_label(row: pd.Series | dict[str, Any], axes: Sequence[str]) -> str:
    return ", ".join(f"{a}={row[a]}" for a in axes) if axes else "all jobs"


def _fmt(x: float) -> str:
    """4 decimals for scores and losses, fewer for seconds and megabytes."""
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}" if abs(x) < 1000 else f"{x:.1f}"


def _mean_std(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    return _fmt(mean) if math.isnan(std) else f"{_fmt(mean)} ± {_fmt(std)}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _group_table(summary: pd.DataFrame, axes: Sequence[str], metrics: Sequence[str]) -> list[str]:
    """Markdown rows: one per group, mean ± std of each of ``metrics``."""
    show_pending = bool(len(summary)) and bool(summary["running_or_missing"].sum())
    header = [*axes, "n", "failed", *(["running/missing"] if show_pending else []), *metrics]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for _, row in summary.iterrows():
        cells = [*(row[a] for a in axes), int(row["n"]), int(row["failed"])]
        if show_pending:
            cells.append(int(row["running_or_missing"]))
        cells += [_mean_std(row[f"{m} mean"], row[f"{m} std"]) for m in metrics]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def render_markdown(
    summary: pd.DataFrame,
    results: pd.DataFrame,
    primary_metric: str,
    axes: Sequence[str],
    lower_is_better: bool,
    title: str,
) -> str:
    """The ``summary.md`` text: the group table, then the failed jobs and their errors."""
    counts = results["status"].value_counts()
    metrics = [c[: -len(" mean")] for c in summary.columns if c.endswith(" mean")]
    better = "lower" if lower_is_better else "higher"
    lines = [
        f"# Sweep summary: {title}",
        "",
        f"Primary metric: `{primary_metric}` ({better} is better). "
        f"Jobs: {int(counts.get(COMPLETED, 0))} completed, {int(counts.get(FAILED, 0))} failed, "
        f"{int(counts.get(PENDING, 0))} running or missing.",
        "",
        "Grouped by: "
        + (", ".join(f"`{a}`" for a in axes) if axes else "nothing (no swept axis)")
        + f"; over seeds. Cells are mean ± std (ddof=1) over the completed jobs; n counts "
        f"those with `{primary_metric}`.",
        "",
    ]
    # headline table: overall metrics only (per-class/per-type ones, e.g. val/f1/LOC,
    # follow in a second table when there are any)
    headline = [m for m in metrics if m.count("/") <= 1 or m == primary_metric]
    lines += _group_table(summary, axes, headline)
    if len(headline) < len(metrics):
        lines += ["", "## All metrics", ""]
        lines += _group_table(summary, axes, metrics)
    failed = results[results["status"] == FAILED]
    if len(failed):
        lines += ["", f"## Failed jobs ({len(failed)})", ""]
        for _, row in failed.iterrows():
            where = ", ".join(f"{a}={row[OVERRIDE_PREFIX + a]}" for a in axes)
            seed = "" if pd.isna(row[SEED_KEY]) else f"seed={row[SEED_KEY]}"
            context = ", ".join(p for p in (where, seed) if p)
            msg = " ".join(line.strip() for line in str(row["error"] or "").splitlines())
            msg = msg if len(msg) <= 300 else msg[:299] + "…"
            lines.append(
                f"- `{row['job_dir']}`" + (f" ({context})" if context else "") + f": {msg}"
            )
    return "\n".join(lines) + "\n"


def _plot(
    summary: pd.DataFrame,
    results: pd.DataFrame,
    primary_metric: str,
    axes: Sequence[str],
    title: str,
    f: IO[bytes],
) -> None:
    """Draw the groups on the primary metric (best at the top) into ``f`` as PNG."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_groups = max(len(summary), 1)
    fig = Figure(figsize=(8.0, max(2.5, 0.55 * n_groups + 1.6)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    done = results[results["status"] == COMPLETED]
    labels = []
    for i, (_, row) in enumerate(summary.iterrows()):
        y = n_groups - 1 - i
        mask = pd.Series(True, index=done.index)
        for a in axes:
            mask &= done[OVERRIDE_PREFIX + a].fillna(UNSET).astype(str) == str(row[a])
        vals = (
            pd.to_numeric(done.loc[mask, primary_metric], errors="coerce").dropna().to_numpy()
            if primary_metric in done
            else np.array([])
        )
        if len(vals):
            offsets = np.linspace(-0.18, 0.18, len(vals)) if len(vals) > 1 else np.zeros(1)
            ax.scatter(vals, y + offsets, s=18, color="tab:gray", alpha=0.8, zorder=2)
            mean, std = row[f"{primary_metric} mean"], row[f"{primary_metric} std"]
            ax.errorbar(
                [mean],
                [y],
                xerr=[0.0 if math.isnan(std) else std],
                fmt="D",
                color="tab:blue",
                capsize=4,
                zorder=3,
            )
        extra = f", {int(row['failed'])} failed" if row["failed"] else ""
        labels.append(f"{_group_label(row, axes)}  (n={int(row['n'])}{extra})")
    if len(summary):
        ax.set_yticks(list(range(n_groups - 1, -1, -1)), labels, fontsize=8)
    if done.empty or primary_metric not in done or done[primary_metric].isna().all():
        ax.text(0.5, 0.5, "no completed job yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(-0.7, n_groups - 0.3)
    ax.set_xlabel(primary_metric)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"{title}: mean ± std over seeds (dots: seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(f, format="png", metadata={"Software": None})


# --------------------------------------------------------------------------- writing


def atomic_write(path: Path, write: Callable[[IO[Any]], None], binary: bool = False) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it onto ``path``.

    If ``write`` raises, the temporary file is removed and ``path`` keeps its old content.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if binary:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        else:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_csv(df: pd.DataFrame) -> Callable[[IO[str]], None]:
    return lambda f: df.to_csv(f, index=False, lineterminator="\n")


def _configured_metric(jobs: list[Job], sweep_dir: Path) -> tuple[list[Any], Any, Any]:
    """``([optimized_metric, monitor], monitor_mode, monitor)`` from the first job's config."""
    for job in jobs:
        cfg = _load_config(sweep_dir / job.job_dir)
        if cfg is not None:
            names = [_select(cfg, "optimized_metric"), _select(cfg, "monitor")]
            names = [n if isinstance(n, str) else None for n in names]
            return names, _select(cfg, "monitor_mode"), names[0] or names[1]
    return [], None, None


def configured_aggregate(jobs: list[Job], sweep_dir: Path, key: str) -> Any:
    """``aggregate.<key>`` from the first job's config (set on the sweep's command line)."""
    for job in jobs:
        value = _select(_load_config(sweep_dir / job.job_dir), f"aggregate.{key}")
        if value is not None:
            return (
                OmegaConf.to_container(value)
                if isinstance(value, DictConfig | ListConfig)
                else value
            )
    return None


def aggregate(
    sweep_dir: str | Path,
    primary_metric: str | None = None,
    plot: bool = True,
    baseline: str | None = None,
    budget_by: Sequence[str] | None = None,
    n_resamples: int | None = None,
) -> pd.DataFrame:
    """Aggregate the jobs below ``sweep_dir``; write results.csv, summary.md (headline table
    with CIs, "≈ best" marks, reproducibility), summary_full.md (every metric),
    comparisons.csv, budget.csv and the plots (summary.png, budget.png).

    ``baseline`` (e.g. ``"strategy=full"``), ``budget_by`` (axes of the budget-curve groups)
    and ``n_resamples`` default to the jobs' ``aggregate.*`` config. Returns the per-job
    results. ``df.attrs`` holds ``primary_metric``, ``axes``, ``lower_is_better``, ``summary``
    (the group table as records), ``summary_markdown``, ``comparisons`` and ``statistics``
    (:class:`SweepStats`). Raises ``FileNotFoundError`` when ``sweep_dir`` is not a folder,
    :class:`NoJobsError` when no job dir is below it, :class:`UnknownMetricError` for a
    ``primary_metric`` that no job reports, and ``ValueError`` for a baseline or budget axis
    that is not swept.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep dir {root} does not exist or is not a folder")
    jobs = collect_jobs(root)
    if not jobs:
        raise NoJobsError(
            f"no job dirs below {root}: expected folders holding a .hydra/ folder "
            "(a Hydra run dir, or <sweep dir>/<job num>/ of a multirun)"
        )
    results, per_class = build_tables(jobs)
    configured, mode, configured_name = _configured_metric(jobs, root)
    reported = [c for c in results.columns if c.startswith(("val/", "test/"))]
    known = {*reported, *(k for j in jobs for k in j.metrics if PER_CLASS_MARK not in k)}
    if primary_metric is not None and known and primary_metric not in known:
        raise UnknownMetricError(
            f"metric {primary_metric!r} is not reported by any job in {root}; "
            f"available: {', '.join(reported)}"
        )
    primary = primary_metric or choose_primary_metric(results, configured)
    lower = _lower_is_better(primary, mode, configured_name)
    axes = swept_axes(results)
    summary = summarize(results, primary, axes, lower)
    if baseline is None:
        baseline = configured_aggregate(jobs, root, "baseline")
    if budget_by is None:
        budget_by = configured_aggregate(jobs, root, "budget_by")
        budget_by = [budget_by] if isinstance(budget_by, str) else budget_by
    if n_resamples is None:
        n_resamples = int(configured_aggregate(jobs, root, "n_resamples") or N_RESAMPLES)
    stats = sweep_statistics(root, results, primary, axes, lower, baseline, budget_by, n_resamples)
    title = root.resolve().name
    markdown = render_summary(root, jobs, results, primary, axes, lower, title, stats)
    full = render_markdown(summary, results, primary, axes, lower, title)

    atomic_write(root / RESULTS_CSV, _write_csv(results))
    if not per_class.empty:
        atomic_write(root / PER_CLASS_CSV, _write_csv(per_class))
    else:
        (root / PER_CLASS_CSV).unlink(missing_ok=True)
    atomic_write(root / SUMMARY_MD, lambda f: f.write(markdown))
    atomic_write(root / SUMMARY_FULL_MD, lambda f: f.write(full))
    atomic_write(root / COMPARISONS_CSV, _write_csv(stats.comparisons.round(6)))
    atomic_write(root / BUDGET_CSV, _write_csv(stats.budget.round(6)))
    size_axis = learning_axis(axes)
    if plot:
        if size_axis is not None:
            draw = lambda f: _plot_learning_curve(stats, axes, size_axis, primary, title, f)  # noqa: E731
        else:
            draw = lambda f: _plot(summary, results, primary, axes, title, f)  # noqa: E731
        atomic_write(root / SUMMARY_PNG, draw, binary=True)
        if len(stats.budget):
            atomic_write(
                root / BUDGET_PNG, lambda f: _plot_budget(stats.budget, primary, f), binary=True
            )
    results.attrs.update(
        primary_metric=primary,
        axes=list(axes),
        lower_is_better=lower,
        summary=summary.to_dict("records"),
        summary_markdown=markdown,
        comparisons=stats.comparisons,
        statistics=stats,
    )
    return results


# --------------------------------------------------------------------------- statistics

SUMMARY_FULL_MD = "summary_full.md"
COMPARISONS_CSV = "comparisons.csv"
BUDGET_CSV = "budget.csv"
BUDGET_PNG = "budget.png"
N_RESAMPLES = 2000


@dataclass
class SweepStats:
    """What :func:`sweep_statistics` found: per-group stats, comparisons, budget rows."""

    groups: list[st.GroupStats]
    comparisons: pd.DataFrame
    budget: pd.DataFrame
    test_metric: str | None
    budget_by: list[str]
    baseline: str | None
    predictions: int  # completed jobs with predictions for the primary metric
    notes: list[str]
    pending: dict[tuple[str, ...], int] = field(default_factory=dict)


def _values_key(row: pd.Series, axes: Sequence[str]) -> tuple[str, ...]:
    return tuple(
        UNSET if pd.isna(row[OVERRIDE_PREFIX + a]) else str(row[OVERRIDE_PREFIX + a]) for a in axes
    )


def parse_baseline(text: str | None, axes: Sequence[str]) -> tuple[str, ...] | None:
    """``"strategy=full"`` (``,``-separated for several axes) → the group's values; axes
    the text leaves out must have a single value among the groups (checked by the caller)."""
    if not text:
        return None
    wanted = dict(parse_override(p) for p in str(text).split(",") if p.strip())
    unknown = sorted(set(wanted) - set(axes))
    if unknown:
        raise ValueError(
            f"aggregate.baseline={text!r}: {unknown} is not a swept axis; swept axes: "
            f"{list(axes) or 'none'}"
        )
    return tuple(wanted.get(a, "*") for a in axes)


def sweep_statistics(
    root: Path,
    results: pd.DataFrame,
    primary: str,
    axes: Sequence[str],
    lower: bool,
    baseline: str | None = None,
    budget_by: Sequence[str] | None = None,
    n_resamples: int = N_RESAMPLES,
) -> SweepStats:
    """Group CIs, failed runs, comparisons and budget curves of a sweep's results."""
    test_metric = "test/" + primary.split("/", 1)[1] if primary.startswith("val/") else None
    if test_metric not in results.columns:
        test_metric = None
    groups: dict[tuple[str, ...], list[st.Run]] = {}
    failures: dict[tuple[str, ...], list[int]] = {}
    labels: dict[tuple[str, ...], str] = {}
    reasons: list[str] = []
    pending: dict[tuple[str, ...], int] = {}
    with_preds = 0
    for _, row in results.iterrows():
        g = _values_key(row, axes)
        labels[g] = _group_label(dict(zip(axes, g)), axes)
        groups.setdefault(g, [])
        counts = failures.setdefault(g, [0, 0])
        if row["status"] == FAILED:
            counts[0] += 1
            diverged = st.diverged_error(row["error"])
            counts[1] += int(diverged)
            reasons.append(st.DIVERGED if diverged else "error")
            continue
        if row["status"] != COMPLETED:
            pending[g] = pending.get(g, 0) + 1
            reasons.append("")
            continue
        metrics = {c: row[c] for c in (primary, test_metric) if c and c in row}
        replicate = tuple(
            str(row.get(OVERRIDE_PREFIX + k, "")) if k != SEED_KEY else str(row[SEED_KEY])
            for k in REPLICATE_KEYS
        )
        wall = row.get("job_wall_s")
        run = st.load_run(
            root / row["job_dir"],
            row["job_dir"],
            g,
            replicate,
            metrics,
            primary,
            test_metric,
            None if pd.isna(wall) else float(wall),
            lower,
        )
        with_preds += bool(run.splits)
        groups[g].append(run)
        reasons.append(
            f"{run.failed} ({primary} {_fmt(run.score)} <= chance {_fmt(run.chance)})"
            if run.failed == st.DEGENERATE
            else (run.failed or "")
        )
    results["failed_reason"] = reasons
    chance = {r.job_dir: r.chance for rs in groups.values() for r in rs if r.chance is not None}
    results["chance_score"] = [chance.get(d, math.nan) for d in results["job_dir"]]
    job_failures = {g: (c[0], c[1]) for g, c in failures.items()}
    stats = st.analyse_groups(groups, labels, job_failures, lower, n_resamples)
    base = parse_baseline(baseline, axes)
    notes = []
    if base is not None:
        matches = [s.group for s in stats if all(b in ("*", v) for b, v in zip(base, s.group))]
        if not matches:
            notes.append(f"baseline {baseline!r} matches no group. No baseline comparison.")
            base = None
        elif len(matches) > 1:
            # axes the baseline leaves out: each group is compared with the baseline group at
            # its own values of them (e.g. a recipe with the default recipe at the same size)
            free = [a for a, b in zip(axes, base) if b == "*"]
            notes.append(
                f"baseline {baseline!r}: each group is compared with the baseline at its own "
                f"{', '.join(free)}."
            )
        else:
            base = matches[0]
    comparisons = pd.DataFrame(st.compare(stats, base, lower, n_resamples))
    # budget: groups of the budget axes; trials are the jobs differing in the other axes/seeds
    by = list(budget_by) if budget_by else default_budget_axes(results, axes)
    missing = [a for a in by if a not in axes]
    if missing:
        raise ValueError(f"aggregate.budget_by: {missing} are not swept axes; swept: {axes}")
    trials: dict[str, list[float]] = {}
    for s in stats:
        values = dict(zip(axes, s.group))
        label = _group_label(values, by)
        trials.setdefault(label, []).extend(r.score for r in s.runs)
    budget = pd.DataFrame(st.budget_table(dict(sorted(trials.items())), lower))
    return SweepStats(
        stats, comparisons, budget, test_metric, by, baseline, with_preds, notes, pending
    )


def default_budget_axes(results: pd.DataFrame, axes: Sequence[str]) -> list[str]:
    """Axes whose values are not all numbers (strategy, head, ...): the budget curves compare
    them, and the numeric axes (learning rate, ...) with the seeds are the trials. With only
    numeric or only non-numeric axes: the first axis (all axes when there is one)."""
    choices = [
        a
        for a in axes
        if not all(_is_number(v) for v in results[OVERRIDE_PREFIX + a].dropna().astype(str))
    ]
    if choices and len(choices) < len(axes):
        return choices
    return list(axes[:1])


def _ci_header(intervals: Sequence[st.Interval]) -> str:
    kinds = {i.kind for i in intervals if not math.isnan(i.mean)}
    if kinds == {st.CI_TWO_LEVEL}:
        return f"95% CI: {st.CI_TWO_LEVEL} bootstrap"
    if kinds == {st.CI_SEEDS}:
        return f"95% CI: {st.CI_SEEDS} bootstrap"
    return f"95% CI: {st.CI_TWO_LEVEL} bootstrap, † {st.CI_SEEDS} only"


def _ci_cell(i: st.Interval, mixed: bool) -> str:
    return i.text() + (" †" if mixed and i.kind == st.CI_SEEDS and not math.isnan(i.mean) else "")


def headline_table(stats: SweepStats, primary: str, axes: Sequence[str]) -> list[str]:
    """The headline rows: group, n, failed, primary and test metric with CIs, ≈ best, time."""
    groups = stats.groups
    prim_h = _ci_header([s.ok_runs for s in groups])
    any_failed_run = any(s.degenerate or s.diverged for s in groups)
    show_pending = bool(stats.pending)
    header = [*axes, "n", "failed", *(["running/missing"] if show_pending else [])]
    header.append(f"{primary} ({prim_h}; non-failed runs)")
    if any_failed_run:
        header.append(f"{primary} (all runs)")
    if stats.test_metric:
        header.append(f"{stats.test_metric} ({_ci_header([s.test for s in groups])})")
    header += ["vs best", "wall s"]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    mixed = "†" in prim_h
    for s in groups:
        failed = s.jobs_failed + s.degenerate + sum(r.failed == st.DIVERGED for r in s.runs)
        cells: list[Any] = [*s.group, len(s.runs), failed]
        if show_pending:
            cells.append(stats.pending.get(s.group, 0))
        cells.append(_ci_cell(s.ok_runs, mixed))
        if any_failed_run:
            cells.append(_ci_cell(s.all_runs, mixed))
        if stats.test_metric:
            cells.append(_ci_cell(s.test, "†" in header[-3]))
        cells += [s.similar_to_best, "–" if math.isnan(s.wall_s) else f"{s.wall_s:.0f}"]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def run_command(root: Path, jobs: list[Job]) -> str:
    """The multirun's command line from ``multirun.yaml``, else "not recorded"."""
    for mdir in _multirun_dirs(root):
        try:
            cfg = OmegaConf.load(mdir / "multirun.yaml")
            task = [str(t) for t in OmegaConf.select(cfg, "hydra.overrides.task", default=[])]
            name = str(OmegaConf.select(cfg, "hydra.job.name", default="train") or "train")
        except Exception:
            continue
        return f"python -m nlp_transfer.{name} -m " + " ".join(task)
    return "not recorded (no multirun.yaml)"


def reproducibility(
    root: Path, jobs: list[Job], results: pd.DataFrame, axes: Sequence[str], stats: SweepStats
) -> list[str]:
    """The auto-filled reproducibility section."""
    commits = sorted({str(j.metrics["git_commit"]) for j in jobs if j.metrics.get("git_commit")})
    values = {
        a: sorted(results[OVERRIDE_PREFIX + a].fillna(UNSET).astype(str).unique(), key=natural_key)
        for a in axes
    }
    seeds = sorted({str(s) for s in results[SEED_KEY].dropna()}, key=natural_key)
    folds = (
        sorted(results["override.data.fold"].dropna().astype(str).unique(), key=natural_key)
        if "override.data.fold" in results
        else []
    )
    trials = stats.budget.groupby("group")["available_trials"].max() if len(stats.budget) else {}
    wall = pd.to_numeric(results["job_wall_s"], errors="coerce").sum()
    sizes = []
    for s in stats.groups:
        for r in s.runs:
            for split, (index, _, _) in sorted(r.splits.items()):
                sizes.append(f"{split} {len(index)}")
            if r.splits:
                break
        if sizes:
            break
    size_keys = sorted(
        {k for j in jobs for k in j.metrics if re.search(r"(^|_)(examples|size)s?$|num_", k)}
    )
    for k in size_keys:
        vals = sorted({str(j.metrics[k]) for j in jobs if k in j.metrics})
        sizes.append(f"{k} {', '.join(vals)}")
    lines = [
        "## Reproducibility",
        "",
        f"- command: `{run_command(root, jobs)}`",
        "- git commit: " + (", ".join(f"`{c}`" for c in commits) if commits else "not recorded"),
        "- swept axes: "
        + ("; ".join(f"`{a}` ∈ {{{', '.join(v)}}}" for a, v in values.items()) or "none"),
        "- seeds: "
        + (", ".join(seeds) or "not recorded")
        + (f"; folds: {', '.join(folds)}" if folds else ""),
        f"- search budget: {len(results)} jobs; trials per budget group ("
        + (", ".join(f"`{a}`" for a in stats.budget_by) or "all jobs")
        + "): "
        + (", ".join(f"{g}: {int(n)}" for g, n in dict(trials).items()) or "–"),
        f"- total compute: {wall:.0f} s of job wall time",
        "- data sizes (examples/sentences scored): "
        + ("; ".join(sizes) if sizes else "not recorded"),
    ]
    return lines


def render_summary(
    root: Path,
    jobs: list[Job],
    results: pd.DataFrame,
    primary: str,
    axes: Sequence[str],
    lower: bool,
    title: str,
    stats: SweepStats,
) -> str:
    """The compact ``summary.md``: headline table, comparisons note, reproducibility."""
    counts = results["status"].value_counts()
    better = "lower" if lower else "higher"
    degenerate = sum(s.degenerate for s in stats.groups)
    unchecked = [s.label for s in stats.groups if s.runs and not s.chance_checked]
    lines = [
        f"# Sweep summary: {title}",
        "",
        f"Primary metric: `{primary}` ({better} is better). "
        f"Jobs: {int(counts.get(COMPLETED, 0))} completed, {int(counts.get(FAILED, 0))} failed, "
        f"{int(counts.get(PENDING, 0))} running or missing.",
        "",
        "Grouped by: "
        + (", ".join(f"`{a}`" for a in axes) if axes else "nothing (no swept axis)")
        + "; over seeds"
        + (" and folds" if "override.data.fold" in results else "")
        + ". Cells: mean [95% CI]. `n`: completed runs; `failed`: crashed, diverged (NaN stop) "
        "or degenerate runs (validation score at or below the majority-class / all-O score "
        "of its validation set). `vs best`: `≈ best` where the paired tests (Holm-corrected) "
        "cannot tell the group from the best (comparisons.csv), `?` where no test is possible "
        "(no predictions and < 3 seeds).",
        "",
    ]
    lines += headline_table(stats, primary, axes)
    lines.append("")
    if stats.predictions == 0:
        lines.append(
            "No job wrote per-example predictions for this metric: intervals are over seeds "
            "only and comparisons use the seed-level permutation test (>= 3 seeds)."
        )
    if unchecked:
        lines.append(
            f"Degenerate runs could not be checked (no validation predictions) in: "
            f"{'; '.join(unchecked)}."
        )
    if degenerate:
        lines.append(
            f"{degenerate} completed run(s) are degenerate (see results.csv failed_reason)."
        )
    lines += stats.notes
    lines += [
        "",
        "Per-metric tables and the failed jobs: summary_full.md; per job: results.csv.",
        "",
    ]
    lines += reproducibility(root, jobs, results, axes, stats)
    return "\n".join(lines) + "\n"


def _plot_budget(budget: pd.DataFrame, primary: str, f: IO[bytes]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for group, rows in budget.groupby("group", sort=True):
        ax.plot(rows["trials"], rows["expected_best"], marker="o", ms=3, label=str(group))
    ax.set_xlabel("trials (hyperparameter settings × seeds)")
    ax.set_ylabel(f"expected best {primary}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Expected best validation score vs budget (Dodge et al.)", fontsize=9)
    fig.tight_layout()
    fig.savefig(f, format="png", metadata={"Software": None})


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def learning_axis(axes: Sequence[str]) -> str | None:
    return next((a for a in axes if a in st.LEARNING_AXES), None)


def _plot_learning_curve(
    stats: SweepStats, axes: Sequence[str], size_axis: str, primary: str, title: str, f: IO[bytes]
) -> None:
    """Primary metric (mean and CI) against training-set size, one line per group."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = list(axes).index(size_axis)
    others = [a for a in axes if a != size_axis]
    lines: dict[str, list[tuple[float, st.Interval, str]]] = {}
    numeric = [float(s.group[k]) for s in stats.groups if _is_number(s.group[k])]
    top = max(numeric) * 2 if numeric else 1.0
    for s in stats.groups:
        try:
            x = float(s.group[k])
        except ValueError:  # null / "all": the full training set, drawn right of the rest
            x = top
        label = _group_label(dict(zip(others, s.group[:k] + s.group[k + 1 :])), others)
        lines.setdefault(label, []).append((x, s.ok_runs, s.group[k]))
    fig = Figure(figsize=(7.0, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ticks: dict[float, str] = {}
    for label, points in sorted(lines.items()):
        points.sort(key=lambda p: p[0])
        xs = [p[0] for p in points]
        ax.plot(xs, [p[1].mean for p in points], marker="o", label=label)
        ax.fill_between(xs, [p[1].low for p in points], [p[1].high for p in points], alpha=0.2)
        ticks.update({p[0]: p[2] if p[0] != top or p[2] != UNSET else "all" for p in points})
    ax.set_xscale("log")
    # explicit limits: with every run of the sweep failed, no point is finite to autoscale on
    ax.set_xlim(min(ticks) / 1.5, max(ticks) * 1.5)
    ax.set_xticks(list(ticks), list(ticks.values()), fontsize=7)
    ax.set_xlabel(size_axis)
    ax.set_ylabel(primary)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{title}: learning curve, mean and 95% CI", fontsize=9)
    fig.tight_layout()
    fig.savefig(f, format="png", metadata={"Software": None})
