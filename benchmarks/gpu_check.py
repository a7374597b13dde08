"""GPU check: the template on one CUDA GPU in under 8 minutes (``benchmarks/gpu_check.sh``).

Steps (each with its own time limit; the whole plan is sized for < 8 min on one GPU):

1. ``environment``: the GPU, the torch build, the hardware fingerprint; CUDA is required.
2. ``gpu-tests``: the GPU-marked tests (``pytest -m gpu``).
3. ``conll``: one epoch of MiniLM on CoNLL-2003 (all 14,041 sentences): the template's
   defaults (``trainer.precision=auto`` → ``bf16-mixed`` / ``16-mixed``, speed knobs auto)
   against HF's best GPU setting (bf16, ``group_by_length``, fused AdamW), through
   ``benchmarks/hf_vs_template.py``: tokens/s, peak GPU memory, F1.
4. ``conll-compiled``: the same with ``model.compile=true`` / HF ``torch_compile``.
5. ``sweep``: a 2-job ``hydra/launcher=local_parallel`` sweep pinned to the GPU
   (``sweep.gpus=auto``) on a CoNLL slice.
6. ``cpu-mechanisms-off``: the template runs of steps 3-5 recorded the CPU-only speed
   mechanisms (fast dropout masks, embedding gradient buffer, clipping-norm shortcut) as
   off and ran on CUDA (their ``metrics.json`` / benchmark records).

``--dry-run`` prints the plan and validates it on any machine (configs compose, variants
exist, the auto table keeps the CPU-only mechanisms off for CUDA); nothing is run.
Results: ``<out-dir>/gpu_check.md`` (the tables) and the JSON of every step.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CPU_ONLY = ("fast_dropout", "embedding_grad_buffer", "clip_norm_shortcut")
HF_BEST_GPU = "bf16_grouped_fused"
BUDGET_S = 8 * 60


@dataclass
class Step:
    name: str
    cmd: list[str]
    timeout_s: int
    what: str


def default_data_dir() -> Path:
    """``NLP_TRANSFER_SHARED_DATA``, else ``../shared/data`` or ``./shared/data``."""
    env = os.environ.get("NLP_TRANSFER_SHARED_DATA")
    if env:
        return Path(env)
    for candidate in (ROOT.parent / "shared" / "data", ROOT / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return ROOT.parent / "shared" / "data"


def plan(args: argparse.Namespace) -> list[Step]:
    py = sys.executable
    out = Path(args.out_dir)
    data = Path(args.data_dir)
    bench = [
        py,
        "benchmarks/hf_vs_template.py",
        "--task=conll2003",
        f"--max-train={args.max_train}",
        f"--data-dir={data / 'conll2003'}",
        "--omp-wait-policy=default",
    ]
    sweep = [
        py,
        "-m",
        "nlp_transfer.train",
        "-m",
        "hydra/launcher=local_parallel",
        "sweep.gpus=auto",
        "experiment=conll2003",
        f"paths.shared_data_dir={data}",
        f"data.max_train_examples={args.sweep_train}",
        "data.max_eval_examples=500",
        "trainer.enable_progress_bar=false",
        "callbacks=none",
        "test=false",
        "extras.print_config=false",
        f"hydra.sweep.dir={out / 'sweep'}",
        "seed=1,2",
    ]
    return [
        Step("environment", [py, __file__, "--environment"], 15, "GPU, torch build, hardware"),
        Step(
            "gpu-tests",
            [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
            60,
            "GPU-marked tests",
        ),
        Step(
            "conll",
            [
                *bench,
                f"--hf-variant={HF_BEST_GPU}",
                "--template-variant=defaults",
                "--peak-seconds=1",
                f"--json-out={out / 'conll.json'}",
            ],
            120,
            "1 epoch CoNLL-2003: template defaults vs HF bf16+group_by_length+fused AdamW",
        ),
        Step(
            "conll-compiled",
            [
                *bench,
                "--skip-peak",
                f"--hf-variant={HF_BEST_GPU}_compiled",
                "--template-variant=model.compile=true",
                f"--json-out={out / 'conll_compiled.json'}",
            ],
            180,
            "the same with torch.compile on both sides",
        ),
        Step("sweep", sweep, 100, "2-job local_parallel sweep pinned to the GPU"),
    ]


# -- checks -------------------------------------------------------------------------------
def cpu_mechanism_problems(record: dict[str, Any], where: str) -> list[str]:
    """What is wrong with one template run's record for a GPU run (empty: all fine)."""
    speed = record.get("speed") or {
        k[len("speed/") :]: v for k, v in record.items() if k.startswith("speed/")
    }
    problems = [f"{where}: {k} is on" for k in CPU_ONLY if speed.get(k) is not False]
    kind = record.get("hardware_kind", record.get("hardware"))  # benchmark run / metrics.json
    if kind != "cuda":
        problems.append(f"{where}: trained on {kind}, not cuda")
    precision = str(record.get("precision", ""))
    if precision not in ("bf16-mixed", "16-mixed"):
        problems.append(f"{where}: precision {precision!r}, not the GPU's auto choice")
    return problems


