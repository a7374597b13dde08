"""Domain-adaptive pretraining (DAPT, Gururangan et al. 2020): the first of the two stages.

``python -m nlp_transfer.pretrain [text_file=<file>] [data=<preset>] [encoder=...]``
continues masked-language-model training of an encoder on unlabelled in-domain text (a text
file, one text per line, or the training split of a data config) and writes an encoder
folder (``save_pretrained`` model + tokenizer) that ``encoder=hf encoder.name_or_path=<dir>``
fine-tunes. See ``docs/pretraining.md``.

The MLM head is transformers' own (``AutoModelForMaskedLM``); when the checkpoint ships
none (the packaged MiniLM is a sentence-transformers ``BertModel``) it is initialised as
transformers initialises missing weights, which the log says. Masking is
``DataCollatorForLanguageModeling`` (``whole_word_mask`` optional). Precision, length
grouping, checkpoints and ``resume`` work as in ``nlp_transfer.train``. Returns (and writes to
``metrics.json``) the held-out MLM loss and perplexity before and after.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning import LightningDataModule, LightningModule, Trainer
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    PreTrainedModel,
)

from nlp_transfer.builders import build_callbacks, build_loggers, check_required, plain_config
from nlp_transfer.data.base import check_megabatch_mult, grouped_loader
from nlp_transfer.errors import ConfigError, DataError, config_flag
from nlp_transfer.strategies.base import ParamGroup
from nlp_transfer.training.hardware import apply_hardware_settings, metrics_record
from nlp_transfer.training.loop_state import ResumeState
from nlp_transfer.training.param_groups import optimizer_defaults, torch_param_groups
from nlp_transfer.training.run import (
    best_checkpoint_callback,
    finish_loggers,
    plan_run,
    prepare_loggers,
    prepare_run,
    trainer_plugins,
)
from nlp_transfer.training.schedulers import with_step_schedule
from nlp_transfer.training.speed import SpeedClipping, SpeedMachinery
from nlp_transfer.utils.io import atomic_write_json, guard_new_output
from nlp_transfer.utils.resolvers import CONFIG_DIR

log = logging.getLogger(__name__)


# -- text ------------------------------------------------------------------------------------
def read_text_file(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, stripped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (text_file)")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    texts = [t for t in texts if t]
    if not texts:
        raise DataError(f"{path}: no text (one text per line expected)")
    return texts


def example_text(example: Any) -> str:
    """The text of a classification example (pair joined) or a sentence's words."""
    tokens = getattr(example, "tokens", None)
    if tokens is not None:
        return " ".join(tokens)
    pair = getattr(example, "text_pair", None)
    return f"{example.text} {pair}" if pair else str(example.text)


def gather_texts(cfg: DictConfig, tokenizer: Any) -> tuple[list[str], list[str], str]:
    """(training texts, held-out texts, where they come from).

    ``text_file``: a seeded ``held_out_fraction`` of its lines is held out. Otherwise the
    data config's train split (after its own slicing, ``data.max_train_examples``) is the
    training text and its validation split (a file, or the seeded carve-out of train)
    the held-out text; labels are never read, test is never used.
    """
    if cfg.get("text_file"):
        texts = read_text_file(cfg.text_file)
        fraction = float(cfg.held_out_fraction)
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"held_out_fraction must be in (0, 1), got {fraction}")
        if len(texts) < 2:
            raise DataError(f"{cfg.text_file}: one line cannot be split into train and held-out")
        order = list(range(len(texts)))
        random.Random(int(cfg.get("seed") or 0)).shuffle(order)
        n_held = max(1, round(len(texts) * fraction))
        held = [texts[i] for i in sorted(order[:n_held])]
        train = [texts[i] for i in sorted(order[n_held:])]
        return train, held, str(cfg.text_file)
    if not cfg.get("data"):
        raise ConfigError("no text: set text_file=<one text per line> or data=<preset>")
    data = instantiate(cfg.data, tokenizer=tokenizer, _convert_="partial")
    data.load_examples()
    train = [example_text(e) for e in data.examples["train"]]
    held = [example_text(e) for e in data.examples["validation"]]
    return train, held, f"{data.sources['train']} (held out: {data.sources['validation']})"


