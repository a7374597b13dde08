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
from nlp_transfer.checkpoint import read_checkpoint, restore, restore_options
from nlp_transfer.data.alignment import merge_window_predictions
from nlp_transfer.data.conll import read_conll
from nlp_transfer.data.readers import DEFAULT_ENCODING, decode_text, read_text_file
from nlp_transfer.data.sequence_labeling import split_words
from nlp_transfer.errors import DataError, config_flag
from nlp_transfer.module import TransferModule
from nlp_transfer.tagging import entities_from_tags, tags_from_entities
from nlp_transfer.utils.io import (
    checkpoint_run_dir,
    free_default_output,
    guard_new_output,
    new_file_atomically,
)
from nlp_transfer.utils.resolvers import CONFIG_DIR

log = logging.getLogger(__name__)

CONLL_SUFFIXES = (".conll", ".bio")  # pre-tokenized input; anything else is raw text


def read_inputs(
    source: str, text_field: str = "text", encoding: str = DEFAULT_ENCODING
) -> list[str]:
    """Texts from stdin (``-``), a ``.jsonl`` file (field ``text_field``) or a text file
    (one text per line), decoded with ``encoding`` (the ``encoding=`` option)."""
    if source == "-":
        name = "stdin (input=-)"
        text = decode_text(sys.stdin.buffer.read(), name, encoding, "encoding")
        jsonl = False
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{path}: input file not found (input=)")
        name, jsonl = str(path), path.suffix == ".jsonl"
        text = read_text_file(path, encoding, "encoding")
    texts = []
    for line_no, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        if not jsonl:
            texts.append(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{line_no}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(
                f"{name}:{line_no}: expected a JSON object with a '{text_field}' field, got "
                f"{type(row).__name__} {line.strip()[:40]!r}"
            )
        if text_field not in row:
            raise DataError(
                f"{name}:{line_no}: no field '{text_field}' (text_field=); fields: {sorted(row)}"
            )
        if not isinstance(row[text_field], str):
            raise DataError(
                f"{name}:{line_no}: field '{text_field}' is {type(row[text_field]).__name__}, "
                "not a string"
            )
        texts.append(row[text_field])
    if not texts:
        raise DataError(f"{name}: no input texts (empty input)")
    return texts


def check_predict_input(source: str, task: str, ckpt: Path) -> None:
    """Refuse CoNLL input for a classification checkpoint (it would classify each token)."""
    if task != "sequence_labeling" and Path(source).suffix in CONLL_SUFFIXES:
        raise DataError(
            f"{source}: a CoNLL token file (input=), but {ckpt} is a {task} checkpoint; give "
            "it a .txt (one text per line) or .jsonl file, or use a sequence_labeling checkpoint"
        )


def conll_reader_options(data_cfg: Any) -> dict[str, Any]:
    """The CoNLL reader settings of a checkpoint's data config (tags are not read)."""
    data_cfg = data_cfg or {}
    return {
        "token_column": int(data_cfg.get("token_column", 0)),
        "separator": data_cfg.get("separator"),
        "comment_prefix": data_cfg.get("comment_prefix", "#"),
        "docstart": data_cfg.get("docstart", "-DOCSTART-"),
    }


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
    source: str,
    text_field: str = "text",
    conll_options: dict[str, Any] | None = None,
    encoding: str = DEFAULT_ENCODING,
) -> list[tuple[str, list[str], list[tuple[int, int]]]]:
    """Sentences for sequence labeling: raw text split into words (with character offsets),
    or pre-tokenized CoNLL input (``.conll``/``.bio``: tags ignored) read with
    ``conll_options`` (the checkpoint's reader settings, :func:`conll_reader_options`);
    every input is decoded with ``encoding`` (predict's ``encoding=`` option)."""
    if source != "-" and Path(source).suffix in CONLL_SUFFIXES:
        options = {
            **(conll_options or {}),
            "tag_column": None,
            "encoding": encoding,
            "encoding_option": "encoding",
        }
        items = []
        for sentence in read_conll(source, **options):
            spans, pos = [], 0
            for word in sentence.tokens:
                spans.append((pos, pos + len(word)))
                pos += len(word) + 1
            items.append((" ".join(sentence.tokens), list(sentence.tokens), spans))
        return items
    return [(text, *split_words(text)) for text in read_inputs(source, text_field, encoding)]


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
        Path(cfg.output)
        if cfg.get("output")
        else free_default_output(checkpoint_run_dir(cfg.ckpt_path) / "predictions.jsonl")
    )
    guard_new_output(out_path, "prediction file")
    run = read_checkpoint(cfg.ckpt_path)
    check_predict_input(str(cfg.input), run.task, run.path)
    text_field = cfg.get("text_field", "text")
    encoding = str(cfg.get("encoding") or DEFAULT_ENCODING)
    # inputs are read (and checked) before the model is built
    if run.task == "sequence_labeling":
        # the checkpoint's reader settings (eval's datamodule is built from them too)
        options = conll_reader_options(run.config.get("data"))
        items = read_word_inputs(str(cfg.input), text_field, options, encoding)
    else:
        texts = read_inputs(str(cfg.input), text_field, encoding)
    module, datamodule = restore(
        run,
        trust_remote_code=config_flag(cfg.get("trust_remote_code"), "trust_remote_code"),
        **restore_options(cfg),
    )
    if run.task == "sequence_labeling":
        scheme = run.config.data.get("train_scheme", "IOB2")
        rows = predict_entities(module, datamodule, items, int(cfg.batch_size), scheme)
    else:
        rows = predict_texts(module, datamodule, texts, int(cfg.batch_size))
    count = 0
    with (
        new_file_atomically(out_path, "prediction file") as tmp,
        tmp.open("w", encoding="utf-8") as f,
    ):
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    log.info("%d predictions written to %s", count, out_path)
    return out_path


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
