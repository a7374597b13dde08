"""Aggregate a sweep: ``python -m nlp_transfer.aggregate <sweep_dir> [--metric val/f1]``.

Writes ``results.csv``, ``results_per_class.csv``, ``summary.md`` (headline table with 95%
CIs and "≈ best" marks), ``summary_full.md``, ``comparisons.csv``, ``budget.csv`` and the
plots into the sweep dir and prints the summary.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from nlp_transfer.sweeps.aggregate import (
    COMPARISONS_CSV,
    RESULTS_CSV,
    SUMMARY_MD,
    SUMMARY_PNG,
    NoJobsError,
    UnknownMetricError,
    aggregate,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nlp_transfer.aggregate",
        description="Collect a (multi)run dir's jobs into results.csv, summary.md (mean and "
        "95%% CI per group of swept overrides), comparisons.csv (paired tests) and budget.csv.",
    )
    parser.add_argument("sweep_dir", type=Path, help="a multirun dir (or any dir above jobs)")
    parser.add_argument(
        "--metric",
        default=None,
        help="primary metric to sort and plot by (default: the sweep's optimized_metric, "
        "else val/acc, else the first val/ metric)",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the plots")
    parser.add_argument(
        "--baseline",
        default=None,
        help='a group every group is compared with, e.g. "strategy=full" (default: the '
        "sweep's aggregate.baseline)",
    )
    parser.add_argument(
        "--budget-by",
        default=None,
        help="comma-separated axes of the budget-curve groups (default: aggregate.budget_by, "
        "else the non-numeric swept axes)",
    )
    parser.add_argument(
        "--resamples", type=int, default=None, help="bootstrap resamples (default 2000)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for a bad dir or metric)."""
    args = build_parser().parse_args(argv)
    try:
        df = aggregate(
            args.sweep_dir,
            primary_metric=args.metric,
            plot=not args.no_plot,
            baseline=args.baseline,
            budget_by=args.budget_by.split(",") if args.budget_by else None,
            n_resamples=args.resamples,
        )
    except (FileNotFoundError, NoJobsError, UnknownMetricError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(df.attrs["summary_markdown"])
    written = [RESULTS_CSV, SUMMARY_MD, COMPARISONS_CSV, *([] if args.no_plot else [SUMMARY_PNG])]
    print("wrote " + ", ".join(str(args.sweep_dir / name) for name in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
