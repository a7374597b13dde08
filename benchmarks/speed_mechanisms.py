"""Each speed mechanism on and off, on this machine, with one command.

Usage (from the repository root)::

    .venv/bin/python benchmarks/speed_mechanisms.py                 # CoNLL-2003, 3,000 sentences
    .venv/bin/python benchmarks/speed_mechanisms.py --task sst2 --max-train 8000 --repeat 3
    .venv/bin/python benchmarks/speed_mechanisms.py --dry-run       # the plan only

The template's defaults (``trainer.precision`` and every knob ``auto``, resolved for this
machine by ``nlp_transfer/training/hardware.py``) run against one variant per mechanism
with that mechanism flipped, plus the opt-in ``optimizer=lazy_adamw``, round-robin
(``--repeat`` rounds) through ``benchmarks/hf_vs_template.py`` (one subprocess per run, no
HF run). The table gives, per mechanism, the median over rounds of (train s without it) /
(train s with it): above 1 it pays on this machine. Compare the ``auto`` column with it:
where they disagree, ``AUTO_TABLE`` is wrong for this hardware kind. A saving of a few
milliseconds per step hides in run-to-run noise of the whole run, so the table also gives
the Wilcoxon signed-rank p of the paired train times and, per phase (``forward``,
``backward``, ``optimizer``), the paired median saving in ms/step and its p (with 3 pairs
the smallest two-sided p possible is 0.25; 6 or more pairs can go below 0.05).
``--from-json`` tabulates earlier results (several files: their rounds pooled) instead of
running.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from scipy import stats

from nlp_transfer.training.hardware import (
    AUTO_TABLE,
    MEASURED_ON,
    SPEED_KNOBS,
    auto_precision,
    fingerprint,
    fingerprint_report,
    probe_hardware,
)

HERE = Path(__file__).resolve().parent
BASELINE = "defaults"
LAZY = "optimizer=lazy_adamw"
PHASES = ("forward", "backward", "optimizer")


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("hf_vs_template", HERE / "hf_vs_template.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plan(kind: str) -> list[dict[str, Any]]:
    """The variants: the defaults, then each mechanism flipped from its ``auto`` value."""
    rows = [{"mechanism": None, "variant": BASELINE, "on": None}]
    for knob, key in SPEED_KNOBS.items():
        auto = AUTO_TABLE[kind][knob]
        rows.append(
            {"mechanism": knob, "variant": f"{key}={str(not auto).lower()}", "on": not auto}
        )
    rows.append({"mechanism": "lazy_adamw", "variant": LAZY, "on": True})  # opt-in: off in auto
    return rows


def bench_argv(args: argparse.Namespace, variants: list[str], json_out: Path) -> list[str]:
    argv = [
        f"--task={args.task}",
        f"--max-train={args.max_train}",
        f"--epochs={args.epochs}",
        f"--repeat={args.repeat}",
        "--hf-variant=none",
        "--skip-peak",
        f"--json-out={json_out}",
        *args.bench_args,
    ]
    if args.data_dir:
        argv.append(f"--data-dir={args.data_dir}")
    return argv + [f"--template-variant={v}" for v in variants]


def summarise(runs: list[dict[str, Any]], rows: list[dict[str, Any]], kind: str) -> str:
    """Markdown table: each mechanism's paired speed-up (off time / on time per round)."""
    times = {(r["variant"], r["round"]): r for r in runs}
    rounds = sorted({r["round"] for r in runs})
    measured = set(MEASURED_ON.get(kind, ()))
    lines = [
        "| mechanism | auto here | measured for auto before | train s with | train s without "
        "| speed-up (paired median) | pays here | train s: Wilcoxon p "
        "| saved per phase, ms/step (p) | metric with / without |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows[1:]:
        knob = row["mechanism"]
        auto = AUTO_TABLE[kind].get(knob, False)
        on_v, off_v = (row["variant"], BASELINE) if row["on"] else (BASELINE, row["variant"])
        pairs = [
            (times[(on_v, r)], times[(off_v, r)])
            for r in rounds
            if (on_v, r) in times and (off_v, r) in times
        ]
        if not pairs:
            continue
        ratio = statistics.median(off["train_s"] / on["train_s"] for on, off in pairs)
        on_s = statistics.median(on["train_s"] for on, _ in pairs)
        off_s = statistics.median(off["train_s"] for _, off in pairs)
        metric = f"{pairs[0][0]['metric']:.4f} / {pairs[0][1]['metric']:.4f}"
        lines.append(
            f"| {knob} | {'on' if auto else 'off'} | {'yes' if knob in measured else 'no'} | "
            f"{on_s:.1f} | {off_s:.1f} | {ratio:.3f}x | {'yes' if ratio > 1.0 else 'no'} | "
            f"{paired_p([off['train_s'] - on['train_s'] for on, off in pairs])} | "
            f"{phase_saving(pairs)} | {metric} |"
        )
    return "\n".join(lines)


def paired_p(differences: list[float]) -> str:
    """Two-sided Wilcoxon signed-rank p of paired differences (scipy >= 1.15: exact, by
    permutation, for small samples also with ties)."""
    if len(differences) < 2 or not any(differences):
        return "n/a"
    return f"{stats.wilcoxon(differences).pvalue:.3f}"


def phase_saving(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    """Per phase: the paired median saving (ms/step, off - on) and its Wilcoxon p."""
    if not all("ms_per_step" in on and "ms_per_step" in off for on, off in pairs):
        return "n/a"
    parts = []
    for ph in PHASES:
        saved = [off["ms_per_step"][ph] - on["ms_per_step"][ph] for on, off in pairs]
        parts.append(f"{ph} {statistics.median(saved):.1f} (p {paired_p(saved)})")
    return ", ".join(parts)


def load_runs(paths: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Template runs of ``--json-out`` files, each round keyed ``(file, round)`` so that
    files never merge their rounds. Refused: the same file twice, a first file without a
    hardware fingerprint or settings, and later files that ``hf_vs_template``'s
    ``load_comparable`` refuses against the first (other machine or settings)."""
    bench = _bench()
    runs: list[dict[str, Any]] = []
    first: dict[str, Any] | None = None
    seen: set[Path] = set()
    for i, path in enumerate(paths):
        resolved = Path(path).resolve()
        if not resolved.is_file():
            raise SystemExit(f"{path}: no such results file")
        if resolved in seen:
            raise SystemExit(f"{path}: given twice; its rounds would count as new pairs")
        seen.add(resolved)
        if first is None:
            data = json.loads(resolved.read_text())
            missing = [k for k in ("hardware", "settings", "runs") if not data.get(k)]
            if missing:
                raise SystemExit(
                    f"{path}: no {', '.join(missing)} (not a hf_vs_template.py --json-out "
                    "file of this version); rerun the benchmark"
                )
            first = data
        else:
            data = bench.load_comparable(resolved, first["hardware"], first["settings"])
        for r in data.get("runs", []):
            if r.get("kind") != "template":
                continue
            if r.get("hardware_kind") not in AUTO_TABLE:
                raise SystemExit(f"{path}: a run without a known hardware_kind; rerun it")
            runs.append(dict(r, round=(i, r["round"])))
    assert first is not None
    return runs, first


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["conll2003", "sst2"], default="conll2003")
    p.add_argument("--max-train", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="rounds (paired medians)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json-out", default=None, help="keep hf_vs_template's results here")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        metavar="FILE",
        help="tabulate these --json-out files (rounds pooled) instead of running",
    )
    p.add_argument("bench_args", nargs="*", help="after --: more arguments for hf_vs_template.py")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    hw = probe_hardware("auto")
    if args.from_json:
        runs, data = load_runs(args.from_json)
        kind = runs[0]["hardware_kind"] if runs else hw.kind
        rows = plan(kind)
        rounds = len({r["round"] for r in runs})
        print(fingerprint_report(data["hardware"]))
        print(
            f"speed mechanisms on {kind}, {data['settings']['task']} x "
            f"{data['settings']['max_train']}, {rounds} rounds from {len(args.from_json)} file(s)"
        )
        print(summarise(runs, rows, kind))
        return rows
    rows = plan(hw.kind)
    print(fingerprint_report(fingerprint()))
    print(f"kind {hw.kind}; trainer.precision=auto -> {auto_precision(hw)[0]}")
    json_out = Path(args.json_out or "<temp dir>/runs.json")
    if args.json_out is None and not args.dry_run:
        json_out = Path(tempfile.mkdtemp(prefix="speed-")) / "runs.json"
    argv_bench = bench_argv(args, [r["variant"] for r in rows], json_out)
    print("plan: python benchmarks/hf_vs_template.py " + " ".join(f"'{a}'" for a in argv_bench))
    for row in rows[1:]:
        print(f"  {row['mechanism']}: {row['variant']}")
    if args.dry_run:
        return rows
    _bench().main(argv_bench)
    runs = [r for r in json.loads(json_out.read_text())["runs"] if r["kind"] == "template"]
    print()
    print(f"speed mechanisms on {hw.kind}, {args.task} x {args.max_train}, {args.repeat} rounds")
    print(summarise(runs, rows, hw.kind))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
