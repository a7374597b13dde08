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
from nlp_transfer.data.alignment import merge_window_predictions
from nlp_transfer.data.conll import read_conll
from nlp_transfer.data.errors import DataError, config_flag
from nlp_transfer.data.sequence_labeling import split_words
from nlp_transfer.data.tags import entities_from_tags, tags_from_entities
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


@torch.no_grad()  # not inference_mode: CRF marginals need autograd
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


def read_word_inputs(
    source: str, text_field: str = "text"
) -> list[tuple[str, list[str], list[tuple[int, int]]]]:
    """Sentences for sequence labeling: raw text split into words (with character offsets),
    or pre-tokenized CoNLL input (``.conll``: one token per line, tags ignored)."""
    if source != "-" and Path(source).suffix == ".conll":
        items = []
        for sentence in read_conll(source, tag_column=None):
            spans, pos = [], 0
            for word in sentence.tokens:
                spans.append((pos, pos + len(word)))
                pos += len(word) + 1
            items.append((" ".join(sentence.tokens), list(sentence.tokens), spans))
        return items
    return [(text, *split_words(text)) for text in read_inputs(source, text_field)]


@torch.no_grad()  # not inference_mode: CRF marginals need autograd
def predict_entities(
    module: TransferModule,
    datamodule: Any,
    items: list[tuple[str, list[str], list[tuple[int, int]]]],
    batch_size: int = 64,
    scheme: str = "IOB2",
) -> Iterator[dict[str, Any]]:
    """Tag words and yield entity spans ``{"text", "type", "start", "end", "score"}`` per
    sentence; long sentences are windowed and merged so every word gets one prediction."""
    module.eval()
    sentences = [words for _, words, _ in items]
    windows = datamodule.encode_words(sentences)
    rows: dict[str, list[Any]] = {"pred": [], "prob": [], "sid": [], "offset": [], "owned": []}
    for start in range(0, len(windows), batch_size):
        batch = datamodule.collate(windows[start : start + batch_size])
        batch = {k: v.to(module.device) for k, v in batch.items()}
        out = module.predict_step(batch, 0)
        prob = out["probs"].gather(-1, out["preds"].unsqueeze(-1)).squeeze(-1)
        for i, n in enumerate(batch["word_mask"].sum(1).tolist()):
            rows["pred"].append(out["preds"][i, :n].tolist())
            # merge_window_predictions keeps ints: probabilities travel in millionths
            rows["prob"].append([round(x * 1e6) for x in prob[i, :n].tolist()])
            rows["sid"].append(int(batch["sentence_id"][i]))
            rows["offset"].append(int(batch["word_offset"][i]))
            rows["owned"].append(batch["owned_mask"][i, :n].tolist())
    sizes = {i: len(words) for i, words in enumerate(sentences)}
    tags_by_sid = merge_window_predictions(
        rows["pred"], rows["sid"], rows["offset"], rows["owned"], sizes
    )
    probs_by_sid = merge_window_predictions(
        rows["prob"], rows["sid"], rows["offset"], rows["owned"], sizes
    )
    for sid, (text, words, spans) in enumerate(items):
        tags = [module.labels[t] for t in tags_by_sid.get(sid, [])]
        probs = [p / 1e6 for p in probs_by_sid.get(sid, [])]
        # ill-formed output (e.g. O I-PER from a softmax head) is read as seqeval's default
        # mode reads it: the I- tag starts an entity; the tags written are the repaired ones
        found = entities_from_tags(tags, scheme)
        entities = [
            {
                "text": text[spans[a][0] : spans[b - 1][1]],
                "type": etype,
                "start": spans[a][0],
                "end": spans[b - 1][1],
                "score": round(sum(probs[a:b]) / (b - a), 6),
            }
            for etype, a, b in found
        ]
        iob2 = tags_from_entities(found, len(words), "IOB2")
        yield {"text": text, "tokens": words, "tags": iob2, "entities": entities}


def predict(cfg: DictConfig) -> Path:
    check_required(cfg)
    out_path = (
        Path(cfg.output) if cfg.get("output") else Path(cfg.paths.output_dir) / "predictions.jsonl"
    )
    guard_new_output(out_path, "prediction file")
    run = read_checkpoint(cfg.ckpt_path)
    module, datamodule = restore(
        run, trust_remote_code=config_flag(cfg.get("trust_remote_code"), "trust_remote_code")
    )
    text_field = cfg.get("text_field", "text")
    if run.task == "sequence_labeling":
        items = read_word_inputs(str(cfg.input), text_field)
        scheme = run.config.data.get("train_scheme", "IOB2")
        rows = predict_entities(module, datamodule, items, int(cfg.batch_size), scheme)
    else:
        rows = predict_texts(
            module, datamodule, read_inputs(str(cfg.input), text_field), int(cfg.batch_size)
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(out_path)
    log.info("%d predictions written to %s", count, out_path)
    return out_path


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
