"""Padding of length-grouped training batches against the megabatch size.

Usage (from the repository root)::

    .venv/bin/python benchmarks/padding.py                         # CoNLL-2003, batch 32
    .venv/bin/python benchmarks/padding.py --experiment sst2 --mult 25 50 100 1000

Tokenizes the experiment's training split with its encoder's tokenizer (as ``train`` does,
``data.max_length`` included), builds the epoch-0 batches of
:class:`~nlp_transfer.data.sampler.LengthGroupedBatchSampler` for each ``megabatch_mult``
(``data.megabatch_mult``; 50 is Hugging Face's ``group_by_length``) and prints the share of
padded token positions, plus plain shuffled batches for reference. Speed scales roughly
with the padded positions; how far batch composition may be de-randomised is a modelling
choice (docs/benchmarks.md, "Padding against megabatch size").
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_vs_template import compose_train_config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="conll2003", help="conf/experiment/<name>.yaml")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--mult", type=int, nargs="+", default=[10, 25, 50, 100, 200, 1000])
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from nlp_transfer.builders import build_datamodule, build_encoder
    from nlp_transfer.data.sampler import LengthGroupedBatchSampler, lengths_of, padding_stats

    with tempfile.TemporaryDirectory(prefix="padding-") as tmp:
        overrides = [
            f"experiment={args.experiment}",
            f"data.batch_size={args.batch_size}",
            f"data.max_length={args.max_length}",
        ]
        cfg = compose_train_config(overrides, Path(tmp))
        datamodule = build_datamodule(cfg, build_encoder(cfg))
        datamodule.setup("fit")
        lengths = lengths_of(datamodule.tokenized("train"))
    n = len(lengths)
    print(f"{args.experiment}: {n:,} training examples, batch {args.batch_size}, seed {args.seed}")
    print("\n| batches | megabatch_mult | real tokens | padded positions | padding |")
    print("|---|---|---|---|---|")
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    real, padded = padding_stats([b.tolist() for b in shuffled.split(args.batch_size)], lengths)
    print(f"| shuffled | – | {real:,} | {padded:,} | {1 - real / padded:.1%} |")
    for mult in args.mult:
        sampler = LengthGroupedBatchSampler(
            lengths=lengths, batch_size=args.batch_size, seed=args.seed, megabatch_mult=mult
        )
        sampler.set_epoch(0)
        real, padded = padding_stats(sampler.batches(), lengths)
        print(f"| length-grouped | {mult} | {real:,} | {padded:,} | {1 - real / padded:.1%} |")


if __name__ == "__main__":
    main()
