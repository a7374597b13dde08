"""Inputs that must be read as written: nothing reinterpreted, dropped or mis-scored
(issue 17: TSV quoting, BOMs, label types, CoNLL comments, task-driven defaults, eval and
predict with the checkpoint's reader settings). The errors are in test_bad_input_corpus.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from nlp_transfer.data.classification import ClassificationDataModule
from nlp_transfer.data.readers import read_classification_file
from nlp_transfer.data.sequence_labeling import SequenceLabelingDataModule
from nlp_transfer.errors import DataError
from tests.conftest import compose_config
from tests.test_bad_input_corpus import DEMO_JSONL, _build_checkpoint


def test_tsv_quotes_are_characters(tmp_path: Path) -> None:
    """A field starting with '"' does not swallow the following rows (csv.QUOTE_NONE)."""
    path = tmp_path / "train.tsv"
    path.write_text('text\tlabel\n"quoted start\tpos\nplain\tneg\nend"\tpos\n', encoding="utf-8")
    examples = read_classification_file(path)
    assert [e.text for e in examples] == ['"quoted start', "plain", 'end"']
    assert [e.source for e in examples] == [f"{path}:2", f"{path}:3", f"{path}:4"]


def test_csv_keeps_standard_quoting(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text('text,label\n"a, b",pos\n"say ""hi""",neg\n', encoding="utf-8")
    assert [e.text for e in read_classification_file(path)] == ["a, b", 'say "hi"']


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_byte_order_mark_is_not_part_of_the_header(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"train{suffix}"
    body = {
        ".csv": "text,label\nhello,pos\n",
        ".tsv": "text\tlabel\nhello\tpos\n",
        ".jsonl": '{"text": "hello", "label": "pos"}\n',
    }[suffix]
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    (example,) = read_classification_file(path)
    assert (example.text, example.label) == ("hello", "pos")


def test_encoding_option_reads_latin1(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_bytes("text,label\ncafé,pos\n".encode("latin-1"))
    assert read_classification_file(path, encoding="latin-1")[0].text == "café"


def test_integer_labels_are_one_class_per_value(tmp_path: Path) -> None:
    """Integer labels are their decimal strings: ``1`` in JSONL and ``1`` in CSV are one class."""
    d = tmp_path / "d"
    d.mkdir()
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(6)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "test.csv").write_text("text,label\nx,1\ny,0\n")
    data = ClassificationDataModule(data_dir=str(d))
    data.load_examples()
    assert data.labels == ["0", "1"]
    assert [e.label for e in data.examples["test"]] == ["1", "0"]


def test_local_conll_keeps_every_token_line(tmp_path: Path) -> None:
    """data=local_conll: a sentence-initial #hashtag is a token (comment_prefix: null)."""
    d = tmp_path / "tweets"
    d.mkdir()
    (d / "train.conll").write_text("#NYC B-LOC\nrocks O\n\n#win O\nAnna B-PER\n")
    (d / "validation.conll").write_text("Bob B-PER\nin O\nNYC B-LOC\n")
    cfg = compose_config("train", ["data=local_conll", f"data.data_dir={d}"], tmp_path / "run")
    assert cfg.data.comment_prefix is None
    data = instantiate(cfg.data, tokenizer=None)
    assert isinstance(data, SequenceLabelingDataModule)
    data.load_examples()
    assert [s.tokens for s in data.examples["train"]] == [["#NYC", "rocks"], ["#win", "Anna"]]


@pytest.mark.parametrize(
    ("overrides", "head", "monitor"),
    [
        (["data=demo_ner"], "nlp_transfer.heads.token.TokenHead", "val/f1"),
        (["data=local_conll"], "nlp_transfer.heads.token.TokenHead", "val/f1"),
        (["data=conll2003"], "nlp_transfer.heads.token.TokenHead", "val/f1"),
        (["data=hf_token_classification"], "nlp_transfer.heads.token.TokenHead", "val/f1"),
        (["data=demo_ner", "head=crf"], "nlp_transfer.heads.crf.CRFHead", "val/f1"),
        (["data=demo_ner", "monitor=val/loss"], "nlp_transfer.heads.token.TokenHead", "val/loss"),
        (["experiment=conll2003"], "nlp_transfer.heads.token.TokenHead", "val/f1"),
        (
            ["data=demo_classification"],
            "nlp_transfer.heads.classification.SequenceClassificationHead",
            "val/f1_macro",
        ),
        (
            ["experiment=sst2"],
            "nlp_transfer.heads.classification.SequenceClassificationHead",
            "val/acc",
        ),
    ],
)
def test_the_data_task_selects_head_and_monitor(
    tmp_path: Path, overrides: list[str], head: str, monitor: str
) -> None:
    from nlp_transfer.validation import validate_train_config

    cfg = compose_config("train", overrides, tmp_path / "run")
    assert (cfg.head._target_, cfg.monitor) == (head, monitor)
    assert cfg.callbacks.model_checkpoint.monitor == monitor
    validate_train_config(cfg)


def test_sklearn_heads_select_the_frozen_strategy(tmp_path: Path) -> None:
    cfg = compose_config("train", ["head=svm"], tmp_path / "run")
    assert cfg.strategy._target_.endswith("FrozenEncoder")
    assert HydraConfig.get().runtime.choices.strategy == "frozen"
    probe = compose_config("probe", ["data=demo_ner"], tmp_path / "probe")
    assert probe.head.kind == "sklearn"  # the data's task does not replace the probe's head


def test_ner_data_without_head_builds_token_head_and_f1_checkpoints(make_cfg) -> None:
    """``python -m nlp_transfer.train data=demo_ner encoder=tiny``: the module gets a token
    head and the best checkpoint is chosen by val/f1 (built, not trained: fast)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from nlp_transfer.builders import build_callbacks, build_encoder, build_module

    cfg = make_cfg("data=demo_ner")
    module = build_module(cfg, build_encoder(cfg), ["B-PER", "I-PER", "O"], "sequence_labeling")
    assert type(module.head).__name__ == "TokenHead"
    monitors = [c.monitor for c in build_callbacks(cfg) if isinstance(c, ModelCheckpoint)]
    assert "val/f1" in monitors and not {m for m in monitors if m} - {"val/f1"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "cls": _build_checkpoint(root, root / "cls.ckpt", []),
        "ner": _build_checkpoint(root, root / "ner.ckpt", ["data=demo_ner"]),
    }


def test_eval_on_a_folder_with_only_a_test_file(checkpoints, tmp_path: Path) -> None:
    from nlp_transfer.eval import evaluate

    d = tmp_path / "only_test"
    d.mkdir()
    (d / "test.jsonl").write_text(DEMO_JSONL, encoding="utf-8")
    cfg = compose_config(
        "eval",
        [
            f"ckpt_path={checkpoints['cls']}",
            f"data_dir={d}",
            "trainer=cpu",
            "trainer.enable_progress_bar=false",
            "extras.print_config=false",
        ],
        tmp_path / "out",
    )
    metrics, _ = evaluate(cfg)
    assert metrics["examples"] == 2 and metrics["split"] == "test" and "test/acc" in metrics


def test_predict_reads_conll_with_the_checkpoints_settings(checkpoints, tmp_path: Path) -> None:
    """The checkpoint's separator and comment settings, not hard-coded ones: every gold token
    gets exactly one prediction."""
    import torch

    from nlp_transfer.predict import predict

    ckpt = torch.load(checkpoints["ner"], map_location="cpu", weights_only=True)
    ckpt["nlp_transfer"]["config"]["data"].update(separator="\t", comment_prefix=None)
    path = tmp_path / "tab.ckpt"
    torch.save(ckpt, path)
    gold = tmp_path / "gold.conll"
    gold.write_text("#hashtag\tO\nNew York\tB-LOC\n\nAnna\tB-PER\n", encoding="utf-8")
    cfg = compose_config("predict", [f"ckpt_path={path}", f"input={gold}"], tmp_path / "out")
    rows = [json.loads(x) for x in predict(cfg).read_text().splitlines()]
    assert [r["tokens"] for r in rows] == [["#hashtag", "New York"], ["Anna"]]
    assert [len(r["tags"]) for r in rows] == [2, 1]


@pytest.fixture
def restore_formats():
    from nlp_transfer.data import readers

    before = dict(readers.FORMATS)
    yield
    readers.FORMATS.clear()
    readers.FORMATS.update(before)


def test_a_new_format_is_one_registered_reader(tmp_path: Path, restore_formats: None) -> None:
    """Registering a row reader is all a format needs: the reader, the field checks and the
    datamodule's split-file search pick it up (fastText-style ``__label__x text`` lines)."""
    from nlp_transfer.data import readers

    @readers.register_format(".ft")
    def read_fasttext_rows(path: Path, text: str, fields: list[str]) -> list[tuple[int, dict]]:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            label, _, rest = line.partition(" ")
            rows.append((n, {"label": label.removeprefix("__label__"), "text": rest}))
        return rows

    d = tmp_path / "d"
    d.mkdir()
    (d / "train.ft").write_text("__label__pos a fine film\n__label__neg dull\n__label__pos ok\n")
    data = ClassificationDataModule(data_dir=str(d))
    data.load_examples()
    assert data.labels == ["neg", "pos"]
    sources = {e.source for split in data.examples.values() for e in split}
    assert sources <= {f"{d / 'train.ft'}:{n}" for n in (1, 2, 3)}
    (d / "bad.ft").write_text("__label__pos \n")
    with pytest.raises(DataError, match=r"bad.ft:1: empty text"):
        read_classification_file(d / "bad.ft")
