"""Domain-adaptive MLM pretraining: a tiny BERT saved in code pretrains a few steps, writes an
encoder folder, and that folder fine-tunes through encoder=hf; MiniLM on SST-2 is slow."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from transformers import AutoTokenizer, BertConfig, BertModel

from nlp_transfer.encoders.transformer import packaged_minilm_dir
from nlp_transfer.errors import ConfigError
from nlp_transfer.pretrain import pretrain
from nlp_transfer.train import train

QUICK = [
    "trainer=cpu",
    "trainer.max_epochs=1",
    "+trainer.max_steps=6",
    "trainer.enable_progress_bar=false",
    "extras.print_config=false",
    "callbacks.model_summary=null",
    "batch_size=16",
    "optimizer.lr=1e-3",
    "data.max_eval_examples=32",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BertModel (no MLM head) with MiniLM's tokenizer, saved as a folder."""
    out = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(packaged_minilm_dir())
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_pretrain_writes_an_encoder_that_fine_tunes(
    tiny_bert: Path, make_cfg, tmp_path: Path, caplog
) -> None:
    cfg = make_cfg("encoder=hf", f"encoder.name_or_path={tiny_bert}", *QUICK, name="pretrain")
    with caplog.at_level(logging.WARNING, logger="nlp_transfer.pretrain"):
        metrics = pretrain(cfg)
    assert any("ships no MLM head" in r.message for r in caplog.records)
    assert metrics["mlm_head_initialised"] is True
    assert metrics["global_steps"] == 6
    assert metrics["train_texts"] == 400 and metrics["held_out_texts"] == 32  # demo splits
    assert metrics["mlm/loss_after"] < metrics["mlm/loss_before"]  # a random init learns fast
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["mlm/loss_after"] == metrics["mlm/loss_after"]
    encoder_dir = Path(metrics["encoder_dir"])
    assert (encoder_dir / "model.safetensors").is_file() and (
        encoder_dir / "tokenizer.json"
    ).is_file()
    assert json.loads((encoder_dir / "config.json").read_text())["architectures"] == [
        "BertForMaskedLM"
    ]
    # stage two: fine-tune from the written folder
    result, objects = train(
        make_cfg(
            "encoder=hf",
            f"encoder.name_or_path={encoder_dir}",
            "test=false",
            "+trainer.limit_train_batches=2",
            "data.max_eval_examples=32",
            run="finetune",
        )
    )
    encoder = objects["module"].encoder
    assert encoder.name_or_path == str(encoder_dir) and encoder.hidden_size == 32
    assert 0.0 <= result["val/f1_macro"] <= 1.0


def test_pretrain_from_a_text_file_with_whole_word_masking(
    tiny_bert: Path, make_cfg, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"unbelievably wonderful sentence number {i}" for i in range(40)))
    cfg = make_cfg(
        "encoder=hf",
        f"encoder.name_or_path={tiny_bert}",
        *QUICK,
        f"text_file={corpus}",
        "held_out_fraction=0.25",
        "whole_word_mask=true",
        "trainer.max_steps=2",
        f"encoder_dir={tmp_path / 'enc'}",
        name="pretrain",
    )
    metrics = pretrain(cfg)
    assert metrics["train_texts"] == 30 and metrics["held_out_texts"] == 10
    assert (tmp_path / "enc" / "model.safetensors").is_file()


def test_pretrain_refuses_random_init_and_existing_output(
    tiny_bert: Path, make_cfg, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="encoder.random_init"):
        pretrain(make_cfg("encoder=tiny", *QUICK, name="pretrain", run="r1"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    from nlp_transfer.utils.io import OutputExistsError

    with pytest.raises(OutputExistsError):
        pretrain(
            make_cfg(
                "encoder=hf",
                f"encoder.name_or_path={tiny_bert}",
                *QUICK,
                f"encoder_dir={tmp_path / 'taken'}",
                name="pretrain",
                run="r2",
            )
        )
    assert (tmp_path / "taken" / "x").read_text() == "keep"


@pytest.mark.slow
def test_minilm_mlm_on_an_sst2_slice_lowers_held_out_loss(shared_data: Path, make_cfg) -> None:
    """Published MiniLM (no MLM head shipped) continues MLM on 500 SST-2 sentences for 30
    steps; the held-out text is 200 validation sentences."""
    cfg = make_cfg(
        "data=sst2",
        f"data.data_dir={shared_data / 'sst2'}",
        "data.max_train_examples=500",
        "data.max_eval_examples=200",
        "trainer=cpu",
        "trainer.max_epochs=5",
        "+trainer.max_steps=30",
        "trainer.enable_progress_bar=false",
        "extras.print_config=false",
        "callbacks.model_summary=null",
        "optimizer.lr=1e-4",
        name="pretrain",
    )
    metrics = pretrain(cfg)
    assert metrics["mlm_head_initialised"] is True
    assert metrics["train_texts"] == 500 and metrics["held_out_texts"] == 200
    assert metrics["mlm/loss_after"] < metrics["mlm/loss_before"]


def test_whole_word_masking_masks_every_subtoken_of_a_word(tiny_bert: Path) -> None:
    from nlp_transfer.pretrain import MaskedTextDataModule

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    texts = ["unbelievably incomprehensible antidisestablishmentarianism " * 4] * 8
    data = MaskedTextDataModule(tok, texts, texts[:2], 64, 8, 8, 0.5, True, False, 50, 0)
    data.setup()
    batch = data.collate(data.features["train"])
    enc = tok(texts, truncation=True, max_length=64)
    for row in range(len(texts)):
        masked_by_word: dict[int, set[bool]] = {}
        for pos, word in enumerate(enc.word_ids(row)):
            if word is not None:
                masked_by_word.setdefault(word, set()).add(bool(batch["labels"][row, pos] != -100))
        assert all(len(v) == 1 for v in masked_by_word.values())  # all or none of a word
        assert any(v == {True} for v in masked_by_word.values())
    assert len(enc.tokens(0)) > 3 * 4 + 2  # the words really are split into subtokens


def test_pretrain_resumes_an_interrupted_run(tiny_bert: Path, make_cfg, tmp_path: Path) -> None:
    steps = ["callbacks.model_checkpoint_steps.every_n_train_steps=2", "trainer.max_epochs=5"]
    base = ["encoder=hf", f"encoder.name_or_path={tiny_bert}", *QUICK, *steps]
    first = pretrain(make_cfg(*base, "trainer.max_steps=2", name="pretrain", run="r"))
    assert first["global_steps"] == 2
    run = tmp_path / "r"
    (run / "metrics.json").unlink()  # as if killed before the end
    import shutil

    shutil.rmtree(run / "encoder")
    again = pretrain(make_cfg(*base, "resume=auto", name="pretrain", run="r"))
    assert again["global_steps"] == 6  # continued from step 2, not from 0
    assert again["mlm/loss_before"] == pytest.approx(first["mlm/loss_before"])


def test_dapt_demo_preset_composes_for_pretrain(make_cfg) -> None:
    cfg = make_cfg("experiment=dapt_demo", name="pretrain")
    assert cfg.task_name == "dapt_demo" and cfg.monitor == "val/loss"
    assert cfg.data.data_dir.endswith("demo/sentiment") and cfg.text_file is None
    assert cfg.encoder.name_or_path == packaged_minilm_dir()