# -- data ------------------------------------------------------------------------------------
class MaskedTextDataModule(LightningDataModule):
    """Tokenized texts, masked per batch for training and once (seeded) for held-out
    evaluation, so every evaluation, before and after, scores the same masked tokens."""

    def __init__(
        self,
        tokenizer: Any,
        train_texts: list[str],
        held_out_texts: list[str],
        max_length: int,
        batch_size: int,
        eval_batch_size: int,
        mlm_probability: float,
        whole_word_mask: bool,
        length_grouping: bool,
        megabatch_mult: int,
        seed: int,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.texts = {"train": train_texts, "validation": held_out_texts}
        self.max_length, self.batch_size, self.eval_batch_size = (
            max_length,
            batch_size,
            eval_batch_size,
        )
        self.whole_word_mask = whole_word_mask
        self.length_grouping = length_grouping
        self.megabatch_mult = megabatch_mult
        self.seed = seed
        self.collator = DataCollatorForLanguageModeling(
            tokenizer, mlm_probability=mlm_probability, whole_word_mask=whole_word_mask
        )
        self.eval_collator = DataCollatorForLanguageModeling(
            tokenizer,
            mlm_probability=mlm_probability,
            whole_word_mask=whole_word_mask,
            seed=seed,
        )
        self.features: dict[str, list[dict[str, Any]]] = {}
        self.held_out_batches: list[dict[str, torch.Tensor]] = []

    def _encode(self, texts: list[str]) -> list[dict[str, Any]]:
        enc = self.tokenizer(
            texts,
            truncation=True,
            max_length=self.max_length,
            return_special_tokens_mask=True,
            return_offsets_mapping=self.whole_word_mask,
        )
        return [{k: enc[k][i] for k in enc} for i in range(len(texts))]

    def collate_with(self, collator: Any, features: list[dict[str, Any]]) -> dict[str, Any]:
        if self.whole_word_mask:  # offsets padded like special tokens, so they stack
            longest = max(len(f["input_ids"]) for f in features)
            features = [
                {
                    **f,
                    "offset_mapping": [*f["offset_mapping"]]
                    + [(0, 0)] * (longest - len(f["offset_mapping"])),
                }
                for f in features
            ]
        return collator(features)

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return self.collate_with(self.collator, features)

    def setup(self, stage: str | None = None) -> None:
        if self.features:
            return
        self.features = {split: self._encode(texts) for split, texts in self.texts.items()}
        held = self.features["validation"]
        self.held_out_batches = [
            self.collate_with(self.eval_collator, held[i : i + self.eval_batch_size])
            for i in range(0, len(held), self.eval_batch_size)
        ]

    def train_dataloader(self) -> DataLoader:
        train = self.features["train"]
        if self.length_grouping:
            lengths = [len(f["input_ids"]) for f in train]
            return grouped_loader(
                train, lengths, self.batch_size, self.collate, megabatch_mult=self.megabatch_mult
            )
        return DataLoader(train, batch_size=self.batch_size, shuffle=True, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.held_out_batches, batch_size=None)


# -- model -----------------------------------------------------------------------------------
def load_mlm_model(cfg: DictConfig) -> tuple[PreTrainedModel, bool]:
    """``AutoModelForMaskedLM`` from the encoder config; True when its MLM head was not in
    the checkpoint and was initialised as transformers initialises missing weights."""
    enc = cfg.encoder
    if not str(enc.get("_target_", "")).endswith("TransformerEncoder"):
        raise ConfigError(
            f"pretrain needs a transformers encoder (encoder=minilm or encoder=hf), not "
            f"{enc.get('_target_')}"
        )
    if enc.get("random_init"):
        raise ConfigError(
            "pretrain continues from saved weights; encoder.random_init=true is not supported "
            "(save a model folder and pass encoder=hf encoder.name_or_path=<dir>)"
        )
    model, info = AutoModelForMaskedLM.from_pretrained(
        str(enc.name_or_path),
        revision=enc.get("revision"),
        trust_remote_code=config_flag(enc.get("trust_remote_code"), "encoder.trust_remote_code"),
        output_loading_info=True,
    )
    prefix = f"{model.base_model_prefix}."
    head_missing = sorted(k for k in info["missing_keys"] if not k.startswith(prefix))
    body_missing = sorted(k for k in info["missing_keys"] if k.startswith(prefix))
    if body_missing:
        raise ConfigError(f"{enc.name_or_path}: encoder weights missing: {body_missing[:5]}")
    if head_missing:
        log.warning(
            "%s ships no MLM head weights (%s): initialised as transformers initialises "
            "missing weights (random transform, decoder tied to the input embeddings)",
            enc.name_or_path,
            ", ".join(head_missing),
        )
    return model, bool(head_missing)


class MaskedLMModule(SpeedClipping, LightningModule):
    """A transformers masked-LM model trained on its own loss."""

    def __init__(
        self,
        model: PreTrainedModel,
        optimizer: Any,
        scheduler: Any = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model.train()  # from_pretrained returns eval mode
        self.run_config = run_config or {}
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.speed = SpeedMachinery()  # only its clipping: also for fused AdamW under bf16

    def on_train_start(self) -> None:
        # from_pretrained returns eval mode and Lightning restores the modes modules had
        # before fit: without this MLM would train with dropout off (as TransferModule)
        self.model.train()

    def on_train_epoch_start(self) -> None:
        self.model.train()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        masked = int((batch["labels"] != -100).sum())
        if masked:  # the epoch value is the mean over masked tokens (weights: their counts)
            self.log("val/loss", self.model(**batch).loss, batch_size=masked)

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("val/perplexity", torch.exp(loss.detach().float()))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # what resume expects of a training checkpoint (task "mlm": no labels, no head)
        checkpoint["nlp_transfer"] = {"labels": [], "task": "mlm", "config": self.run_config}

    def configure_optimizers(self) -> Any:
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = torch_param_groups(
            [ParamGroup("model", [p for _, p in trainable])],
            {id(p): n for n, p in trainable},
            optimizer_defaults(self.optimizer_factory),
        )
        optimizer = self.optimizer_factory(groups)
        return with_step_schedule(
            optimizer, self.scheduler_factory, self.trainer.estimated_stepping_batches
        )


# -- entry point -----------------------------------------------------------------------------
def _held_out_loss(trainer: Trainer, module: MaskedLMModule, data: Any, **kw: Any) -> float:
    results = trainer.validate(module, datamodule=data, verbose=False, **kw)
    return float(results[0]["val/loss"])


def pretrain(cfg: DictConfig) -> dict[str, Any]:
    """Continue MLM training; write the encoder folder and ``metrics.json``; return metrics."""
    check_required(cfg)
    apply_hardware_settings(cfg)  # trainer.precision / optimizer speed knobs `auto`, as train
    plan = plan_run(cfg)
    out_dir = plan.output_dir
    encoder_dir = Path(cfg.encoder_dir) if cfg.get("encoder_dir") else out_dir / "encoder"
    guard_new_output(encoder_dir, "pretrained encoder directory")
    prepare_run(cfg, plan)

    enc = cfg.encoder
    tokenizer = AutoTokenizer.from_pretrained(
        str(enc.get("tokenizer_name_or_path") or enc.name_or_path),
        revision=enc.get("revision"),
        use_fast=True,
    )
    train_texts, held_texts, source = gather_texts(cfg, tokenizer)
    log.info(
        "MLM text: %d train / %d held-out texts from %s", len(train_texts), len(held_texts), source
    )
    model, head_initialised = load_mlm_model(cfg)
    model_max = int(getattr(model.config, "max_position_embeddings", 512) or 512)
    data = MaskedTextDataModule(
        tokenizer,
        train_texts,
        held_texts,
        max_length=min(int(cfg.max_length), model_max),
        batch_size=int(cfg.batch_size),
        eval_batch_size=int(cfg.get("eval_batch_size") or cfg.batch_size),
        mlm_probability=float(cfg.mlm_probability),
        whole_word_mask=config_flag(cfg.whole_word_mask, "whole_word_mask"),
        length_grouping=config_flag(cfg.length_grouping, "length_grouping"),
        megabatch_mult=check_megabatch_mult(cfg.megabatch_mult),
        seed=int(cfg.get("seed") or 0),
    )
    module = MaskedLMModule(
        model,
        optimizer=instantiate(cfg.optimizer, _partial_=True),
        scheduler=instantiate(cfg.scheduler, _partial_=True) if cfg.get("scheduler") else None,
        run_config=plain_config(cfg),
    )
    resume_state = ResumeState(cfg.get("seed"))
    resume_state.attach(data)
    prepare_loggers(cfg, plan)
    loggers = build_loggers(cfg)
    plugins = trainer_plugins(cfg)
    trainer: Trainer = instantiate(
        cfg.trainer,
        callbacks=[*build_callbacks(cfg), resume_state],
        logger=loggers or False,
        **({"plugins": plugins} if plugins else {}),
    )
    for lg in loggers:
        lg.log_hyperparams(plain_config(cfg))
    data.setup("fit")
    loss_before = _held_out_loss(trainer, module, data)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=plan.ckpt_path, weights_only=True)
    wall = time.perf_counter() - start
    if trainer.interrupted:
        raise KeyboardInterrupt("pretraining was interrupted; the last checkpoint is kept")
    ckpt_cb = best_checkpoint_callback(trainer)
    best = ckpt_cb.best_model_path if ckpt_cb is not None and ckpt_cb.best_model_path else None
    loss_after = _held_out_loss(trainer, module, data, ckpt_path=best, weights_only=True)
    if trainer.is_global_zero:
        module.model.save_pretrained(encoder_dir, safe_serialization=True)
        tokenizer.save_pretrained(encoder_dir)
    metrics = {
        "mlm/loss_before": loss_before,
        "mlm/loss_after": loss_after,
        "mlm/perplexity_before": math.exp(loss_before),
        "mlm/perplexity_after": math.exp(loss_after),
        "encoder_dir": str(encoder_dir.resolve()),
        "best_checkpoint": str(Path(best).resolve()) if best else None,
        "mlm_head_initialised": head_initialised,
        "train_texts": len(train_texts),
        "held_out_texts": len(held_texts),
        "global_steps": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "train_wall_s": round(wall, 3),
        "seed": cfg.get("seed"),
        "task": "mlm",
        **metrics_record(cfg),  # precision, hardware kind, speed mechanisms
    }
    finish_loggers(loggers)
    if trainer.is_global_zero:
        atomic_write_json(out_dir / "metrics.json", metrics)
        log.info(
            "held-out MLM loss %.4f -> %.4f (perplexity %.2f -> %.2f); encoder written to %s",
            loss_before,
            loss_after,
            metrics["mlm/perplexity_before"],
            metrics["mlm/perplexity_after"],
            encoder_dir,
        )
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="pretrain")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the held-out MLM loss after pretraining (for sweepers)."""
    return float(pretrain(cfg)["mlm/loss_after"])


if __name__ == "__main__":
    main()
