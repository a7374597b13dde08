"""Export a checkpoint as a folder transformers can load, plus our head and label map.

``python -m nlp_transfer.export ckpt_path=<ckpt> [output_dir=<new dir>]`` writes:

- ``config.json``, ``model.safetensors``, tokenizer files: ``AutoModel.from_pretrained``
  and ``AutoTokenizer.from_pretrained`` load them (``id2label``/``label2id`` are set);
- ``head.safetensors``: head, layer pooling and subword pooling weights (no auxiliary heads);
- ``nlp_transfer.json``: task, labels and the configs that rebuild the head.

:func:`load_export` rebuilds the full model; with ``verify=true`` the export is reloaded
and must reproduce the checkpoint's predictions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from nlp_transfer.builders import build_datamodule, build_module, check_required
from nlp_transfer.checkpoint import read_checkpoint, restore, restore_options
from nlp_transfer.data.base import TransferDataModule, default_cache_dir
from nlp_transfer.data.errors import config_flag
from nlp_transfer.encoders.transformer import TransformerEncoder
from nlp_transfer.module import TransferModule
from nlp_transfer.safe_targets import check_stored_config
from nlp_transfer.utils.io import (
    atomic_write_json,
    checkpoint_run_dir,
    free_default_output,
    guard_new_output,
    new_dir_atomically,
)
from nlp_transfer.utils.resolvers import CONFIG_DIR

log = logging.getLogger(__name__)

META = "nlp_transfer.json"
HEAD_WEIGHTS = "head.safetensors"
EXPORTED_PARTS = ("head.", "layer_pooling.", "subword_pooling.")


class ExportError(RuntimeError):
    """The export cannot be written or does not reproduce the checkpoint."""


def export_module(module: TransferModule, out_dir: str | Path) -> Path:
    out = guard_new_output(out_dir, "export directory")
    encoder = module.encoder
    merge = getattr(module.strategy, "merge_for_export", None)
    if callable(merge):
        merge(module)  # e.g. LoRA adapters folded into the base weights
    if not isinstance(encoder, TransformerEncoder):
        raise ExportError(f"export supports transformers encoders, not {type(encoder).__name__}")
    out.mkdir(parents=True, exist_ok=True)
    hf_model = encoder.model
    hf_model.config.id2label = dict(enumerate(module.labels))
    hf_model.config.label2id = {label: i for i, label in enumerate(module.labels)}
    hf_model.save_pretrained(out, safe_serialization=True)
    encoder.tokenizer.save_pretrained(out)
    head_state = {
        k: v.detach().cpu().contiguous()
        for k, v in module.state_dict().items()
        if k.startswith(EXPORTED_PARTS)
    }
    save_file(head_state, str(out / HEAD_WEIGHTS))
    cfg = module.run_config
    atomic_write_json(
        out / META,
        {
            "format_version": 1,
            "task": module.task,
            "labels": module.labels,
            "head": cfg.get("head"),
            "layer_pooling": cfg.get("layer_pooling"),
            "subword_pooling": cfg.get("subword_pooling"),
            "data": cfg.get("data"),
            "max_length": encoder.max_length,
            "encoder_source": encoder.name_or_path,
        },
    )
    return out


def load_export(path: str | Path) -> tuple[TransferModule, TransferDataModule]:
    """Rebuild the exported model (encoder, head, pooling) ready for prediction."""
    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file():
        raise ExportError(f"{path}: no {META}; not a folder written by nlp_transfer.export")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    cfg = OmegaConf.create(
        {
            "encoder": {
                "_target_": "nlp_transfer.encoders.transformer.TransformerEncoder",
                "name_or_path": str(path),
                "max_length": meta["max_length"],
            },
            "strategy": {"_target_": "nlp_transfer.strategies.simple.FullFineTuning"},
            "optimizer": {"_target_": "torch.optim.AdamW", "lr": 0.0},
            "head": meta["head"],
            "layer_pooling": meta["layer_pooling"],
            "subword_pooling": meta["subword_pooling"],
            "data": {
                **meta["data"],
                "data_dir": None,
                "train_file": None,
                "cache_dir": str(default_cache_dir() / "tokenized"),  # never the stored one
            },
        }
    )
    check_stored_config(cfg, str(meta_file))  # the folder's configs build only our components
    encoder = hydra.utils.instantiate(cfg.encoder)
    module = build_module(cfg, encoder, meta["labels"], meta["task"])
    state = load_file(str(path / HEAD_WEIGHTS))
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith(EXPORTED_PARTS)]
    if missing or unexpected:
        raise ExportError(
            f"{path}: head weights do not fit (missing {missing}, unexpected {unexpected})"
        )
    module.eval()
    return module, build_datamodule(cfg, encoder, labels=meta["labels"])


def sample_texts(datamodule: TransferDataModule, n: int = 32) -> list[str]:
    try:
        datamodule.load_examples()
    except Exception:  # data not reachable from here: fall back to fixed sentences
        return ["a fine example sentence .", "this is not good at all", "Paris is in France ."]
    split = "test" if "test" in datamodule.examples else "validation"
    return [getattr(e, "text", None) or " ".join(e.tokens) for e in datamodule.examples[split][:n]]


def _predictions(
    module: TransferModule, data: TransferDataModule, texts: list[str]
) -> list[tuple[Any, dict[str, float]]]:
    """(label or tags, per-item probabilities) for each text, for either task."""
    from nlp_transfer.data.sequence_labeling import split_words
    from nlp_transfer.predict import predict_entities, predict_texts

    if module.task == "classification":
        return [(r["label"], r["probs"]) for r in predict_texts(module, data, texts)]
    scheme = module.run_config.get("data", {}).get("train_scheme", "IOB2")
    items = [(t, *split_words(t)) for t in texts]
    rows = predict_entities(module, data, items, scheme=scheme)
    return [(r["tags"], {f"{i}": e["score"] for i, e in enumerate(r["entities"])}) for r in rows]


def verify_export(
    reference: list[tuple[Any, dict[str, float]]], out_dir: Path, texts: list[str]
) -> float:
    """Reload the export and compare with predictions taken from the checkpoint before
    exporting (export may merge adapters); returns the largest probability difference."""
    loaded, data = load_export(out_dir)
    worst = 0.0
    for text, (ref, ref_p), (got, got_p) in zip(
        texts, reference, _predictions(loaded, data, texts)
    ):
        if ref != got or ref_p.keys() != got_p.keys():
            raise ExportError(f"export predicts {got!r} for {text!r}, the checkpoint {ref!r}")
        worst = max([worst, *(abs(ref_p[k] - got_p[k]) for k in ref_p)])
    if worst > 1e-4:
        raise ExportError(f"export probabilities differ from the checkpoint's by {worst:.2e}")
    return worst


def export(cfg: DictConfig) -> dict[str, Any]:
    check_required(cfg)
    run = read_checkpoint(cfg.ckpt_path)
    out_dir = (
        Path(cfg.output_dir)
        if cfg.get("output_dir")
        else free_default_output(checkpoint_run_dir(cfg.ckpt_path) / "export")
    )
    module, datamodule = restore(
        run,
        trust_remote_code=config_flag(cfg.get("trust_remote_code"), "trust_remote_code"),
        **restore_options(cfg),
    )
    texts = sample_texts(datamodule) if cfg.get("verify", True) else []
    reference = _predictions(module, datamodule, texts) if texts else None
    with new_dir_atomically(out_dir, "export directory") as staging:
        export_module(module, staging)  # published complete or not at all
    result: dict[str, Any] = {"export_dir": str(out_dir)}
    if reference is not None:
        result["max_prob_diff"] = verify_export(reference, out_dir, texts)
        result["verified_examples"] = len(texts)
        log.info(
            "export verified on %d examples (max prob diff %.2e)",
            len(texts),
            result["max_prob_diff"],
        )
    log.info("exported to %s", out_dir)
    return result


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
