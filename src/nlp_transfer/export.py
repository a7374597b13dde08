"""Export a checkpoint as a folder transformers can load, plus our head and label map.

``python -m nlp_transfer.export ckpt_path=<ckpt> [output_dir=<new dir>]`` writes:

- ``config.json``, ``model.safetensors``, tokenizer files: ``AutoModel.from_pretrained``
  and ``AutoTokenizer.from_pretrained`` load them (``id2label``/``label2id`` are set).
  Where the head is one that transformers' own task model computes (:func:`map_task_head`),
  the folder is that task model (``AutoModelForSequenceClassification`` /
  ``AutoModelForTokenClassification``, ``pipeline(...)``) with the head in its classifier;
- ``README.md``: a model card saying how to load it and whether transformers' task model
  reproduces the head (exactly, to float precision, or not: then use :func:`load_export`);
- ``head.safetensors``: head, layer pooling and subword pooling weights (no auxiliary heads);
- ``nlp_transfer.json``: task, labels and the configs that rebuild the head.

:func:`load_export` rebuilds the full model; with ``verify=true`` the export is reloaded
and must reproduce the checkpoint's predictions.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from nlp_transfer.builders import build_datamodule, build_module, check_required
from nlp_transfer.checkpoint import read_checkpoint, restore, restore_options
from nlp_transfer.data.base import TransferDataModule, default_cache_dir
from nlp_transfer.encoders.transformer import TransformerEncoder
from nlp_transfer.errors import config_flag
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


# BERT's sequence classifier reads pooler(h_cls) = tanh(W h_cls + b). A plain linear head on
# the raw h_cls maps onto it through tanh's linear range: W = eps * I, b = 0 and the
# classifier scaled by 1 / eps, so logits = A tanh(eps h) / eps + c = A h + c up to a relative
# error of (eps |h|)^2 / 3 (< 1e-6 for |h| < 17 at 1e-4; float32 rounds at ~6e-8).
TANH_LINEAR_EPS = 1e-4
# model_type -> (pooler dense, its activation, output layer) of the *ForSequenceClassification
# head over the first token; other architectures are not mapped (yet)
SEQUENCE_HEADS: dict[str, tuple[str, str, str]] = {
    "bert": ("bert.pooler.dense", "tanh", "classifier"),
}
AUTO_CLASSES = {
    "classification": "AutoModelForSequenceClassification",
    "sequence_labeling": "AutoModelForTokenClassification",
}


@dataclass
class TaskHead:
    """How the template's head is written into a transformers task model."""

    auto_class: str
    weights: dict[str, torch.Tensor]  # task-model parameter name -> value
    exact: bool  # False: equal up to float precision (the tanh linearisation above)
    note: str


