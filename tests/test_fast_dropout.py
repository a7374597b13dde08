"""Cheap CPU dropout masks: right probability and scaling, exact gradients, and encoders
whose outputs match SDPA attention when no dropout is drawn."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nlp_transfer.encoders.fast_dropout import (
    ATTENTION_NAME,
    FastDropout,
    fast_dropout,
    install_fast_dropout,
    scaled_keep_mask,
)
from nlp_transfer.encoders.transformer import TransformerEncoder, packaged_minilm_dir

TINY = {
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_drops_p_and_keeps_the_expectation(p: float) -> None:
    torch.manual_seed(0)
    mask = scaled_keep_mask((400, 1000), p, torch.float32, torch.device("cpu"))
    dropped = (mask == 0).float().mean().item()
    assert abs(dropped - p) < 0.005  # 400k draws: 5 standard deviations is < 0.004
    values = mask.unique().tolist()
    assert values[0] == 0.0 and values[1:] == [pytest.approx(1 / (1 - p))]
    assert abs(mask.mean().item() - 1.0) < 0.02


def test_mask_edges_and_dtype() -> None:
    cpu = torch.device("cpu")
    assert torch.equal(scaled_keep_mask((3, 4), 1e-7, torch.bfloat16, cpu), torch.ones(3, 4))
    assert not scaled_keep_mask((3, 4), 1 - 1e-7, torch.float32, cpu).any()
    assert scaled_keep_mask((5,), 0.3, torch.bfloat16, cpu).dtype == torch.bfloat16


def test_same_seed_same_mask_and_gradient_is_the_mask() -> None:
    x = torch.randn(6, 50, requires_grad=True)
    torch.manual_seed(3)
    y1 = fast_dropout(x, 0.25)
    torch.manual_seed(3)
    y2 = fast_dropout(x, 0.25)
    assert torch.equal(y1, y2)
    y1.sum().backward()
    expected = torch.where(y1 == 0, 0.0, 1 / 0.75)
    assert torch.allclose(x.grad, expected)
    assert fast_dropout(x, 0.25, training=False) is x


def test_module_is_identity_in_eval_and_random_in_train() -> None:
    drop = FastDropout(0.5)
    x = torch.ones(1000)
    assert torch.equal(drop.eval()(x), x)
    out = drop.train()(x)
    assert 0.4 < (out == 0).float().mean().item() < 0.6


def _tiny_model(dropout: float) -> TransformerEncoder:
    overrides = dict(TINY, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return TransformerEncoder(
        packaged_minilm_dir(),
        random_init=True,
        seed=0,
        config_overrides=overrides,
        fast_dropout=False,
    )


def test_install_swaps_every_dropout_and_attention() -> None:
    encoder = _tiny_model(0.1)
    swapped = install_fast_dropout(encoder.model)
    assert swapped == sum(isinstance(m, nn.Dropout) for m in encoder.model.modules())
    assert not any(type(m) is nn.Dropout for m in encoder.model.modules())
    assert encoder.model.config._attn_implementation == ATTENTION_NAME


def test_attention_math_path_matches_sdpa() -> None:
    """A drop probability below 1/65536 draws no drops, so the written-out attention
    (masking, softmax, values) must give SDPA's outputs, padding included."""
    reference = _tiny_model(1e-7)
    patched = copy.deepcopy(reference)
    install_fast_dropout(patched.model)
    ids = torch.randint(1000, 2000, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    mask[0, :] = 0  # a sequence of padding only: SDPA gives its rows zeros, not an average
    reference.train()
    patched.train()
    expected = reference(ids, mask)
    got = patched(ids, mask)
    for e, g in zip(expected, got):
        assert torch.allclose(e, g, atol=1e-5)


def test_encoder_default_installs_and_training_differs_per_seed() -> None:
    encoder = TransformerEncoder(
        packaged_minilm_dir(), random_init=True, seed=0, config_overrides=TINY
    )
    assert encoder.model.config._attn_implementation == ATTENTION_NAME
    ids = torch.randint(1000, 2000, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    encoder.eval()
    assert torch.equal(encoder(ids, mask)[-1], encoder(ids, mask)[-1])
    encoder.train()
    torch.manual_seed(1)
    a = encoder(ids, mask)[-1]
    torch.manual_seed(1)
    b = encoder(ids, mask)[-1]
    torch.manual_seed(2)
    c = encoder(ids, mask)[-1]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_models_off_the_attention_interface_keep_their_attention() -> None:
    """Custom model code (no transformers attention interface): dropout modules are swapped,
    the attention setting is left alone, nothing fails."""
    from types import SimpleNamespace

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = SimpleNamespace(_attn_implementation="sdpa")
            self.block = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2))

    model = Custom()
    assert install_fast_dropout(model) == 1
    assert isinstance(model.block[1], FastDropout) and model.block[1].p == 0.2
    assert model.config._attn_implementation == "sdpa"


def test_causal_default_goes_to_sdpa_as_in_transformers() -> None:
    """A module without ``is_causal`` and no mask is causal for transformers' SDPA function;
    the fast path must not treat it as bidirectional."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from nlp_transfer.encoders.fast_dropout import fast_dropout_attention

    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    module = SimpleNamespace(training=True)
    got, _ = fast_dropout_attention(module, q, k, v, None, dropout=1e-7)
    expected, _ = sdpa_attention_forward(module, q, k, v, None, dropout=0.0)
    assert torch.allclose(got, expected, atol=1e-6)


def test_pickled_model_runs_in_a_fresh_process(tmp_path) -> None:
    """ddp_spawn and process launchers unpickle models elsewhere: the attention name must be
    registered there too."""
    import pickle
    import subprocess
    import sys

    encoder = _tiny_model(0.1)
    install_fast_dropout(encoder.model)
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(encoder.model))
    code = (
        "import pickle, sys, torch\n"
        "m = pickle.load(open(sys.argv[1], 'rb')).train()\n"
        "out = m(input_ids=torch.randint(1000, 2000, (2, 6)), attention_mask=torch.ones(2, 6))\n"
        "print(m.config._attn_implementation, tuple(out.last_hidden_state.shape))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [ATTENTION_NAME, "(2,", "6,", "32)"]


def test_module_swaps_head_dropout_with_the_encoder_setting(make_cfg) -> None:
    from nlp_transfer.builders import build_encoder, build_module

    for fast in (True, False):
        cfg = make_cfg(f"encoder.fast_dropout={str(fast).lower()}", run=f"fast{fast}")
        module = build_module(cfg, build_encoder(cfg), ["neg", "pos"], "classification")
        module.setup("fit")
        kinds = {type(m) for m in module.modules() if isinstance(m, nn.Dropout)}
        assert kinds == ({FastDropout} if fast else {nn.Dropout})
