"""A sweep's rows beside a paper's numbers, and the paper's orderings tested on ours.

    python -m nlp_transfer.sweeps.paper <sweep dir> [--paper conf/paper/bert_table7.yaml]

The paper's numbers come from the ``paper`` key of the jobs' config (an experiment puts them
there with ``- /paper: <name>`` in its defaults; conf/paper/*.yaml), or from ``--paper``:

    source: Devlin et al. (2019), Table 7
    axis: table7_row          # the swept axis whose values are the paper's rows
    metric: val/f1            # our metric beside the paper's number
    scale: 100                # the paper's numbers / scale = our metric's unit
    higher_is_better: true
    scores: {finetune: 96.4, concat_last_four: 96.1, ...}

Writes ``paper.md`` and ``paper_claims.csv``: one row per paper row (paper score and rank,
ours with 95% CIs and our rank), Kendall's tau between the two orderings, and one claim per
pair of rows the paper orders ("A > B"), tested on our runs with the sweep's paired tests
(:func:`nlp_transfer.sweeps.stats.compare_pair`, Holm-corrected over all claims): the claim
*holds* (ours significantly in the paper's direction), is *reversed* (significantly the
other way), or is *not significant*.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf
from scipy import stats as sps

from nlp_transfer.sweeps import stats as st
from nlp_transfer.sweeps.aggregate import (
    aggregate,
    atomic_write,
    collect_jobs,
    run_command,
)

PAPER_MD = "paper.md"
PAPER_CSV = "paper_claims.csv"
HOLDS, REVERSED, NOT_SIGNIFICANT = "holds", "reversed", "not significant"


def load_paper_spec(sweep_dir: Path, path: str | Path | None) -> dict[str, Any]:
    """The spec from ``path``, else the ``paper`` key of the last job config that has one."""
    if path is not None:
        spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    else:
        spec = None
        for job in collect_jobs(sweep_dir):
            cfg_file = Path(job.job_dir) / ".hydra" / "config.yaml"
            if not cfg_file.is_file():
                cfg_file = sweep_dir / job.job_dir / ".hydra" / "config.yaml"
            if cfg_file.is_file():
                found = OmegaConf.load(cfg_file).get("paper")
                if found is not None:
                    spec = OmegaConf.to_container(found, resolve=True)
        if spec is None:
            raise ValueError(
                f"no job below {sweep_dir} has a `paper` key in its config; give the paper's "
                "numbers with --paper <yaml> (see conf/paper/)"
            )
    assert isinstance(spec, dict)
    missing = [k for k in ("axis", "metric", "scores") if k not in spec]
    if missing:
        raise ValueError(f"paper spec: missing keys {missing} (needs axis, metric, scores)")
    return spec


def _rank(values: Mapping[str, float], higher: bool) -> dict[str, int]:
    order = sorted(values, key=lambda k: -values[k] if higher else values[k])
    return {k: i + 1 for i, k in enumerate(order)}


def paper_comparison(
    sweep_dir: str | Path, paper: str | Path | None = None, n_resamples: int = 2000
) -> pd.DataFrame:
    """Write paper.md and paper_claims.csv into ``sweep_dir``; return the claims table."""
    root = Path(sweep_dir)
    spec = load_paper_spec(root, paper)
    axis, metric = str(spec["axis"]), str(spec["metric"])
    scale = float(spec.get("scale", 1.0))
    higher = bool(spec.get("higher_is_better", True))
    scores = {str(k): float(v) for k, v in spec["scores"].items()}
    results = aggregate(root, primary_metric=metric, plot=False)
    axes = results.attrs["axes"]
    if axis not in axes:
        raise ValueError(f"paper spec: axis {axis!r} is not a swept axis; swept: {axes}")
    if len(axes) > 1:
        raise ValueError(
            f"paper spec: the sweep varies {axes}; compare one axis at a time (a sweep dir "
            f"whose only swept axis besides the seed is {axis!r})"
        )
    groups = {g.group[0]: g for g in results.attrs["statistics"].groups}
    unknown = sorted(set(scores) - set(groups))
    rows_here = [r for r in scores if r in groups]
    # rows where every run failed have no score of ours: shown, but neither ranked nor in tau
    ours = {r: groups[r].ok_runs.mean for r in rows_here if math.isfinite(groups[r].ok_runs.mean)}
    paper_rank = _rank({r: scores[r] for r in rows_here}, higher)
    our_rank = _rank(ours, higher)
    tau = (
        sps.kendalltau([scores[r] for r in ours], [ours[r] for r in ours])
        if len(ours) > 1
        else None
    )
    claims = []
    for a, b in itertools.combinations(sorted(rows_here, key=paper_rank.get), 2):
        if scores[a] == scores[b]:
            continue
        row = st.compare_pair(groups[a], groups[b], "paper claim", n_resamples)
        row["claim"] = f"{a} {'>' if higher else '<'} {b}"
        row["paper_diff"] = (scores[a] - scores[b]) / scale
        claims.append(row)
    st.decide(claims, lower_is_better=not higher)
    for c in claims:
        c["verdict"] = {"better": HOLDS, "worse": REVERSED}.get(c["decision"], c["decision"])
        if c["verdict"] == "not distinguishable":
            c["verdict"] = NOT_SIGNIFICANT
    title = root.resolve().name
    md = _render(spec, rows_here, groups, scores, paper_rank, our_rank, tau, claims, unknown)
    md = md.replace("{title}", title).replace("{command}", run_command(root, collect_jobs(root)))
    table = pd.DataFrame(claims)
    atomic_write(root / PAPER_MD, lambda f: f.write(md))
    atomic_write(root / PAPER_CSV, lambda f: table.round(6).to_csv(f, index=False))
    return table


def _render(
    spec: dict[str, Any],
    rows: Sequence[str],
    groups: Mapping[str, st.GroupStats],
    scores: Mapping[str, float],
    paper_rank: Mapping[str, int],
    our_rank: Mapping[str, int],
    tau: Any,
    claims: Sequence[dict[str, Any]],
    unknown: Sequence[str],
) -> str:
    metric = spec["metric"]
    test = "test/" + metric.split("/", 1)[1] if metric.startswith("val/") else None
    lines = [
        "# {title}: our runs beside the paper",
        "",
        f"Paper: {spec.get('source', 'unnamed')}. Ours: `{metric}` mean [95% CI] over the "
        "successful runs (the sweep's intervals; summary.md says which bootstrap).",
        "",
        "Command: `{command}`",
        "",
        f"| {spec['axis']} | paper | paper rank | ours {metric} | ours {test or ''} | our rank |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=paper_rank.get):
        g = groups[r]
        lines.append(
            f"| {r} | {scores[r]:g} | {paper_rank[r]} | {g.ok_runs.text()} | "
            f"{g.test.text() if test else ''} | {our_rank.get(r, '–')} |"
        )
    if tau is not None:
        lines += [
            "",
            f"Kendall's tau between the paper's and our ordering: {tau.statistic:.3f} "
            f"(p = {tau.pvalue:.3f}, {len(our_rank)} rows with a score of ours).",
        ]
    if unknown:
        lines += ["", f"Paper rows not in this sweep: {', '.join(unknown)}."]
    counts = {v: sum(c["verdict"] == v for c in claims) for v in (HOLDS, REVERSED, NOT_SIGNIFICANT)}
    lines += [
        "",
        "## The paper's orderings, tested on our runs",
        "",
        f"{len(claims)} claims (every pair of rows the paper orders): {counts[HOLDS]} hold, "
        f"{counts[REVERSED]} are reversed, {counts[NOT_SIGNIFICANT]} are not significant "
        "(paired test over examples pooled across seed pairs where predictions exist, else "
        "the permutation test over seeds; Holm-corrected over all claims; α = 0.05).",
        "",
        "| claim | paper Δ | our Δ [95% CI] | split | p (Holm) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for c in claims:
        p = c["p_examples_holm"] if c["decided_by"] == "examples" else c["p_seeds_holm"]
        diff = (
            f"{c['diff_examples']:+.4f} [{c['diff_low']:+.4f}, {c['diff_high']:+.4f}]"
            if c["decided_by"] == "examples"
            else f"{c['diff_seeds']:+.4f} (seeds)"
        )
        p_text = "–" if p is None or math.isnan(p) else f"{p:.3g}"
        lines.append(
            f"| {c['claim']} | {c['paper_diff']:+.4f} | {diff} | {c['split'] or 'seeds'} | "
            f"{p_text} | {c['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nlp_transfer.sweeps.paper",
        description="A sweep's rows beside a paper's numbers; the paper's orderings tested.",
    )
    parser.add_argument("sweep_dir", help="a multirun dir (or any dir above jobs)")
    parser.add_argument(
        "--paper", default=None, help="a paper spec YAML (default: the jobs' `paper` key)"
    )
    parser.add_argument("--resamples", type=int, default=2000, help="resamples per test")
    args = parser.parse_args(argv)
    paper_comparison(args.sweep_dir, args.paper, args.resamples)
    print((Path(args.sweep_dir) / PAPER_MD).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
