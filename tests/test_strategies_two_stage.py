"""LP-FT (two stages in one run) and auxiliary pre-task classifiers."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nlp_transfer.encoders.transformer import TransformerEncoder, packaged_minilm_dir
from nlp_transfer.export import HEAD_WEIGHTS, export
from nlp_transfer.heads.classification import SequenceClassificationHead
from nlp_transfer.module import TransferModule
from nlp_transfer.strategies.auxiliary import Auxiliary
from nlp_transfer.train import train


def tiny_module(strategy) -> TransferModule:
    torch.manual_seed(0)
    enc = TransformerEncoder(
        packaged_minilm_dir(),
        random_init=True,
        seed=0,
        config_overrides={
            "num_hidden_layers": 3,
            "hidden_size": 16,
            "num_attention_heads": 2,
            "intermediate_size": 32,
        },
    )
    return TransferModule(
        enc,
        partial(SequenceClassificationHead, dropout=0.0),
        strategy,
        ["a", "b"],
        partial(torch.optim.AdamW, lr=1e-3),
    )


def batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[101, 2000, 2001, 102], [101, 2002, 102, 0]])
    return {"input_ids": ids, "attention_mask": (ids > 0).long(), "labels": torch.tensor([0, 1])}


def test_auxiliary_loss_reaches_lower_layers_while_weight_positive() -> None:
    def grads(weight: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        module = tiny_module(Auxiliary(layers=[1], weight=weight, decay="none"))
        module.eval()  # no dropout: only the aux term differs
        b = batch()
        hidden, feats, mask = module.encode_all(b)
        loss = module.head.loss(module.head(feats, mask), b["labels"], mask)
        if weight > 0:
            loss = loss + weight * sum(
                aux.loss(aux(hidden[1], b["attention_mask"]), b["labels"])
                for aux in module.aux_heads.values()
            )
        loss.backward()
        layer1 = module.encoder.layer_groups()[1]
        aux_w = next(module.aux_heads.parameters()).grad
        return next(layer1.parameters()).grad.clone(), aux_w

    g0, aux0 = grads(0.0)
    g1, aux1 = grads(1.0)
    assert aux0 is None and aux1 is not None and aux1.abs().sum() > 0
    assert not torch.allclose(g0, g1)


def test_auxiliary_weight_decays_linearly_to_zero() -> None:
    s = Auxiliary(layers=[1], weight=0.4, decay="linear")
    assert s.aux_weight(0, 100) == pytest.approx(0.4)
    assert s.aux_weight(50, 100) == pytest.approx(0.2)
    assert s.aux_weight(100, 100) == 0.0
    assert Auxiliary(layers=[1], weight=0.4, decay="none").aux_weight(100, 100) == 0.4
    with pytest.raises(ValueError, match="decay"):
        Auxiliary(decay="cosine")


def test_auxiliary_run_logs_aux_metrics_and_export_has_no_aux_heads(
    make_cfg, tmp_path: Path
) -> None:
    metrics, objects = train(
        make_cfg("strategy=auxiliary", "strategy.layers=[1]", "trainer.max_epochs=1")
    )
    header = (
        (Path(objects["cfg"].paths.output_dir) / "csv" / "metrics.csv").read_text().splitlines()[0]
    )
    for key in ("val/aux/layer_1/acc", "val/aux/layer_1/loss", "train/aux_weight"):
        assert key in header.split(","), key
    out = tmp_path / "exp"
    export(
        make_cfg(
            f"ckpt_path={metrics['best_checkpoint']}", f"output_dir={out}", name="export", run="e"
        )
    )
    keys = load_file(str(out / HEAD_WEIGHTS)).keys()
    assert keys and not any(k.startswith("aux_heads") for k in keys)


def test_lp_ft_two_stages_one_command(make_cfg) -> None:
    # monitor=null: the "best" checkpoint is the latest one, i.e. the end of stage 2
    _metrics, objects = train(
        make_cfg(
            "strategy=lp_ft", "trainer.max_epochs=2", "callbacks.model_checkpoint.monitor=null"
        )
    )
    run = Path(objects["cfg"].paths.output_dir)
    on_disk = json.loads((run / "metrics.json").read_text())
    assert "lp/val/acc" in on_disk and "val/acc" in on_disk
    stage1 = torch.load(on_disk["lp/checkpoint"], map_location="cpu", weights_only=True)[
        "state_dict"
    ]
    final = torch.load(on_disk["best_checkpoint"], map_location="cpu", weights_only=True)[
        "state_dict"
    ]
    initial_encoder = TransformerEncoder(
        packaged_minilm_dir(),
        random_init=True,
        seed=0,
        config_overrides={
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
        max_length=128,
    ).state_dict()
    key = "encoder.model.encoder.layer.0.attention.self.query.weight"
    # stage 1 kept the encoder frozen; stage 2 changed it; the head trained in both
    assert torch.equal(stage1[key], initial_encoder[key[len("encoder.") :]])
    assert not torch.equal(final[key], stage1[key])
    assert not torch.equal(final["head.classifier.weight"], stage1["head.classifier.weight"])
