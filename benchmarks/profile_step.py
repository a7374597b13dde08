"""Where the time of one template training step goes: data, forward, backward, optimizer.

Usage (from the repository root)::

    .venv/bin/python benchmarks/profile_step.py                     # everything below
    .venv/bin/python benchmarks/profile_step.py --steps 40 --torch-profile 5

On a CPU shared with other processes, run it with ``OMP_WAIT_POLICY=PASSIVE`` (spinning
OpenMP threads otherwise make every phase several times slower and erratic).

Three measurements on CoNLL-2003 batches (32 sentences) with the packaged MiniLM:

1. ``manual``: the template's model (built from ``experiment=conll2003`` like ``train``)
   stepped by a plain loop under bf16 autocast, timed per phase, once per AdamW
   implementation (the for-loop default on CPU, ``foreach=True``, ``fused=True``; with
   ``--deterministic``, also fused without NaN-filling new tensors);
2. ``optimizer``: ``AdamW.step`` alone on the same parameters with random gradients, for each
   implementation, for all parameters / the word embeddings only / everything else, plus
   ``clip_grad_norm_``;
3. ``lightning``: the real ``train(cfg)`` with a callback timing the phases between
   Lightning's hooks (so Lightning's own per-step overhead is included);
and optionally (``--torch-profile N``) the top operators of N manual steps by self CPU time.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_vs_template import StepTimer, compose_train_config, train_with_timer

IMPLEMENTATIONS: dict[str, dict[str, bool]] = {
    "for-loop (default)": {"foreach": False, "fused": False},
    "foreach=True": {"foreach": True, "fused": False},
    "fused=True": {"foreach": False, "fused": True},
}


def overrides(args: argparse.Namespace, n_train: int) -> list[str]:
    return [
        "experiment=conll2003",
        f"data.max_train_examples={n_train}",
        "data.max_eval_examples=64",
        "data.batch_size=32",
        "optimizer.lr=5e-5",
        f"trainer={args.trainer}",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "trainer.num_sanity_val_steps=0",
        "trainer.check_val_every_n_epoch=null",
        "++trainer.val_check_interval=1000000000",
        f"trainer.deterministic={str(args.deterministic).lower()}",
        "callbacks=none",
        "logger=csv",
        "test=false",
        "extras.print_config=false",
    ]


def build(args: argparse.Namespace, workdir: Path) -> tuple[Any, Any, Any]:
    """The template's module and datamodule for ``experiment=conll2003``."""
    from pytorch_lightning import seed_everything

    from nlp_transfer.builders import build_datamodule, build_encoder, build_module

    n_train = max(args.warmup + args.steps, args.torch_profile + 2) * 32
    cfg = compose_train_config(overrides(args, n_train), workdir)
    seed_everything(42, workers=True)
    encoder = build_encoder(cfg)
    datamodule = build_datamodule(cfg, encoder)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = build_module(cfg, encoder, datamodule.labels, datamodule.task)
    return module, datamodule, cfg


def make_optimizer(module: Any, impl: dict[str, bool]) -> torch.optim.Optimizer:
    """The template's AdamW (its parameter groups and hyper-parameters) with ``impl`` flags."""
    kw = dict(module.optimizer_factory.keywords)
    kw.update(impl)
    return torch.optim.AdamW(module.optimizer_groups(), **kw)


def autocast(args: argparse.Namespace) -> Any:
    if args.trainer == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def manual_steps(
    module: Any,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    args: argparse.Namespace,
    steps: int,
    warmup: int,
    profiler: Any = None,
) -> dict[str, list[float]]:
    """Per-phase milliseconds of ``steps`` training steps after ``warmup`` untimed ones."""
    module.train()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    phases: dict[str, list[float]] = {
        k: [] for k in ("data", "forward", "backward", "clip", "step", "zero_grad")
    }
    it = iter(loader)
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        with autocast(args):
            _, feats, mask = module.encode_all(batch)
            loss = module.head.loss(module.head(feats, mask), batch["labels"], mask)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        t4 = time.perf_counter()
        optimizer.step()
        t5 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        t6 = time.perf_counter()
        if profiler is not None:
            profiler.step()
        if i >= warmup:
            marks = (t0, t1, t2, t3, t4, t5, t6)
            for k, (a, b) in zip(phases, itertools.pairwise(marks)):
                phases[k].append(1000 * (b - a))
    return phases