def _linear(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    w = layer.weight.detach().float().cpu()
    b = layer.bias.detach().float().cpu() if layer.bias is not None else torch.zeros(w.shape[0])
    return w, b


def map_task_head(module: TransferModule) -> TaskHead | str:
    """The transformers task head equal to ``module``'s head, or why there is none.

    Mapped: a linear token head on the last layer with first-subtoken word features
    (``*ForTokenClassification``: dropout + linear per subtoken, the pipeline's
    ``aggregation_strategy="first"``); for BERT, a CLS head on the last layer that is linear
    (through the tanh pooler's linear range) or an MLP with ``tanh`` and the encoder's width
    (exactly the pooler + classifier).
    """
    from nlp_transfer.heads.classification import SequenceClassificationHead
    from nlp_transfer.heads.token import TokenHead

    pooling = module.layer_pooling
    if pooling is not None and getattr(pooling, "mode", None) != "last":
        return f"layer_pooling mode {getattr(pooling, 'mode', pooling)!r} reads other layers"
    head = module.head
    auto_class = AUTO_CLASSES[module.task.name]
    if module.task.name == "sequence_labeling":
        if type(head) is not TokenHead:
            return f"the head is {type(head).__name__}, not a per-word linear layer"
        layers = [m for m in head.classifier if not isinstance(m, nn.Dropout)]
        if len(layers) != 1 or not isinstance(layers[0], nn.Linear):
            return "the token head is an MLP, not a single linear layer"
        mode = getattr(module.subword_pooling, "mode", "first")
        if mode != "first":
            return f"subword pooling {mode!r}: transformers classifies each subtoken itself"
        w, b = _linear(layers[0])
        return TaskHead(
            auto_class,
            {"classifier.weight": w, "classifier.bias": b},
            exact=True,
            note="per-subtoken linear classifier; a word's tag is its first subtoken's",
        )
    if type(head) is not SequenceClassificationHead:
        return f"the head is {type(head).__name__}"
    if head.pooling != "cls":
        return f"head.pooling={head.pooling!r}; transformers' classifiers read the first token"
    model_type = module.encoder.model.config.model_type
    if model_type not in SEQUENCE_HEADS:
        return f"no mapping onto the sequence classifier of model_type {model_type!r}"
    dense, activation, out = SEQUENCE_HEADS[model_type]
    if isinstance(head.classifier, nn.Linear):
        w, b = _linear(head.classifier)
        eye = torch.eye(w.shape[1]) * TANH_LINEAR_EPS
        return TaskHead(
            auto_class,
            {
                f"{dense}.weight": eye,
                f"{dense}.bias": torch.zeros(w.shape[1]),
                f"{out}.weight": w / TANH_LINEAR_EPS,
                f"{out}.bias": b,
            },
            exact=False,
            note=(
                f"linear CLS head written through the {activation} pooler's linear range "
                f"(pooler = {TANH_LINEAR_EPS:g} * I, classifier / {TANH_LINEAR_EPS:g}): equal to "
                "float precision; fine-tuning this model further starts from that odd pooler"
            ),
        )
    first, act, _, last = list(head.classifier)
    if type(act) is not nn.Tanh or first.out_features != first.in_features:
        return (
            f"the MLP head ({type(act).__name__}, width {first.out_features}) is not the "
            f"{activation} pooler of width {first.in_features}"
        )
    w1, b1 = _linear(first)
    w2, b2 = _linear(last)
    return TaskHead(
        auto_class,
        {f"{dense}.weight": w1, f"{dense}.bias": b1, f"{out}.weight": w2, f"{out}.bias": b2},
        exact=True,
        note="tanh MLP head = the pooler (dense + tanh) and the classifier",
    )


def _task_model(module: TransferModule, mapped: TaskHead) -> PreTrainedModel:
    """A transformers task model holding the encoder's weights and the mapped head."""
    import transformers

    encoder_model = module.encoder.model
    config = copy.deepcopy(encoder_model.config)
    config.id2label = dict(enumerate(module.labels))
    config.label2id = {label: i for i, label in enumerate(module.labels)}
    if module.task.name == "classification":
        config.problem_type = "single_label_classification"
    task = getattr(transformers, mapped.auto_class).from_config(config, attn_implementation="sdpa")
    base = getattr(task, task.base_model_prefix)
    missing, unexpected = base.load_state_dict(encoder_model.state_dict(), strict=False)
    prefix = f"{task.base_model_prefix}."
    uncovered = set(missing) - {k.removeprefix(prefix) for k in mapped.weights}
    if uncovered or unexpected:
        raise ExportError(
            f"{mapped.auto_class} does not fit the encoder "
            f"(missing {sorted(uncovered)}, unexpected {sorted(unexpected)})"
        )
    params = dict(task.named_parameters())
    with torch.no_grad():
        for name, value in mapped.weights.items():
            if name not in params or params[name].shape != value.shape:
                raise ExportError(f"{mapped.auto_class} has no parameter {name} of that shape")
            params[name].copy_(value)
    return task.eval()


def export_module(module: TransferModule, out_dir: str | Path) -> Path:
    out = guard_new_output(out_dir, "export directory")
    encoder = module.encoder
    module.strategy.merge_for_export(module)  # e.g. LoRA adapters folded into the base weights
    if not isinstance(encoder, TransformerEncoder):
        raise ExportError(f"export supports transformers encoders, not {type(encoder).__name__}")
    out.mkdir(parents=True, exist_ok=True)
    hf_model = encoder.model
    hf_model.config.id2label = dict(enumerate(module.labels))
    hf_model.config.label2id = {label: i for i, label in enumerate(module.labels)}
    mapped = map_task_head(module)
    if isinstance(mapped, TaskHead):
        _task_model(module, mapped).save_pretrained(out, safe_serialization=True)
        log.info("export is a %s: %s", mapped.auto_class, mapped.note)
    else:
        hf_model.save_pretrained(out, safe_serialization=True)
        log.warning(
            "export: %s cannot reproduce this head (%s); its classifier would load randomly "
            "initialised, load the export with nlp_transfer.export.load_export",
            AUTO_CLASSES[module.task.name],
            mapped,
        )
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
            "task": module.task.name,
            "labels": module.labels,
            "head": cfg.get("head"),
            "layer_pooling": cfg.get("layer_pooling"),
            "subword_pooling": cfg.get("subword_pooling"),
            "data": cfg.get("data"),
            "max_length": encoder.max_length,
            "encoder_source": encoder.name_or_path,
            "task_model": (
                {"class": mapped.auto_class, "exact": mapped.exact, "note": mapped.note}
                if isinstance(mapped, TaskHead)
                else {"class": None, "reason": mapped}
            ),
        },
    )
    (out / "README.md").write_text(model_card(module, mapped), encoding="utf-8")
    return out


