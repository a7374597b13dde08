"""Predict with a checkpoint: ``python -m nlp_transfer.predict ckpt_path=<ckpt> input=<file|->``.

Writes one JSON object per input line: the predicted label and class probabilities.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from nlp_transfer.builders import check_required
from nlp_transfer.checkpoint import read_checkpoint, restore
from nlp_transfer.data.errors import DataError
from nlp_transfer.module import TransferModule
from nlp_transfer.utils.io import guard_new_output
from nlp_transfer.utils.resolvers import CONFIG_DIR

log = logging.getLogger(__name__)


def read_inputs(source: str, text_field: str = "text") -> list[str]:
    """Texts from stdin (``-``), a ``.jsonl`` file (field ``text_field``) or a text file."""
    if source == "-":
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: input file not found (input=)")
    texts = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
                if text_field not in row:
                    raise DataError(f"{path}:{line_no}: no field '{text_field}' (text_field=)")
                texts.append(str(row[text_field]))
            else:
                texts.append(line.rstrip("\n"))
    if not texts:
        raise DataError(f"{source}: no input texts")
    return texts


@torch.inference_mode()
def predict_texts(
    module: TransferModule, datamodule: Any, texts: list[str], batch_size: int = 64
) -> Iterator[dict[str, Any]]:
    """Classify texts; yields ``{"text", "label", "probs"}`` in input order."""
    module.eval()
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        batch = datamodule.collate(datamodule.encode_texts(chunk))
        batch = {k: v.to(module.device) for k, v in batch.items()}
        out = module.predict_step(batch, 0)
        for text, pred, probs in zip(chunk, out["preds"].tolist(), out["probs"].tolist()):
            yield {
                "text": text,
                "label": module.labels[pred],
                "probs": {label: round(p, 6) for label, p in zip(module.labels, probs)},
            }


def predict(cfg: DictConfig) -> Path:
    check_required(cfg)
    out_path = (
        Path(cfg.output) if cfg.get("output") else Path(cfg.paths.output_dir) / "predictions.jsonl"
    )
    guard_new_output(out_path, "prediction file")
    run = read_checkpoint(cfg.ckpt_path)
    module, datamodule = restore(run)
    texts = read_inputs(str(cfg.input), cfg.get("text_field", "text"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in predict_texts(module, datamodule, texts, int(cfg.batch_size)):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out_path)
    log.info("%d predictions written to %s", len(texts), out_path)
    return out_path


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
