"""Fine-tuning stability report of a sweep (``experiment=stability``).

    python -m nlp_transfer.sweeps.stability <sweep dir> [--baseline stability_recipe=default]

On top of the sweep's summary (which it refreshes with :func:`~nlp_transfer.sweeps.aggregate.
aggregate`), per group of swept overrides:

- the failed-run rate with its exact (Clopper-Pearson) 95% interval; a run fails when it
  crashed, stopped on a NaN loss, or scored at or below the majority class of its validation
  set (the aggregate's rule);
- the mean, std, min and max of the primary metric among the successful runs;
- the median total gradient norm over the first and the last tenth of training, from the
  per-step ``grad_norm/<group>`` columns the jobs logged (``model.log_grad_norm=true``).

Each group is compared with the baseline group at the same values of the other axes: the
failed-run rates by Fisher's exact test, the spread of the successful runs by the
Brown-Forsythe (median-centred Levene) test, both Holm-corrected over the family. Writes
``stability.md``, ``stability.csv`` and ``grad_norms.png`` (total gradient norm per step:
one thin line per run, dashed for failed runs; one panel per value of the other axes).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from nlp_transfer.sweeps import stats as st
from nlp_transfer.sweeps.aggregate import (
    aggregate,
    atomic_write,
    collect_jobs,
    configured_aggregate,
    natural_key,
    parse_baseline,
    run_command,
)

STABILITY_MD = "stability.md"
STABILITY_CSV = "stability.csv"
GRAD_NORMS_PNG = "grad_norms.png"
GRAD_PREFIX = "grad_norm/"
ALPHA = st.ALPHA


def grad_norm_trace(job_dir: str | Path) -> pd.DataFrame:
    """``(step, norm)`` of a job: the total gradient norm over every logged parameter group
    (the groups' norms combined in quadrature), from its CSV logger's ``metrics.csv``."""
    files = sorted(Path(job_dir).glob("csv/**/metrics.csv"))
    frames = []
    for f in files:
        df = pd.read_csv(f)
        cols = [c for c in df.columns if c.startswith(GRAD_PREFIX)]
        if not cols or "step" not in df.columns:
            continue
        rows = df[["step", *cols]].dropna(subset=cols, how="all")
        norm = np.sqrt((rows[cols].fillna(0.0) ** 2).sum(axis=1))
        frames.append(pd.DataFrame({"step": rows["step"].astype(int), "norm": norm}))
    if not frames:
        return pd.DataFrame({"step": pd.Series(dtype=int), "norm": pd.Series(dtype=float)})
    return pd.concat(frames).drop_duplicates("step", keep="last").sort_values("step")


def _tenth_median(trace: pd.DataFrame, last: bool) -> float:
    if trace.empty:
        return math.nan
    k = max(1, len(trace) // 10)
    part = trace["norm"].iloc[-k:] if last else trace["norm"].iloc[:k]
    return float(part.median())


def _failure_ci(failed: int, n: int) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    ci = sps.binomtest(failed, n).proportion_ci(confidence_level=0.95, method="exact")
    return float(ci.low), float(ci.high)


def _group_row(
    g: st.GroupStats, axes: Sequence[str], traces: dict[str, pd.DataFrame]
) -> dict[str, Any]:
    ok = [r.score for r in g.runs if r.ok]
    ok_test = [r.test_score for r in g.runs if r.ok and math.isfinite(r.test_score)]
    n = len(g.runs) + g.jobs_failed
    failed = n - len(ok)
    low, high = _failure_ci(failed, n)
    first = [_tenth_median(traces[r.job_dir], last=False) for r in g.runs]
    final = [_tenth_median(traces[r.job_dir], last=True) for r in g.runs]
    return {
        **dict(zip(axes, g.group)),
        "group": g.label,
        "runs": n,
        "failed": failed,
        "failed_rate": failed / n if n else math.nan,
        "failed_rate_low": low,
        "failed_rate_high": high,
        "ok_mean": float(np.mean(ok)) if ok else math.nan,
        "ok_std": float(np.std(ok, ddof=1)) if len(ok) > 1 else math.nan,
        "ok_min": float(np.min(ok)) if ok else math.nan,
        "ok_max": float(np.max(ok)) if ok else math.nan,
        "ok_test_mean": float(np.mean(ok_test)) if ok_test else math.nan,
        "ok_test_std": float(np.std(ok_test, ddof=1)) if len(ok_test) > 1 else math.nan,
        "grad_norm_first_tenth": float(np.nanmedian(first))
        if any(map(math.isfinite, first))
        else math.nan,
        "grad_norm_last_tenth": float(np.nanmedian(final))
        if any(map(math.isfinite, final))
        else math.nan,
    }


def _compare(groups: list[st.GroupStats], baseline: tuple[str, ...] | None) -> list[dict[str, Any]]:
    """Each group vs its baseline group: Fisher (failed-run rate), Brown-Forsythe (spread)."""
    if baseline is None:
        return []
    rows = []
    for g in groups:
        ref = st.reference_group(g, baseline, groups)
        if ref is None or ref is g:
            continue
        counts = []
        for x in (g, ref):
            n = len(x.runs) + x.jobs_failed
            ok = sum(r.ok for r in x.runs)
            counts.append((n - ok, ok))
        p_fail = float(sps.fisher_exact(counts).pvalue)
        a = [r.score for r in g.runs if r.ok]
        b = [r.score for r in ref.runs if r.ok]
        p_spread = (
            float(sps.levene(a, b, center="median").pvalue)
            if len(a) > 1 and len(b) > 1 and np.ptp(a + b) > 0
            else math.nan
        )
        rows.append(
            {
                "group": g.label,
                "reference": ref.label,
                "failed": counts[0][0],
                "failed_reference": counts[1][0],
                "p_failed_rate": p_fail,
                "std": float(np.std(a, ddof=1)) if len(a) > 1 else math.nan,
                "std_reference": float(np.std(b, ddof=1)) if len(b) > 1 else math.nan,
                "p_spread": p_spread,
            }
        )
    for col in ("p_failed_rate", "p_spread"):
        for r, p in zip(rows, st.holm([r[col] for r in rows])):
            r[col + "_holm"] = p
    return rows


def _verdict(p: float, here: float, there: float, what: str) -> str:
    if math.isnan(p):
        return "not testable"
    if p >= ALPHA:
        return "not significant"
    return f"{'higher' if here > there else 'lower'} {what}"


def _fmt(x: float, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def render(
    rows: list[dict[str, Any]],
    tests: list[dict[str, Any]],
    axes: Sequence[str],
    primary: str,
    title: str,
    command: str,
) -> str:
    lines = [
        f"# Fine-tuning stability: {title}",
        "",
        f"Primary metric `{primary}`. A run fails when it crashed, stopped on a NaN loss, or "
        "scored at or below the majority class of its validation set. Failed-run rate: exact "
        "(Clopper-Pearson) 95% interval. Mean/std/min/max: successful runs only. Gradient "
        "norm: median over runs of the median total gradient norm (all parameter groups, "
        "before clipping) in the first and in the last tenth of the logged steps.",
        "",
        f"Command: `{command}`",
        "",
        "| "
        + " | ".join(
            [
                *axes,
                "runs",
                "failed",
                "failed rate [95% CI]",
                f"{primary} mean ± std (successful)",
                "min – max",
                "test mean ± std",
                "grad norm first / last tenth",
            ]
        )
        + " |",
        "|" + "---|" * (len(axes) + 7),
    ]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    *(str(r[a]) for a in axes),
                    str(r["runs"]),
                    str(r["failed"]),
                    f"{_fmt(r['failed_rate'], 2)} [{_fmt(r['failed_rate_low'], 2)}, "
                    f"{_fmt(r['failed_rate_high'], 2)}]",
                    f"{_fmt(r['ok_mean'])} ± {_fmt(r['ok_std'])}",
                    f"{_fmt(r['ok_min'])} – {_fmt(r['ok_max'])}",
                    f"{_fmt(r['ok_test_mean'])} ± {_fmt(r['ok_test_std'])}",
                    f"{_fmt(r['grad_norm_first_tenth'], 3)} / {_fmt(r['grad_norm_last_tenth'], 3)}",
                ]
            )
            + " |"
        )
    if tests:
        lines += [
            "",
            "## Against the baseline (same values of the other axes)",
            "",
            "Failed-run rate: Fisher's exact test; spread of the successful runs: "
            "Brown-Forsythe test; p-values Holm-corrected within each column.",
            "",
            "| group | reference | failed | p (Holm) | verdict | std vs reference | p (Holm) | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t in tests:
            lines.append(
                f"| {t['group']} | {t['reference']} | {t['failed']} vs {t['failed_reference']} "
                f"| {_fmt(t['p_failed_rate_holm'], 3)} | "
                f"{_verdict(t['p_failed_rate_holm'], t['failed'], t['failed_reference'], 'failed rate')} "
                f"| {_fmt(t['std'])} vs {_fmt(t['std_reference'])} | {_fmt(t['p_spread_holm'], 3)} "
                f"| {_verdict(t['p_spread_holm'], t['std'], t['std_reference'], 'spread')} |"
            )
    lines += ["", f"Gradient-norm traces: `{GRAD_NORMS_PNG}`; numbers: `{STABILITY_CSV}`.", ""]
    return "\n".join(lines)


def _plot(
    groups: list[st.GroupStats],
    axes: Sequence[str],
    line_axis: str,
    traces: dict[str, pd.DataFrame],
    title: str,
    f: IO[bytes],
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = list(axes).index(line_axis)
    panels = sorted({g.group[:k] + g.group[k + 1 :] for g in groups})
    lines = sorted({g.group[k] for g in groups})
    colours = {v: f"C{i}" for i, v in enumerate(lines)}
    fig = Figure(figsize=(5.0 * len(panels), 3.8), dpi=100)
    FigureCanvasAgg(fig)
    others = [a for a in axes if a != line_axis]
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for g in groups:
            if g.group[:k] + g.group[k + 1 :] != panel:
                continue
            for j, r in enumerate(g.runs):
                t = traces[r.job_dir]
                if t.empty:
                    continue
                ax.plot(
                    t["step"],
                    t["norm"],
                    color=colours[g.group[k]],
                    lw=0.7,
                    alpha=0.6,
                    ls="--" if not r.ok else "-",
                    label=g.group[k] if j == 0 else None,
                )
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("total gradient norm")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, title=line_axis, title_fontsize=7)
        name = ", ".join(f"{a}={v}" for a, v in zip(others, panel)) or title
        ax.set_title(name, fontsize=8)
    fig.suptitle(f"{title}: gradient norms (dashed: failed runs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(f, format="png", metadata={"Software": None})


def stability_report(
    sweep_dir: str | Path,
    baseline: str | None = None,
    line_axis: str | None = None,
    plot: bool = True,
) -> pd.DataFrame:
    """Write stability.md, stability.csv and grad_norms.png into ``sweep_dir``; return the
    per-group table (``df.attrs["tests"]``: the baseline comparisons)."""
    root = Path(sweep_dir)
    results = aggregate(root, plot=plot)
    stats = results.attrs["statistics"]
    axes = results.attrs["axes"]
    primary = results.attrs["primary_metric"]
    jobs = collect_jobs(root)
    if baseline is None:
        baseline = configured_aggregate(jobs, root, "baseline")
    base = parse_baseline(baseline, axes)
    traces = {r.job_dir: grad_norm_trace(root / r.job_dir) for g in stats.groups for r in g.runs}
    groups = sorted(stats.groups, key=lambda g: [natural_key(v) for v in g.group])
    rows = [_group_row(g, axes, traces) for g in groups]
    tests = _compare(groups, base)
    markdown = render(rows, tests, axes, primary, root.resolve().name, run_command(root, jobs))
    table = pd.DataFrame(rows)
    atomic_write(root / STABILITY_MD, lambda f: f.write(markdown))
    atomic_write(root / STABILITY_CSV, lambda f: table.round(6).to_csv(f, index=False))
    if plot and axes:
        line = line_axis or axes[0]
        if line not in axes:
            raise ValueError(f"--line-axis {line!r} is not a swept axis; swept: {axes}")
        atomic_write(
            root / GRAD_NORMS_PNG,
            lambda f: _plot(groups, axes, line, traces, root.resolve().name, f),
            binary=True,
        )
    table.attrs["tests"] = tests
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nlp_transfer.sweeps.stability",
        description="Failed-run rates, spread of successful runs and gradient-norm traces of a "
        "fine-tuning stability sweep (experiment=stability).",
    )
    parser.add_argument("sweep_dir", help="a multirun dir (or any dir above jobs)")
    parser.add_argument(
        "--baseline",
        default=None,
        help='the reference group, e.g. "stability_recipe=default" (default: the sweep\'s '
        "aggregate.baseline); axes it leaves out are matched per group",
    )
    parser.add_argument(
        "--line-axis",
        default=None,
        help="axis drawn as colours in grad_norms.png (default: the first)",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the plots")
    args = parser.parse_args(argv)
    table = stability_report(args.sweep_dir, args.baseline, args.line_axis, not args.no_plot)
    print((Path(args.sweep_dir) / STABILITY_MD).read_text())
    return 0 if len(table) else 1


if __name__ == "__main__":
    raise SystemExit(main())