def model_card(module: TransferModule, mapped: TaskHead | str) -> str:
    """The export's README: what it is and how to load it."""
    pipeline_tag = {"classification": "text-classification"}.get(
        module.task.name, "token-classification"
    )
    cfg = module.run_config
    head = (cfg.get("head") or {}).get("_target_", type(module.head).__name__)
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {pipeline_tag}",
        "tags: [nlp_transfer]",
        "---",
        f"# {module.task.name} model exported by nlp_transfer",
        "",
        f"- encoder: `{module.encoder.name_or_path}`",
        f"- head: `{head}`; labels: {', '.join(f'`{x}`' for x in module.labels)}",
        "",
        "## Loading",
        "",
    ]
    if isinstance(mapped, TaskHead):
        how = "exactly" if mapped.exact else "to float precision (not bit for bit)"
        agg = ', aggregation_strategy="first"' if module.task.name == "sequence_labeling" else ""
        lines += [
            f"The folder is a `{mapped.auto_class}` that reproduces the template's head {how}:",
            f"{mapped.note}.",
            "",
            "```python",
            "from transformers import pipeline",
            f'nlp = pipeline("{pipeline_tag}", model="<this folder>"{agg})',
            "```",
        ]
    else:
        lines += [
            f"`{AUTO_CLASSES[module.task.name]}` cannot express this head ({mapped}): loaded that way",
            "its classifier is randomly initialised. `AutoModel` gives the fine-tuned encoder;",
            "the whole model (encoder, layer/subword pooling, head) loads with:",
        ]
    lines += [
        "",
        "```python",
        "from nlp_transfer.export import load_export",
        'module, datamodule = load_export("<this folder>")',
        "```",
        "",
    ]
    return "\n".join(lines)


def load_export(
    path: str | Path, extra_targets: Sequence[str] = ()
) -> tuple[TransferModule, TransferDataModule]:
    """Rebuild the exported model (encoder, head, pooling) ready for prediction.

    ``extra_targets``: your own components the export's config may name (as the command
    line's ``safe_targets_extra``), e.g. ``["mylab.heads."]``; everything else must be one of
    this project's components."""
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
    # the folder's configs build only our components and the ones the caller opts in
    check_stored_config(cfg, str(meta_file), extra_targets=extra_targets)
    encoder = hydra.utils.instantiate(cfg.encoder)
    module = build_module(cfg, encoder, meta["labels"], meta["task"], predict_only=True)
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

    if module.task.name == "classification":
        return [(r["label"], r["probs"]) for r in predict_texts(module, data, texts)]
    scheme = module.run_config.get("data", {}).get("train_scheme", "IOB2")
    items = [(t, *split_words(t)) for t in texts]
    rows = predict_entities(module, data, items, scheme=scheme)
    return [(r["tags"], {f"{i}": e["score"] for i, e in enumerate(r["entities"])}) for r in rows]