def check_runs(out: Path) -> list[str]:
    """The CPU-only mechanisms were off in every template run of the benchmark and sweep."""
    problems: list[str] = []
    found = 0
    for name in ("conll.json", "conll_compiled.json"):
        path = out / name
        if not path.is_file():
            problems.append(f"{name}: missing (its step failed?)")
            continue
        for run in json.loads(path.read_text())["runs"]:
            if run["kind"] == "template":
                found += 1
                problems += cpu_mechanism_problems(run, f"{name} {run['label']}")
    jobs = sorted((out / "sweep").glob("*/metrics.json"))
    if len(jobs) != 2:
        problems.append(f"sweep: {len(jobs)} job metrics.json instead of 2")
    for path in jobs:
        found += 1
        problems += cpu_mechanism_problems(
            json.loads(path.read_text()), f"sweep {path.parent.name}"
        )
    if not found:
        problems.append("no template run recorded")
    return problems


def environment() -> None:
    import torch

    from nlp_transfer.training.hardware import fingerprint, fingerprint_report, probe_hardware

    print(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    )
    print(fingerprint_report(fingerprint()))
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: this check needs one (see --dry-run)")
    hw = probe_hardware("auto")
    print(f"probe: {hw.describe()}; free/total memory {torch.cuda.mem_get_info()}")
    subprocess.run(["nvidia-smi"], check=False)


