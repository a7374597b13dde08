"""How much of a training step does not depend on the batch: the per-step fixed cost.

Usage (from the repository root)::

    .venv/bin/python benchmarks/fixed_cost.py                  # CoNLL-2003, MiniLM, bf16
    .venv/bin/python benchmarks/fixed_cost.py --steps 60 --warmup 10

Runs the real ``train(cfg)`` of ``experiment=conll2003`` twice with the template's defaults
and a timing callback: once with the benchmark's batches (32 sentences, max length 128),
once with batches of one sentence cut to 8 subtokens. The second run does almost no
token work, so its step time is what every step pays whatever the batch: the optimizer
over all parameters, autocast's weight casts, the weight-gradient writes, Python and
Lightning. The script prints both per-phase splits and the fixed share of a full step.
The larger that share, the more a bigger batch (or fewer parameters to update) helps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_vs_template import StepTimer, compose_train_config, train_with_timer


def step_ms(overrides: list[str], warmup: int, workdir: Path) -> dict[str, float]:
    """Per-phase ms of ``train(cfg)`` after ``warmup`` steps (Lightning hooks included)."""
    timer = StepTimer(skip_first=warmup)
    train_with_timer(compose_train_config(overrides, workdir), timer)
    return timer.summary()["ms_per_step"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=2, help="runs of each (median)")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    steps = args.warmup + args.steps
    common = [
        "experiment=conll2003",
        "trainer=bf16",
        f"+trainer.max_steps={steps}",
        "trainer.enable_progress_bar=false",
        "trainer.num_sanity_val_steps=0",
        "trainer.check_val_every_n_epoch=null",
        "++trainer.val_check_interval=1000000000",
        "data.max_eval_examples=64",
        "callbacks=none",
        "test=false",
        "extras.print_config=false",
    ]
    shapes = {
        "32 sentences, max length 128": ["data.batch_size=32", "data.max_length=128"],
        "1 sentence, 8 subtokens": ["data.batch_size=1", "data.max_length=8"],
    }
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="fixed-cost-") as tmp:
        for name, extra in shapes.items():
            n_train = steps * (32 if "32" in name else 1)
            runs = [
                step_ms(
                    [*common, *extra, f"data.max_train_examples={n_train}"],
                    args.warmup,
                    Path(tmp) / f"{name[:2].strip()}-{r}",
                )
                for r in range(args.repeats)
            ]
            results[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"\nms per step, median of {args.repeats} runs of {args.steps} steps\n")
    print("| batch | data | forward | backward | optimizer | total |\n|---|---|---|---|---|---|")
    for name, ms in results.items():
        cells = " | ".join(f"{v:.1f}" for v in ms.values())
        print(f"| {name} | {cells} | {sum(ms.values()):.1f} |")
    full, tiny = (sum(ms.values()) for ms in results.values())
    print(f"\nfixed share of a full step: {tiny / full:.0%} ({tiny:.1f} of {full:.1f} ms)")


if __name__ == "__main__":
    main()