def task_model_predictions(
    path: str | Path, texts: list[str], scheme: str = "IOB2"
) -> list[tuple[Any, dict[str, float]] | None]:
    """Predictions of the exported transformers task model alone, as :func:`_predictions`
    gives them: (label, probabilities) per text, or (IOB2 tags, {}) per sentence split into
    words as the template splits them; None for a sentence the model truncates."""
    import transformers
    from transformers import AutoTokenizer

    from nlp_transfer.data.sequence_labeling import split_words
    from nlp_transfer.tagging import entities_from_tags, tags_from_entities

    meta = json.loads((Path(path) / META).read_text(encoding="utf-8"))
    model = getattr(transformers, AUTO_CLASSES[meta["task"]]).from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    kw: dict[str, Any] = {"truncation": True, "max_length": meta["max_length"]}
    if meta["task"] == "classification":
        with torch.no_grad():
            probs = model(**tok(texts, padding=True, return_tensors="pt", **kw)).logits
        return [
            (labels[int(p.argmax())], dict(zip(labels, p.tolist())))
            for p in probs.float().softmax(-1)
        ]
    rows: list[tuple[Any, dict[str, float]] | None] = []
    for text in texts:
        words = split_words(text)[0]
        enc = tok(words, is_split_into_words=True, return_tensors="pt", **kw)
        with torch.no_grad():
            pred = model(**enc).logits[0].argmax(-1).tolist()
        first: dict[int, int] = {}
        for position, word in enumerate(enc.word_ids()):
            if word is not None:
                first.setdefault(word, pred[position])
        if len(first) < len(words):
            rows.append(None)
            continue
        tags = [labels[first[i]] for i in range(len(words))]
        rows.append((tags_from_entities(entities_from_tags(tags, scheme), len(tags), "IOB2"), {}))
    return rows


def verify_task_model(
    reference: list[tuple[Any, dict[str, float]]], out_dir: Path, texts: list[str], scheme: str
) -> float:
    """The exported task model, loaded by transformers alone, must predict the checkpoint's
    labels (tags) with the same probabilities; returns the largest probability difference."""
    worst = 0.0
    for text, (ref, ref_p), got in zip(
        texts, reference, task_model_predictions(out_dir, texts, scheme)
    ):
        if got is None:
            continue
        if got[0] != ref:
            raise ExportError(
                f"the exported task model predicts {got[0]!r} for {text!r}, the checkpoint {ref!r}"
            )
        if got[1]:
            worst = max([worst, *(abs(ref_p[k] - got[1][k]) for k in ref_p)])
    if worst > 1e-4:
        raise ExportError(f"task model probabilities differ from the checkpoint's by {worst:.2e}")
    return worst


def verify_export(
    reference: list[tuple[Any, dict[str, float]]],
    out_dir: Path,
    texts: list[str],
    extra_targets: Sequence[str] = (),
) -> float:
    """Reload the export and compare with predictions taken from the checkpoint before
    exporting (export may merge adapters); returns the largest probability difference."""
    loaded, data = load_export(out_dir, extra_targets)
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
    options = restore_options(cfg)
    module, datamodule = restore(
        run,
        trust_remote_code=config_flag(cfg.get("trust_remote_code"), "trust_remote_code"),
        **options,
    )
    texts = sample_texts(datamodule) if cfg.get("verify", True) else []
    reference = _predictions(module, datamodule, texts) if texts else None
    with new_dir_atomically(out_dir, "export directory") as staging:
        export_module(module, staging)  # published complete or not at all
    result: dict[str, Any] = {"export_dir": str(out_dir)}
    if reference is not None:
        result["max_prob_diff"] = verify_export(reference, out_dir, texts, options["extra_targets"])
        result["verified_examples"] = len(texts)
        meta = json.loads((out_dir / META).read_text(encoding="utf-8"))
        result["task_model"] = meta["task_model"]["class"]
        if meta["task_model"]["class"]:
            scheme = module.run_config.get("data", {}).get("train_scheme", "IOB2")
            result["task_model_max_prob_diff"] = verify_task_model(
                reference, out_dir, texts, scheme
            )
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
