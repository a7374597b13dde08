"""Fixed-seed metrics of five reference runs, to show a refactor changed no behaviour.

Runs, each in a fresh process with the tiny encoder on the demo data (fp32, 1 thread):
classification, NER with a CRF head, the multi-task demo, an sklearn head on frozen
features, and a run resumed from its epoch-1 checkpoint to epoch 2. Every float metric is
written with ``repr`` (all digits), so "equal" below means bit-identical.

    python benchmarks/fixed_seed_metrics.py --out before.json            # record
    python benchmarks/fixed_seed_metrics.py --out after.json --compare before.json

``--compare`` prints every metric that differs and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

COMMON = [
    "encoder=tiny",
    "trainer=cpu",
    "trainer.precision=32-true",
    "trainer.enable_progress_bar=false",
    "extras.print_config=false",
    "seed=7",
]
RUNS: dict[str, list[str]] = {
    "classification": ["experiment=demo_classification", "trainer.max_epochs=2"],
    "ner_crf": ["experiment=demo_ner", "head=crf", "trainer.max_epochs=2", "optimizer.lr=3e-3"],
    "multitask": ["experiment=multitask_demo", "trainer.max_epochs=1"],
    "sklearn_logreg": ["experiment=demo_classification", "strategy=frozen", "head=logreg"],
}
# metrics that name the run's folder or time, not its behaviour
VOLATILE = ("checkpoint", "time", "_s", "dir", "path", "date", "host", "version", "git_")


def _run(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "nlp_transfer.train", *COMMON, *overrides]
    cmd.append(f"hydra.run.dir={run_dir}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "metrics.json").read_text())


def _stable(metrics: dict[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in metrics.items():
        if any(tag in k for tag in VOLATILE) or isinstance(v, (dict, list)):
            continue
        out[k] = repr(v)
    return out


def record(root: Path) -> dict[str, dict[str, str]]:
    results = {}
    for name, overrides in RUNS.items():
        print(f"[fixed-seed] {name} ...", flush=True)
        results[name] = _stable(_run(overrides, root / name))
    print("[fixed-seed] resumed ...", flush=True)
    base = ["experiment=demo_classification"]
    _run([*base, "trainer.max_epochs=1"], root / "epoch1")
    last = root / "epoch1" / "checkpoints" / "last.ckpt"
    resumed = _run([*base, "trainer.max_epochs=2", f"ckpt_path={last}"], root / "resumed")
    results["resumed"] = _stable(resumed)
    return results


def compare(before: dict[str, dict[str, str]], after: dict[str, dict[str, str]]) -> int:
    differing = 0
    for run in sorted(set(before) | set(after)):
        b, a = before.get(run, {}), after.get(run, {})
        keys = [k for k in sorted(set(b) | set(a)) if not any(tag in k for tag in VOLATILE)]
        for key in keys:
            if b.get(key) != a.get(key):
                differing += 1
                print(f"DIFF {run} {key}: before {b.get(key)} after {a.get(key)}")
        same = sum(1 for k in keys if b.get(k) == a.get(k))
        print(f"{run}: {same}/{len(keys)} metrics bit-identical")
    return differing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON to write")
    parser.add_argument("--compare", type=Path, help="an earlier --out to compare against")
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"{args.out} exists; choose another --out (nothing is overwritten)")
    with tempfile.TemporaryDirectory(prefix="fixed_seed_") as tmp:
        results = record(Path(tmp))
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    if args.compare:
        sys.exit(1 if compare(json.loads(args.compare.read_text()), results) else 0)


if __name__ == "__main__":
    main()
