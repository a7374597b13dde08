"""A corpus of bad inputs: each must fail with a clear error naming the file and line, or the
config key, at fault (data, config, predict/eval input, checkpoints).

Every case builds its input in a temporary folder and runs the real entry point (reader,
``train``, ``predict``, ``evaluate``). Nearly all fail while reading data or config, before
any training, so the corpus is fast. ``test_corpus_report`` prints how many cases give a
clear error and fails if any became silent (ran without error) or unclear (another
exception, or a message that no longer names the file:line / key).

Hostile checkpoints (targets that would run code) are in tests/test_safe_loading.py.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

from nlp_transfer.builders import build_datamodule, build_encoder, build_module
from nlp_transfer.checkpoint import CheckpointError
from nlp_transfer.data.classification import ClassificationDataModule
from nlp_transfer.data.sequence_labeling import SequenceLabelingDataModule
from nlp_transfer.errors import ConfigError, DataError
from tests.conftest import FAST, compose_config

LATIN1 = "café".encode("latin-1")  # b"caf\xe9": not UTF-8


@dataclass(frozen=True)
class Env:
    """Shared inputs: checkpoints built once per module (no training: weights are random)."""

    root: Path
    cls_ckpt: Path
    ner_ckpt: Path


@dataclass(frozen=True)
class Case:
    name: str
    area: str  # data | config | predict | eval | checkpoint
    run: Callable[[Env, Path], Any]
    error: type[BaseException]
    pattern: str  # must be found in the message: the file:line or config key


def _write(folder: Path, files: dict[str, str | bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content.encode("utf-8") if isinstance(content, str) else content
        (folder / name).write_bytes(data)
    return folder


def jsonl(*rows: Any) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


GOOD_ROWS = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}] * 2
GOOD_JSONL = jsonl(*GOOD_ROWS)
DEMO_JSONL = jsonl({"text": "fine", "label": "positive"}, {"text": "bad", "label": "negative"})
GOOD_CONLL = "John B-PER\nruns O\n\nParis B-LOC\nsleeps O\n\nAnna B-PER\nsings O\n"


# -- how each kind of case runs ---------------------------------------------------------------
def cls_data(files: dict[str, str | bytes], **kw: Any) -> Callable[[Env, Path], Any]:
    """Read classification files with ClassificationDataModule (no tokenizer needed)."""

    def run(env: Env, tmp: Path) -> Any:
        data = ClassificationDataModule(data_dir=str(_write(tmp / "d", files)), **kw)
        data.load_examples()

    return run


def hf_json(rows: list[dict[str, Any]]) -> Callable[[Env, Path], Any]:
    """Local JSONL read through the Hugging Face ``json`` builder (data=hf_classification)."""

    def run(env: Env, tmp: Path) -> Any:
        path = _write(tmp / "d", {"train.jsonl": jsonl(*rows)}) / "train.jsonl"
        data = ClassificationDataModule(hf_dataset="json", hf_data_files={"train": str(path)})
        data.load_examples()

    return run


def ner_data(files: dict[str, str | bytes], **kw: Any) -> Callable[[Env, Path], Any]:
    def run(env: Env, tmp: Path) -> Any:
        data = SequenceLabelingDataModule(data_dir=str(_write(tmp / "d", files)), **kw)
        data.load_examples()

    return run


def train_with(*overrides: str, files: dict[str, str | bytes] | None = None) -> Callable:
    """``train`` with the fast test settings; ``{d}`` in an override is a data folder
    holding ``files``, ``{cls}`` / ``{ner}`` the shared checkpoints."""

    def run(env: Env, tmp: Path) -> Any:
        from nlp_transfer.train import train

        folder = _write(tmp / "d", files or {})
        subs = {"d": folder, "cls": env.cls_ckpt, "ner": env.ner_ckpt}
        ovs = [o.format(**subs) for o in overrides]
        train(compose_config("train", [*FAST, *ovs], tmp / "run", env.root / "cache"))

    return run


def predict_with(
    ckpt: str, name: str, content: str | bytes, *overrides: str, stdin: bytes | None = None
) -> Callable:
    """``predict`` on an input file ``name`` (``-``: stdin with ``stdin`` bytes)."""

    def run(env: Env, tmp: Path) -> Any:
        from nlp_transfer.predict import predict

        source = "-" if name == "-" else str(_write(tmp / "in", {name: content}) / name)
        path = env.cls_ckpt if ckpt == "cls" else env.ner_ckpt
        cfg = compose_config(
            "predict", [f"ckpt_path={path}", f"input={source}", *overrides], tmp / "out"
        )
        if stdin is None:
            return predict(cfg)
        with mock.patch.object(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin))):
            return predict(cfg)

    return run


def eval_with(ckpt: str, files: dict[str, str | bytes], *overrides: str) -> Callable:
    def run(env: Env, tmp: Path) -> Any:
        from nlp_transfer.eval import evaluate

        folder = _write(tmp / "d", files)
        path = env.cls_ckpt if ckpt == "cls" else env.ner_ckpt
        ovs = [o.format(d=folder) for o in overrides]
        cfg = compose_config(
            "eval",
            [f"ckpt_path={path}", "trainer=cpu", "extras.print_config=false", *ovs],
            tmp / "out",
        )
        return evaluate(cfg)

    return run


def checkpoint_file(make: Callable[[Env, Path], Path], *, via: str = "predict") -> Callable:
    """Load a broken checkpoint ``make(env, tmp)`` through ``predict`` or ``eval``."""

    def run(env: Env, tmp: Path) -> Any:
        path = make(env, tmp)
        if via == "eval":
            from nlp_transfer.eval import evaluate

            return evaluate(compose_config("eval", [f"ckpt_path={path}"], tmp / "out"))
        from nlp_transfer.predict import predict

        _write(tmp / "in", {"in.txt": "fine\n"})
        cfg = compose_config(
            "predict", [f"ckpt_path={path}", f"input={tmp / 'in' / 'in.txt'}"], tmp / "out"
        )
        return predict(cfg)

    return run


def _bytes_file(data: bytes) -> Callable[[Env, Path], Path]:
    def make(env: Env, tmp: Path) -> Path:
        (tmp / "bad.ckpt").write_bytes(data)
        return tmp / "bad.ckpt"

    return make


def _truncated(env: Env, tmp: Path) -> Path:
    data = env.cls_ckpt.read_bytes()
    (tmp / "cut.ckpt").write_bytes(data[: len(data) // 2])
    return tmp / "cut.ckpt"


def _not_ours(env: Env, tmp: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp / "other.ckpt")
    return tmp / "other.ckpt"


def _wrong_weights(env: Env, tmp: Path) -> Path:
    ckpt = torch.load(env.cls_ckpt, map_location="cpu", weights_only=True)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if "head" not in k}
    torch.save(ckpt, tmp / "nohead.ckpt")
    return tmp / "nohead.ckpt"


def _folder(env: Env, tmp: Path) -> Path:
    (tmp / "a_dir.ckpt").mkdir()
    return tmp / "a_dir.ckpt"


# -- the corpus ---------------------------------------------------------------------------------
F = r"train\.jsonl"
CASES: list[Case] = [
    # classification files: labels and texts are never reinterpreted
    Case(
        "label_int_then_float",
        "data",
        cls_data({"train.jsonl": jsonl({"text": "a", "label": 1}, {"text": "b", "label": 1.0})}),
        DataError,
        rf"{F}:2: label 1\.0 .*float such as 1\.0 is refused",
    ),
    Case(
        "label_float",
        "data",
        cls_data({"train.jsonl": jsonl({"text": "a", "label": 0.5})}),
        DataError,
        rf"{F}:1: label 0\.5",
    ),
    Case(
        "label_list",
        "data",
        cls_data({"train.jsonl": jsonl({"text": "a", "label": [1]})}),
        DataError,
        rf"{F}:1: label \[1\].*\(list\)",
    ),
    Case(
        "label_dict",
        "data",
        cls_data({"train.jsonl": jsonl({"text": "a", "label": {"y": 1}})}),
        DataError,
        rf"{F}:1: label \{{'y': 1\}}.*\(object\)",
    ),
    Case(
        "label_bool",
        "data",
        cls_data({"train.jsonl": jsonl({"text": "a", "label": True})}),
        DataError,
        rf"{F}:1: label True.*\(boolean\)",
    ),
    Case(
        "label_string_then_int",
        "data",
        cls_data({"train.jsonl": jsonl({"text": "a", "label": "1"}, {"text": "b", "label": 1})}),
        DataError,
        rf"{F}:2: label 1 \(integer\) is not of the type of the label on line 1",
    ),
    Case(
        "label_empty_string",
        "data",
        cls_data({"train.jsonl": jsonl({"text": "a", "label": " "}, *GOOD_ROWS)}),
        DataError,
        rf"{F}:1: empty label in field 'label'",
    ),
    Case(
        "label_null",
        "data",
        cls_data({"train.jsonl": jsonl(*GOOD_ROWS, {"text": "a", "label": None})}),
        DataError,
        rf"{F}:5: missing field\(s\) \['label'\]",
    ),
    Case(
        "text_number",
        "data",
        cls_data({"train.jsonl": jsonl({"text": 5, "label": "x"})}),
        DataError,
        rf"{F}:1: field 'text' is not a string \(integer 5\)",
    ),
    Case(
        "text_list",
        "data",
        cls_data({"train.jsonl": jsonl(*GOOD_ROWS, {"text": ["a"], "label": "x"})}),
        DataError,
        rf"{F}:5: field 'text' is not a string \(list",
    ),
    Case(
        "text_object",
        "data",
        cls_data({"train.jsonl": jsonl({"text": {"t": "a"}, "label": "x"})}),
        DataError,
        rf"{F}:1: field 'text' is not a string \(object",
    ),
    Case(
        "text_pair_number",
        "data",
        cls_data({"train.jsonl": jsonl({"text": "a", "b": 2, "label": "x"})}, text_pair_field="b"),
        DataError,
        rf"{F}:1: field 'b' is not a string",
    ),
    Case(
        "text_empty",
        "data",
        cls_data({"train.jsonl": jsonl(*GOOD_ROWS, {"text": "  ", "label": "pos"})}),
        DataError,
        rf"{F}:5: empty text in field 'text'",
    ),
    Case(
        "jsonl_line_is_list",
        "data",
        cls_data({"train.jsonl": GOOD_JSONL + '["a", "pos"]\n'}),
        DataError,
        rf"{F}:5: expected a JSON object, got list",
    ),
    Case(
        "jsonl_line_is_string",
        "data",
        cls_data({"train.jsonl": '"just text"\n'}),
        DataError,
        rf"{F}:1: expected a JSON object, got string",
    ),
    Case(
        "jsonl_invalid",
        "data",
        cls_data({"train.jsonl": GOOD_JSONL + '{"text": "a",\n'}),
        DataError,
        rf"{F}:5: invalid JSON",
    ),
    Case(
        "jsonl_missing_label_field",
        "data",
        cls_data({"train.jsonl": jsonl({"text": "a", "class": "x"})}),
        DataError,
        rf"{F}:1: missing field\(s\) \['label'\].*data\.label_field",
    ),
    Case(
        "hf_json_float_label",
        "data",
        hf_json([{"text": "a", "label": 0.5}, {"text": "b", "label": 1.5}]),
        DataError,
        r"json\[train\] row 0: label 0\.5 \(float\) is not a string or an integer",
    ),
    Case(
        "hf_json_text_number",
        "data",
        hf_json([{"text": 7, "label": "x"}, {"text": 8, "label": "y"}]),
        DataError,
        r"json\[train\] row 0: field 'text' is int, not a string",
    ),
    # encodings: the file, the line and the option to set
    Case(
        "jsonl_latin1",
        "data",
        cls_data({"train.jsonl": GOOD_JSONL.encode() + b'{"text": "' + LATIN1 + b'"}\n'}),
        DataError,
        rf"{F}:5: not valid utf-8-sig .*data\.encoding",
    ),
    Case(
        "csv_latin1",
        "data",
        cls_data({"train.csv": b"text,label\ngood,pos\n" + LATIN1 + b",neg\n"}),
        DataError,
        r"train\.csv:3: not valid utf-8-sig .*data\.encoding",
    ),
    Case(
        "tsv_latin1",
        "data",
        cls_data({"train.tsv": b"text\tlabel\n" + LATIN1 + b"\tpos\n"}),
        DataError,
        r"train\.tsv:2: not valid utf-8-sig .*data\.encoding",
    ),
    Case(
        "validation_latin1",
        "data",
        cls_data({"train.jsonl": GOOD_JSONL, "validation.jsonl": b"\n\n" + LATIN1}),
        DataError,
        r"validation\.jsonl:3: not valid utf-8-sig",
    ),
    Case(
        "unknown_encoding_name",
        "data",
        cls_data({"train.jsonl": GOOD_JSONL}, encoding="utf9"),
        DataError,
        r"data\.encoding='utf9' is not a known text encoding",
    ),
    # CSV / TSV structure
    Case(
        "csv_too_many_cells",
        "data",
        cls_data({"train.csv": "text,label\na,pos\nb,neg,x\n"}),
        DataError,
        r"train\.csv:3: 3 cells but the header has 2",
    ),
    Case(
        "csv_too_few_cells",
        "data",
        cls_data({"train.csv": "text,label\na,pos\nb\n"}),
        DataError,
        r"train\.csv:3: 1 cells but the header has 2 columns \(missing \['label'\]",
    ),
    Case(
        "csv_unclosed_quote",
        "data",
        cls_data({"train.csv": 'text,label\n"a, unclosed,pos\nb,neg\nc,pos\n'}),
        DataError,
        r"train\.csv:\d+: 1 cells but the header has 2",
    ),
    Case(
        "csv_header_lacks_column",
        "data",
        cls_data({"train.csv": "sentence,label\na,pos\n"}),
        DataError,
        r"train\.csv:1: header \['sentence', 'label'\] lacks column\(s\) \['text'\]",
    ),
    Case(
        "tsv_quote_is_a_character",
        "data",
        cls_data({"train.tsv": 'text\tlabel\n"a\tpos\tx\nb"\tneg\n'}),
        DataError,
        r"train\.tsv:2: 3 cells but the header has 2",
    ),
    Case(
        "tsv_empty_label",
        "data",
        cls_data({"train.tsv": "text\tlabel\na\tpos\nb\t\n"}),
        DataError,
        r"train\.tsv:3: empty label",
    ),
    # splits and labels
    Case(
        "single_class_train",
        "data",
        cls_data({"train.jsonl": jsonl(*[{"text": f"t{i}", "label": "pos"} for i in range(5)])}),
        DataError,
        rf"{F}: the training data has 1 label\(s\) \['pos'\]",
    ),
    Case(
        "single_class_csv",
        "data",
        cls_data({"train.csv": "text,label\na,1\nb,1\nc,1\n"}),
        DataError,
        r"train\.csv: the training data has 1 label",
    ),
    Case(
        "unknown_label_in_test",
        "data",
        cls_data({"train.jsonl": GOOD_JSONL, "test.jsonl": jsonl({"text": "m", "label": "meh"})}),
        DataError,
        r"test\.jsonl:1: label 'meh' does not occur in the training data",
    ),
    Case(
        "empty_test_split",
        "data",
        cls_data({"train.jsonl": GOOD_JSONL, "test.jsonl": "\n"}),
        DataError,
        r"test\.jsonl: no examples",
    ),
    Case(
        "two_train_files",
        "data",
        cls_data({"train.jsonl": GOOD_JSONL, "train.csv": "x\n"}),
        DataError,
        r"several files for split 'train'.*data\.train_file",
    ),
    Case(
        "no_train_file",
        "data",
        cls_data({"test.jsonl": GOOD_JSONL}),
        DataError,
        r"/d: no train file",
    ),
    Case(
        "one_example_no_validation",
        "data",
        cls_data({"train.jsonl": jsonl({"text": "a", "label": "x"})}),
        DataError,
        rf"{F}: 1 example\(s\) cannot be split",
    ),
    Case(
        "val_fraction_out_of_range",
        "data",
        cls_data({}, val_fraction=1.5),
        ConfigError,
        r"data\.val_fraction must be in \(0, 1\)",
    ),
    Case(
        "megabatch_mult_zero",
        "data",
        cls_data({}, megabatch_mult=0),
        ConfigError,
        r"data\.megabatch_mult must be a whole number >= 1",
    ),
    # CoNLL files
    Case(
        "conll_wrong_column_count",
        "data",
        ner_data({"train.conll": "a B-PER\nb c O\n"}),
        DataError,
        r"train\.conll:2: expected 2 columns",
    ),
    Case(
        "conll_latin1",
        "data",
        ner_data({"train.conll": b"a O\n" + LATIN1 + b" B-PER\n"}),
        DataError,
        r"train\.conll:2: not valid utf-8-sig .*data\.encoding",
    ),
    Case(
        "conll_comment_without_prefix",
        "data",
        ner_data({"train.conll": "# sent_id = 1\n" + GOOD_CONLL}, comment_prefix=None),
        DataError,
        r"train\.conll:2: expected 4 columns.*data\.comment_prefix",
    ),
    Case(
        "conll_empty_file",
        "data",
        ner_data({"train.conll": "\n\n"}),
        DataError,
        r"train\.conll: no sentences found",
    ),
    Case(
        "conll_only_comments",
        "data",
        ner_data({"train.conll": "# a b c\n# d e f\n"}),
        DataError,
        r"train\.conll: no sentences found",
    ),
    Case(
        "conll_tag_column_missing",
        "data",
        ner_data({"train.conll": GOOD_CONLL}, tag_column=3),
        DataError,
        r"train\.conll:1: column 3 does not exist",
    ),
    Case(
        "conll_invalid_tag",
        "data",
        ner_data({"train.conll": "a X-PER\nb O\n"}),
        DataError,
        r"train\.conll:1: .*'X-PER' is not valid in IOB2",
    ),
    Case(
        "conll_ill_placed_tag_rejected",
        "data",
        ner_data({"train.conll": GOOD_CONLL + "\nx O\ny I-ORG\n"}, invalid_tags="reject"),
        DataError,
        r"train\.conll:11: 'I-ORG' cannot follow 'O'",
    ),
    Case(
        "conll_single_class",
        "data",
        ner_data({"train.conll": "a O\nb O\n\nc O\n"}),
        DataError,
        r"train\.conll: the training data has 1 label\(s\) \['O'\]",
    ),
    Case(
        "conll_unknown_tag_in_test",
        "data",
        ner_data({"train.conll": GOOD_CONLL, "test.conll": "a O\nb B-FOO\n"}),
        DataError,
        r"test\.conll:2: label 'B-FOO' does not occur",
    ),
    Case(
        "conll_unknown_scheme",
        "data",
        ner_data({}, tag_scheme="IOX"),
        ConfigError,
        r"data\.tag_scheme: unknown tag scheme 'IOX'",
    ),
    Case(
        "conll_train_scheme_iob1",
        "data",
        ner_data({}, train_scheme="IOB1"),
        ConfigError,
        r"data\.train_scheme must be IOB2 or BIOES",
    ),
    Case(
        "conll_bad_invalid_tags_policy",
        "data",
        ner_data({}, invalid_tags="fix"),
        ConfigError,
        r"data\.invalid_tags='fix'",
    ),
    # config values, checked when train starts
    Case(
        "lr_zero",
        "config",
        train_with("optimizer.lr=0"),
        ConfigError,
        r"optimizer\.lr must be a number > 0, got 0",
    ),
    Case(
        "lr_negative",
        "config",
        train_with("optimizer.lr=-1e-3"),
        ConfigError,
        r"optimizer\.lr must be a number > 0",
    ),
    Case(
        "lr_not_a_number",
        "config",
        train_with("optimizer.lr=fast"),
        ConfigError,
        r"optimizer\.lr must be a number > 0, got 'fast'",
    ),
    Case(
        "lr_quoted_number",
        "config",
        train_with("optimizer.lr='1e-3'"),
        ConfigError,
        r"optimizer\.lr .*unquoted",
    ),
    Case(
        "lr_nan",
        "config",
        train_with("optimizer.lr=nan"),
        ConfigError,
        r"optimizer\.lr must be a number > 0",
    ),
    Case(
        "head_dropout_one",
        "config",
        train_with("head.dropout=1.0"),
        ConfigError,
        r"head\.dropout must be a number in \[0, 1\)",
    ),
    Case(
        "head_dropout_negative",
        "config",
        train_with("head.dropout=-0.1"),
        ConfigError,
        r"head\.dropout must be a number in \[0, 1\)",
    ),
    Case(
        "head_dropout_string",
        "config",
        train_with("head.dropout=high"),
        ConfigError,
        r"head\.dropout must be a number",
    ),
    Case(
        "lora_dropout_above_one",
        "config",
        train_with("strategy=lora", "strategy.dropout=1.5"),
        ConfigError,
        r"strategy\.dropout must be a number in \[0, 1\)",
    ),
    Case(
        "max_epochs_zero",
        "config",
        train_with("trainer.max_epochs=0"),
        ConfigError,
        r"trainer\.max_epochs must be a whole number >= 1",
    ),
    Case(
        "max_epochs_negative",
        "config",
        train_with("trainer.max_epochs=-3"),
        ConfigError,
        r"trainer\.max_epochs must be a whole number",
    ),
    Case(
        "max_steps_zero",
        "config",
        train_with("+trainer.max_steps=0"),
        ConfigError,
        r"trainer\.max_steps must be a whole number >= 1",
    ),
    Case(
        "max_length_zero",
        "config",
        train_with("data.max_length=0"),
        ConfigError,
        r"data\.max_length must be a whole number >= 1",
    ),
    Case(
        "max_length_negative",
        "config",
        train_with("data=demo_ner", "data.max_length=-8"),
        ConfigError,
        r"data\.max_length must be a whole number >= 1",
    ),
    Case(
        "svm_with_full_finetuning",
        "config",
        train_with("head=svm", "strategy=full"),
        ConfigError,
        r"strategy\._target_=\S+FullFineTuning trains the encoder.*strategy=frozen",
    ),
    Case(
        "logreg_with_top_k",
        "config",
        train_with("strategy=top_k", "head=logreg"),
        ConfigError,
        r"strategy\._target_=\S+TopK trains the encoder",
    ),
    Case(
        "token_head_on_classification",
        "config",
        train_with("head=token_linear"),
        ConfigError,
        r"head\._target_=\S+TokenHead is a sequence_labeling head.*head=linear",
    ),
    Case(
        "crf_on_classification",
        "config",
        train_with("head=crf"),
        ConfigError,
        r"head\._target_=\S+CRFHead is a sequence_labeling head",
    ),
    Case(
        "linear_head_on_ner",
        "config",
        train_with("data=demo_ner", "head=linear"),
        ConfigError,
        r"head\._target_=\S+SequenceClassificationHead .*head=token_linear",
    ),
    Case(
        "mlp_head_on_local_conll",
        "config",
        train_with(
            "data=local_conll", "data.data_dir={d}", "head=mlp", files={"train.conll": GOOD_CONLL}
        ),
        ConfigError,
        r"head\._target_=\S+ is a classification head, but the data is seq",
    ),
    Case(
        "classification_monitor_on_ner",
        "config",
        train_with("data=demo_ner", "monitor=val/acc"),
        ConfigError,
        r"monitor=val/acc is a classification metric.*monitor=val/f1",
    ),
    Case(
        "ner_monitor_on_classification",
        "config",
        train_with("monitor=val/precision"),
        ConfigError,
        r"monitor=val/precision is a sequence_labeling metric",
    ),
    Case(
        "multitask_task_head_mismatch",
        "config",
        train_with("experiment=multitask_demo", "encoder=tiny", "head@tasks.ner.head=linear"),
        ConfigError,
        r"tasks\.ner\.head\._target_=\S+ is a classification head",
    ),
    Case(
        "local_data_single_class",
        "config",
        train_with(
            "data=local_classification",
            "data.data_dir={d}",
            files={"train.csv": "text,label\na,x\nb,x\nc,x\n"},
        ),
        DataError,
        r"train\.csv: the training data has 1 label",
    ),
    Case(
        "local_conll_keeps_hashtags_tag_error",
        "config",
        train_with(
            "data=local_conll",
            "data.data_dir={d}",
            files={"train.conll": GOOD_CONLL + "\n# text = x\n"},
        ),
        DataError,
        r"train\.conll:10: expected 2 columns.*data\.comment_prefix",
    ),
    # predict input
    Case(
        "predict_jsonl_line_is_list",
        "predict",
        predict_with("cls", "in.jsonl", jsonl({"text": "a"}, ["b"])),
        DataError,
        r"in\.jsonl:2: expected a JSON object",
    ),
    Case(
        "predict_jsonl_line_is_string",
        "predict",
        predict_with("cls", "in.jsonl", '"hi"\n'),
        DataError,
        r"in\.jsonl:1: expected a JSON object",
    ),
    Case(
        "predict_jsonl_line_is_number",
        "predict",
        predict_with("ner", "in.jsonl", "\n42\n"),
        DataError,
        r"in\.jsonl:2: expected a JSON object",
    ),
    Case(
        "predict_jsonl_invalid",
        "predict",
        predict_with("cls", "in.jsonl", '{"text": \n'),
        DataError,
        r"in\.jsonl:1: invalid JSON",
    ),
    Case(
        "predict_jsonl_missing_field",
        "predict",
        predict_with("cls", "in.jsonl", jsonl({"sentence": "a"})),
        DataError,
        r"in\.jsonl:1: no field 'text' \(text_field=\)",
    ),
    Case(
        "predict_jsonl_text_not_string",
        "predict",
        predict_with("cls", "in.jsonl", jsonl({"text": 3})),
        DataError,
        r"in\.jsonl:1: field 'text' is int, not a string",
    ),
    Case(
        "predict_empty_stdin",
        "predict",
        predict_with("cls", "-", "", stdin=b""),
        DataError,
        r"stdin \(input=-\): no input texts",
    ),
    Case(
        "predict_blank_stdin",
        "predict",
        predict_with("ner", "-", "", stdin=b"\n  \n"),
        DataError,
        r"stdin \(input=-\): no input texts",
    ),
    Case(
        "predict_latin1_stdin",
        "predict",
        predict_with("cls", "-", "", stdin=b"ok\n" + LATIN1),
        DataError,
        r"stdin \(input=-\):2: not valid utf-8-sig .*set encoding=",
    ),
    Case(
        "predict_latin1_file",
        "predict",
        predict_with("cls", "in.txt", b"a\n\n" + LATIN1),
        DataError,
        r"in\.txt:3: not valid utf-8-sig .*set encoding=",
    ),
    Case(
        "predict_unknown_encoding",
        "predict",
        predict_with("cls", "in.txt", "a\n", "encoding=klingon"),
        DataError,
        r"encoding='klingon' is not a known text encoding",
    ),
    Case(
        "predict_empty_file",
        "predict",
        predict_with("cls", "in.txt", "\n\n"),
        DataError,
        r"in\.txt: no input texts",
    ),
    Case(
        "predict_conll_for_classifier",
        "predict",
        predict_with("cls", "in.conll", "a O\n"),
        DataError,
        r"in\.conll: a CoNLL token file .*classification checkpoint",
    ),
    Case(
        "predict_conll_wrong_columns",
        "predict",
        predict_with("ner", "in.conll", "John B-PER\nruns O x\n"),
        DataError,
        r"in\.conll:2: expected 2 columns",
    ),
    Case(
        "predict_conll_latin1",
        "predict",
        predict_with("ner", "in.conll", LATIN1 + b" O\n"),
        DataError,
        r"in\.conll:1: not valid utf-8-sig .*set encoding=",
    ),
    # eval data
    Case(
        "eval_classifier_on_conll_dir",
        "eval",
        eval_with("cls", {"test.conll": GOOD_CONLL}, "data_dir={d}"),
        ConfigError,
        r"data_dir=\S+/d: \['test\.conll'\] holds data of another task.*classif",
    ),
    Case(
        "eval_ner_on_jsonl_dir",
        "eval",
        eval_with("ner", {"test.jsonl": GOOD_JSONL}, "data_dir={d}"),
        ConfigError,
        r"data_dir=\S+: \['test\.jsonl'\] holds data of another task",
    ),
    Case(
        "eval_classifier_conll_file",
        "eval",
        eval_with("cls", {"x.conll": GOOD_CONLL}, "+data_overrides.test_file={d}/x.conll"),
        ConfigError,
        r"data_overrides\.test_file: \S+x\.conll holds data of another task",
    ),
    Case(
        "eval_unknown_split",
        "eval",
        eval_with("cls", {}, "split=dev"),
        ConfigError,
        r"split='dev' is not valid",
    ),
    Case(
        "eval_missing_split",
        "eval",
        eval_with("cls", {"train.jsonl": DEMO_JSONL}, "data_dir={d}", "split=test"),
        DataError,
        r"no 'test' split: add test\.\* to data\.data_dir",
    ),
    Case(
        "eval_label_not_in_checkpoint",
        "eval",
        eval_with("cls", {"test.jsonl": jsonl({"text": "a", "label": "meh"})}, "data_dir={d}"),
        DataError,
        r"test\.jsonl:1: label 'meh' does not occur",
    ),
    Case(
        "eval_latin1_test_file",
        "eval",
        eval_with("cls", {"test.csv": b"text,label\n" + LATIN1 + b",pos\n"}, "data_dir={d}"),
        DataError,
        r"test\.csv:2: not valid utf-8-sig",
    ),
    Case(
        "eval_ner_float_label_file",
        "eval",
        eval_with("cls", {"test.jsonl": jsonl({"text": "a", "label": 1.0})}, "data_dir={d}"),
        DataError,
        r"test\.jsonl:1: label 1\.0",
    ),
    # checkpoints: task mismatch and corrupt files
    Case(
        "train_from_classifier_on_ner",
        "checkpoint",
        train_with("data=demo_ner", "ckpt_path={cls}"),
        CheckpointError,
        r"cls\.ckpt: checkpoint was trained for task 'classification'",
    ),
    Case(
        "train_from_checkpoint_other_labels",
        "checkpoint",
        train_with(
            "data=local_classification",
            "data.data_dir={d}",
            "ckpt_path={cls}",
            files={"train.jsonl": jsonl(*[{"text": "t", "label": x} for x in "abab"])},
        ),
        CheckpointError,
        r"cls\.ckpt: the checkpoint's label set",
    ),
    Case(
        "checkpoint_random_bytes",
        "checkpoint",
        checkpoint_file(_bytes_file(b"\x00garbage" * 9)),
        CheckpointError,
        r"bad\.ckpt: cannot be read as a checkpoint",
    ),
    Case(
        "checkpoint_empty_file",
        "checkpoint",
        checkpoint_file(_bytes_file(b""), via="eval"),
        CheckpointError,
        r"bad\.ckpt: cannot be read as a checkpoint",
    ),
    Case(
        "checkpoint_truncated",
        "checkpoint",
        checkpoint_file(_truncated),
        CheckpointError,
        r"cut\.ckpt: cannot be read as a checkpoint",
    ),
    Case(
        "checkpoint_not_ours",
        "checkpoint",
        checkpoint_file(_not_ours, via="eval"),
        CheckpointError,
        r"other\.ckpt: not an nlp_transfer checkpoint",
    ),
    Case(
        "checkpoint_is_a_folder",
        "checkpoint",
        checkpoint_file(_folder),
        CheckpointError,
        r"a_dir\.ckpt: checkpoint not found \(ckpt_path\)",
    ),
    Case(
        "checkpoint_weights_missing",
        "checkpoint",
        checkpoint_file(_wrong_weights),
        CheckpointError,
        r"nohead\.ckpt: weights do not fit the rebuilt model",
    ),
    Case(
        "checkpoint_missing",
        "checkpoint",
        checkpoint_file(lambda env, tmp: tmp / "gone.ckpt", via="eval"),
        CheckpointError,
        r"gone\.ckpt: checkpoint not found \(ckpt_path\)",
    ),
]

RESULTS: dict[str, str] = {}  # case name -> "clear" | "silent" | "unclear: ..."


def _build_checkpoint(root: Path, path: Path, overrides: list[str]) -> Path:
    """A checkpoint as training writes it, from an untrained module (fast)."""
    cfg = compose_config("train", [*FAST, *overrides], root / "build", root / "cache")
    encoder = build_encoder(cfg)
    datamodule = build_datamodule(cfg, encoder)
    module = build_module(cfg, encoder, datamodule.labels, datamodule.task)
    ckpt: dict[str, Any] = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("corpus")
    return Env(
        root=root,
        cls_ckpt=_build_checkpoint(root, root / "cls.ckpt", []),
        ner_ckpt=_build_checkpoint(root, root / "ner.ckpt", ["data=demo_ner"]),
    )


def _outcome(case: Case, env: Env, tmp: Path) -> str:
    try:
        case.run(env, tmp)
    except case.error as err:
        import re

        if re.search(case.pattern, str(err), flags=re.S):
            return "clear"
        return f"unclear: message {str(err)[:300]!r} does not match {case.pattern!r}"
    except BaseException as err:
        return f"unclear: {type(err).__name__}: {str(err)[:300]}"
    return "silent: ran without an error"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_case(case: Case, env: Env, tmp_path: Path) -> None:
    RESULTS[case.name] = _outcome(case, env, tmp_path)
    assert RESULTS[case.name] == "clear", f"{case.area}/{case.name}: {RESULTS[case.name]}"


def test_corpus_report(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every case gives a clear error; runs the cases the parametrized test did not."""
    names = [c.name for c in CASES]
    assert len(set(names)) == len(names), "case names must be unique"
    for i, case in enumerate(CASES):
        if case.name not in RESULTS:
            RESULTS[case.name] = _outcome(case, env, tmp_path / f"case{i}")
    clear = [n for n in names if RESULTS[n] == "clear"]
    by_area: dict[str, list[int]] = {}
    for case in CASES:
        by_area.setdefault(case.area, [0, 0])[0] += RESULTS[case.name] == "clear"
        by_area[case.area][1] += 1
    with capsys.disabled():
        areas = ", ".join(f"{a} {ok}/{n}" for a, (ok, n) in by_area.items())
        print(
            f"\nbad-input corpus: {len(clear)}/{len(CASES)} cases with a clear error "
            f"({len(clear) / len(CASES):.0%}); {areas}"
        )
    failing = {n: RESULTS[n] for n in names if RESULTS[n] != "clear"}
    assert not failing, f"cases without a clear error: {failing}"
    assert len(CASES) >= 60