def time_call(fn: Callable[[], Any], repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def optimizer_only(module: Any, repeats: int) -> list[tuple[str, str, int, float]]:
    """``(implementation, parameter set, numel, ms per step)`` with random gradients."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    for _, p in named:
        p.grad = torch.randn_like(p) * 1e-3
    sets = {
        "all": [p for _, p in named],
        "word embeddings": [p for n, p in named if "word_embeddings" in n],
        "all but word embeddings": [p for n, p in named if "word_embeddings" not in n],
    }
    rows = []
    kw = dict(module.optimizer_factory.keywords)
    for impl_name, impl in IMPLEMENTATIONS.items():
        for set_name, params in sets.items():
            opt = torch.optim.AdamW(params, **{**kw, **impl})
            ms = time_call(opt.step, repeats)
            rows.append((impl_name, set_name, sum(p.numel() for p in params), ms))
    params = sets["all"]
    for label, foreach in (
        ("clip_grad_norm_ (default)", None),
        ("clip_grad_norm_ (for-loop)", False),
        ("clip_grad_norm_ (foreach)", True),
    ):
        ms = time_call(
            lambda f=foreach: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=f), repeats
        )
        rows.append((label, "all", sum(p.numel() for p in params), ms))
    return rows


def lightning_phases(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Per-phase ms of the real ``train(cfg)`` (Lightning hooks), warm-up steps excluded."""
    n_train = (args.warmup + args.steps) * 32
    cfg = compose_train_config(overrides(args, n_train), workdir / "lightning")
    timer = StepTimer(skip_first=args.warmup)
    train_with_timer(cfg, timer)
    return timer.summary()


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


def matmul_share(averages: Any, steps: int) -> str:
    """How much of the profiled steps the matmul kernels took: the floor no overhead cut removes."""
    total = sum(e.self_cpu_time_total for e in averages)
    matmul = sum(e.self_cpu_time_total for e in averages if e.key in MATMUL_OPS)
    return (
        f"matmul kernels ({', '.join(MATMUL_OPS)}): {matmul / 1000 / steps:.1f} ms/step of "
        f"{total / 1000 / steps:.1f} ms/step self CPU time ({100 * matmul / max(total, 1):.1f} %)"
    )


def fmt(values: list[float]) -> str:
    return f"{statistics.mean(values):7.1f}" if values else "    n/a"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--trainer", choices=["bf16", "default"], default="bf16")
    p.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.use_deterministic_algorithms, as trainer.deterministic (template default on)",
    )
    p.add_argument("--repeats", type=int, default=20, help="optimizer-only repetitions")
    p.add_argument(
        "--profile-adamw",
        choices=list(IMPLEMENTATIONS),
        default="fused=True",
        help="AdamW implementation of the --torch-profile steps (fused: the template's default)",
    )
    p.add_argument("--torch-profile", type=int, default=0, metavar="N", help="profile N steps")
    p.add_argument(
        "--only", choices=["manual", "optimizer", "lightning"], action="append", default=None
    )
    args = p.parse_args(argv)
    parts = args.only or ["manual", "optimizer", "lightning"]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
        workdir = Path(tmp)
        module, datamodule, _ = build(args, workdir)
        torch.use_deterministic_algorithms(args.deterministic)
        n_params = sum(p.numel() for p in module.parameters())
        n_words = sum(p.numel() for n, p in module.named_parameters() if "word_embeddings" in n)
        print(f"MiniLM + token head: {n_params:,} parameters, word embeddings {n_words:,}")
        if "manual" in parts:
            print(f"\n## manual loop, {args.trainer}, ms per step (mean of {args.steps} steps)\n")
            header = "| AdamW | data | forward | backward | clip | step | zero_grad | total |"
            print(header + "\n|" + "---|" * 8)
            rows = [(name, impl, True) for name, impl in IMPLEMENTATIONS.items()]
            if args.deterministic:  # the same, without NaN-filling every new tensor
                rows.append(("fused=True, no NaN fill", IMPLEMENTATIONS["fused=True"], False))
            for name, impl, fill in rows:
                torch.utils.deterministic.fill_uninitialized_memory = fill
                torch.manual_seed(0)
                loader = datamodule.train_dataloader()
                phases = manual_steps(
                    module, loader, make_optimizer(module, impl), args, args.steps, args.warmup
                )
                total = [sum(v) for v in zip(*phases.values())]
                cells = " | ".join(fmt(v) for v in phases.values())
                print(f"| {name} | {cells} | {fmt(total)} |", flush=True)
            torch.utils.deterministic.fill_uninitialized_memory = True
        if "optimizer" in parts:
            print(f"\n## optimizer step alone (median of {args.repeats})\n")
            print("| operation | parameters | numel | ms |\n|---|---|---|---|")
            for impl_name, set_name, numel, ms in optimizer_only(module, args.repeats):
                print(f"| {impl_name} | {set_name} | {numel:,} | {ms:.1f} |", flush=True)
            module.zero_grad(set_to_none=True)
        if args.torch_profile:
            from torch.profiler import ProfilerActivity, profile

            loader = datamodule.train_dataloader()
            optimizer = make_optimizer(module, IMPLEMENTATIONS[args.profile_adamw])
            manual_steps(module, loader, optimizer, args, 2, 0)  # warm-up, not profiled
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                manual_steps(module, loader, optimizer, args, args.torch_profile, 0)
            print(
                f"\n## top operators over {args.torch_profile} steps (self CPU time, "
                f"AdamW {args.profile_adamw})\n"
            )
            averages = prof.key_averages()
            print(averages.table(sort_by="self_cpu_time_total", row_limit=20))
            print(matmul_share(averages, args.torch_profile))
        if "lightning" in parts:
            summary = lightning_phases(args, workdir)
            ms = summary["ms_per_step"]
            print(f"\n## Lightning train(), ms per step (after {args.warmup} warm-up steps)\n")
            print("| data | forward | backward | optimizer (clip+step+zero_grad+logging) | total |")
            print("|---|---|---|---|---|")
            print(
                " | ".join(
                    ["", *(f"{v:.1f}" for v in ms.values()), f"{sum(ms.values()):.1f}", ""]
                ).strip()
            )
    print(f"\nload {os.getloadavg()}")


if __name__ == "__main__":
    main()
