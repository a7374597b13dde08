"""Copy a sweep's generated reports (small text and plots, no predictions or checkpoints)
into a results folder, e.g. the repository's ``docs/results/<experiment>/``.

    python -m nlp_transfer.sweeps.publish <sweep dir> docs/results/<name> [--overwrite]

Copies the files that exist among :data:`REPORT_FILES`, byte for byte, so a published
table is exactly what the project's commands wrote. A destination file that differs is
left alone unless ``--overwrite`` is given (the command says which ones).
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

from nlp_transfer.utils.io import write_atomically

REPORT_FILES = (
    "summary.md",
    "summary_full.md",
    "summary.png",
    "results.csv",
    "comparisons.csv",
    "budget.csv",
    "budget.png",
    "paper.md",
    "paper_claims.csv",
    "stability.md",
    "stability.csv",
    "grad_norms.png",
    "probe.csv",
    "probe.png",
)
MAX_BYTES = 2_000_000  # a report this big is not a summary: keep heavy data out of the repo


def publish(sweep_dir: str | Path, dest: str | Path, overwrite: bool = False) -> list[Path]:
    """Copy the reports; return the files written. Raises ``FileNotFoundError`` when the
    sweep dir holds none of them and ``FileExistsError`` listing differing files."""
    src, out = Path(sweep_dir), Path(dest)
    found = [src / n for n in REPORT_FILES if (src / n).is_file()]
    if not found:
        raise FileNotFoundError(
            f"{src} holds none of {', '.join(REPORT_FILES)}: run the sweep's aggregation "
            "(python -m nlp_transfer.aggregate <sweep dir>) first"
        )
    big = [f"{f.name} ({f.stat().st_size} bytes)" for f in found if f.stat().st_size > MAX_BYTES]
    if big:
        raise ValueError(f"refusing to publish files over {MAX_BYTES} bytes: {', '.join(big)}")
    differing = [
        out / f.name
        for f in found
        if (out / f.name).is_file() and (out / f.name).read_bytes() != f.read_bytes()
    ]
    if differing and not overwrite:
        raise FileExistsError(
            f"these files exist with other content: {', '.join(map(str, differing))}; "
            "pass --overwrite to replace them"
        )
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f in found:
        target = out / f.name
        if target.is_file() and target.read_bytes() == f.read_bytes():
            continue
        write_atomically(target, lambda tmp, f=f: shutil.copyfile(f, tmp))
        written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nlp_transfer.sweeps.publish",
        description="Copy a sweep's generated reports into a results folder (e.g. docs/results/<name>).",
    )
    parser.add_argument("sweep_dir")
    parser.add_argument("dest")
    parser.add_argument("--overwrite", action="store_true", help="replace differing files")
    args = parser.parse_args(argv)
    for path in publish(args.sweep_dir, args.dest, args.overwrite):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