# -- dry run ------------------------------------------------------------------------------
def validate(steps: list[Step], args: argparse.Namespace) -> list[str]:
    """Checks that need no GPU: scripts and variants exist, every template config composes,
    and the auto settings for CUDA keep the CPU-only mechanisms off."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from nlp_transfer.training import hardware
    from nlp_transfer.utils.resolvers import CONFIG_DIR

    problems = []
    spec = importlib.util.spec_from_file_location(
        "hf_vs_template", ROOT / "benchmarks" / "hf_vs_template.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for step in steps:
        for token in step.cmd:
            if (
                token.startswith("--hf-variant=")
                and token.split("=", 1)[1] not in bench.HF_VARIANTS
            ):
                problems.append(f"{step.name}: unknown HF variant {token}")
    if not (ROOT / "tests").is_dir():
        problems.append("tests/ is missing")
    gpu = hardware.Hardware(hardware.CUDA, "cuda", "dry-run GPU", True, capability=(9, 0))
    probe = hardware.probe_hardware
    hardware.probe_hardware = lambda accelerator="auto": gpu  # type: ignore[assignment]
    try:
        template_overrides = [
            ["experiment=conll2003", "trainer=gpu"],
            ["experiment=conll2003", "trainer=gpu", "model.compile=true"],
            ["experiment=conll2003", "hydra/launcher=local_parallel", "sweep.gpus=auto"],
        ]
        for overrides in template_overrides:
            GlobalHydra.instance().clear()
            with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
                cfg = compose("train", overrides=overrides, return_hydra_config=True)
            with open_dict(cfg):
                cfg.pop("hydra")
            record = hardware.apply_hardware_settings(cfg)
            problems += cpu_mechanism_problems(record, " ".join(overrides))
        GlobalHydra.instance().clear()
    finally:
        hardware.probe_hardware = probe  # type: ignore[assignment]
    if not Path(args.data_dir, "conll2003").is_dir():
        print(
            f"note: {Path(args.data_dir, 'conll2003')} not found here; pass --data-dir on the GPU machine"
        )
    total = sum(s.timeout_s for s in steps)
    if total > BUDGET_S:
        problems.append(f"the step limits add up to {total} s, over the {BUDGET_S} s budget")
    return problems


# -- report -------------------------------------------------------------------------------
def report(out: Path, results: list[dict[str, Any]]) -> str:
    lines = ["| step | status | s | what |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['wall_s']:.0f} | {r['what']} |" for r in results]
    for name in ("conll.json", "conll_compiled.json"):
        path = out / name
        if not path.is_file():
            continue
        lines += [
            "",
            f"{name}:",
            "",
            "| run | precision | tokens/s | peak GPU MB | F1 | train s |",
            "|---|---|---|---|---|---|",
        ]
        for run in json.loads(path.read_text())["runs"]:
            tps = run["real_tokens"] / run["train_s"]
            lines.append(
                f"| {run['label']} | {run.get('precision')} | {tps:,.0f} | "
                f"{run.get('peak_gpu_mb', float('nan')):,.0f} | {run['metric']:.4f} | {run['train_s']:.1f} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print and validate the plan only")
    p.add_argument("--data-dir", default=str(default_data_dir()), help="holds conll2003/")
    p.add_argument("--out-dir", default=str(ROOT / "logs" / "gpu_check"))
    p.add_argument("--max-train", type=int, default=14041, help="CoNLL sentences per epoch")
    p.add_argument("--sweep-train", type=int, default=2000, help="CoNLL sentences per sweep job")
    p.add_argument("--only", action="append", help="run only these steps (repeatable)")
    p.add_argument("--environment", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.environment:
        environment()
        return 0
    steps = [s for s in plan(args) if not args.only or s.name in args.only]
    print(f"GPU check: {len(steps)} steps, limits {sum(s.timeout_s for s in steps)} s in all")
    for s in steps:
        print(f"  [{s.name}] ({s.timeout_s} s) {s.what}\n    {shlex.join(s.cmd)}")
    print(
        "  [cpu-mechanisms-off] CPU-only mechanisms off in every template run: "
        + ", ".join(CPU_ONLY)
    )
    if args.dry_run:
        problems = validate(steps, args)
        for p in problems:
            print(f"PLAN PROBLEM: {p}")
        print("dry run: plan valid" if not problems else "dry run: plan INVALID")
        return 1 if problems else 0
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])
        ),
    }
    results = []
    for s in steps:
        print(f"\n== {s.name}: {s.what}", flush=True)
        start = time.perf_counter()
        try:
            proc = subprocess.run(s.cmd, cwd=ROOT, env=env, timeout=s.timeout_s, check=False)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out ({s.timeout_s} s)"
        results.append(
            {
                "name": s.name,
                "status": status,
                "what": s.what,
                "wall_s": time.perf_counter() - start,
            }
        )
        if s.name == "environment" and status != "ok":
            break
    if not args.only:
        problems = check_runs(out)
        results.append(
            {
                "name": "cpu-mechanisms-off",
                "status": "ok" if not problems else "failed: " + "; ".join(problems),
                "what": "CPU-only mechanisms off in every GPU template run",
                "wall_s": 0.0,
            }
        )
    text = report(out, results)
    (out / "gpu_check.md").write_text(text + "\n")
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    print("\n" + text)
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
