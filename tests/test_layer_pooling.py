"""LayerPooling: output shapes per mode, scalar-mix weights, validation."""

from __future__ import annotations

import pytest
import torch

from nlp_transfer.encoders.layer_pooling import MODES, LayerPooling

N, B, T, H = 5, 2, 3, 4  # hidden states (embeddings + 4 layers), batch, tokens, size


def hidden_states() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, T, H, generator=gen) for _ in range(N))


@pytest.mark.parametrize(
    ("mode", "kwargs", "size"),
    [
        ("last", {}, H),
        ("layer", {"layer": 0}, H),
        ("layer", {"layer": -2}, H),
        ("sum_last_k", {"k": 3}, H),
        ("concat_last_k", {"k": 3}, 3 * H),
        ("scalar_mix", {}, H),
    ],
)
def test_output_shapes(mode: str, kwargs: dict[str, int], size: int) -> None:
    pool = LayerPooling(mode, num_hidden_states=N, hidden_size=H, **kwargs)
    out = pool(hidden_states())
    assert pool.output_size == size
    assert out.shape == (B, T, size)


def test_mode_values() -> None:
    hs = hidden_states()
    kw = {"num_hidden_states": N, "hidden_size": H}
    assert torch.equal(LayerPooling("last", **kw)(hs), hs[-1])
    assert torch.equal(LayerPooling("layer", layer=1, **kw)(hs), hs[1])
    assert torch.equal(LayerPooling("layer", layer=-2, **kw)(hs), hs[3])
    torch.testing.assert_close(LayerPooling("sum_last_k", k=2, **kw)(hs), hs[3] + hs[4])
    assert torch.equal(LayerPooling("concat_last_k", k=2, **kw)(hs), torch.cat(hs[3:], -1))
    mix = LayerPooling("scalar_mix", **kw)  # equal weights at init: the mean
    torch.testing.assert_close(mix(hs), torch.stack(hs).mean(0))


def test_scalar_mix_weights_train_and_sum_to_one() -> None:
    pool = LayerPooling("scalar_mix", num_hidden_states=N, hidden_size=H)
    before = pool.weights().detach().clone()
    torch.testing.assert_close(before.sum(), torch.tensor(1.0))
    optimizer = torch.optim.AdamW(pool.parameters(), lr=0.1)
    target = hidden_states()[1]
    loss = (pool(hidden_states()) - target).pow(2).mean()
    loss.backward()
    optimizer.step()
    after = pool.weights().detach()
    assert not torch.equal(before, after)
    assert pool.gamma.item() != 1.0
    torch.testing.assert_close(after.sum(), torch.tensor(1.0))
    assert after[1] > before[1]  # moved toward the target layer


def test_invalid_arguments() -> None:
    kw = {"num_hidden_states": N, "hidden_size": H}
    with pytest.raises(ValueError, match="valid modes") as err:
        LayerPooling("mean_of_everything", **kw)
    assert all(m in str(err.value) for m in MODES)
    with pytest.raises(ValueError, match=r"-5\.\.4"):
        LayerPooling("layer", layer=5, **kw)
    with pytest.raises(ValueError, match="needs layer"):
        LayerPooling("layer", **kw)
    with pytest.raises(ValueError, match=r"k in 1\.\.5"):
        LayerPooling("concat_last_k", k=6, **kw)
    with pytest.raises(ValueError, match="scalar_mix"):
        LayerPooling("last", **kw).weights()
    with pytest.raises(ValueError, match="expects 5 hidden states"):
        LayerPooling("last", **kw)(hidden_states()[:3])


@pytest.mark.parametrize(
    ("mode", "kwargs", "expected"),
    [
        ("last", {}, ([-1], "concat")),
        ("layer", {"layer": 0}, ([0], "concat")),
        ("sum_last_k", {"k": 2}, ([-2, -1], "sum")),
        ("concat_last_k", {"k": 3}, ([-3, -2, -1], "concat")),
        ("scalar_mix", {}, (list(range(N)), "mix")),
    ],
)
def test_selection_names_what_forward_reads(mode: str, kwargs: dict, expected: tuple) -> None:
    """The layers a pooling declares are the ones its output depends on (the sklearn heads
    pool cached features by this declaration)."""
    pool = LayerPooling(mode, num_hidden_states=N, hidden_size=H, **kwargs)
    assert pool.selection() == expected
    layers, _ = expected
    hidden = hidden_states()
    changed = tuple(
        h + 1.0 if i not in {j % N for j in layers} else h for i, h in enumerate(hidden)
    )
    assert torch.equal(pool(hidden), pool(changed))  # the other hidden states do not matter
