"""SubwordPooling: vectorised first/last/mean/first_last against a loop reference."""

from __future__ import annotations

import pytest
import torch

from nlp_transfer.encoders.subword_pooling import POOLING_MODES, SubwordPooling
from nlp_transfer.errors import ConfigError


def _reference(features: torch.Tensor, word_map: torch.Tensor, num_words: int, mode: str):
    batch, _, hidden = features.shape
    width = 2 * hidden if mode == "first_last" else hidden
    out = torch.zeros(batch, num_words, width, dtype=features.dtype)
    for b in range(batch):
        for w in range(num_words):
            idx = (word_map[b] == w).nonzero().flatten()
            if len(idx) == 0:
                continue
            rows = features[b, idx]
            pooled = {
                "first": rows[0],
                "last": rows[-1],
                "mean": rows.mean(0),
                "first_last": torch.cat([rows[0], rows[-1]]),
            }[mode]
            out[b, w] = pooled
    return out


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_matches_reference(mode: str) -> None:
    torch.manual_seed(0)
    features = torch.randn(3, 9, 4)
    word_map = torch.tensor(
        [
            [-1, 0, 0, 1, 2, 2, 2, -1, -1],
            [-1, 0, 2, 2, 3, -1, -1, -1, -1],  # word 1 has no subtoken
            [-1, -1, -1, -1, -1, -1, -1, -1, -1],  # no words at all
        ]
    )
    pool = SubwordPooling(mode)
    out = pool(features, word_map, num_words=4)
    assert out.shape == (3, 4, pool.output_size(4))
    torch.testing.assert_close(out, _reference(features, word_map, 4, mode))
    assert torch.all(out[1, 1] == 0)


def test_gradients_and_ignored_indices() -> None:
    features = torch.randn(1, 5, 2, requires_grad=True)
    word_map = torch.tensor([[-1, 0, 1, 5, -1]])  # 5 >= num_words: ignored
    out = SubwordPooling("mean")(features, word_map, num_words=2)
    out.sum().backward()
    assert features.grad is not None
    assert features.grad[0, 3].abs().sum() == 0
    assert features.grad[0, 1].abs().sum() > 0
    assert SubwordPooling("first")(features, word_map, num_words=0).shape == (1, 0, 2)


def test_output_size_and_invalid_mode() -> None:
    assert SubwordPooling("first_last").output_size(8) == 16
    assert SubwordPooling("mean").output_size(8) == 8
    with pytest.raises(ConfigError, match=r"\['first', 'last', 'mean', 'first_last'\]"):
        SubwordPooling("max")
    with pytest.raises(ValueError, match="word_map has shape"):
        SubwordPooling()(torch.randn(1, 3, 2), torch.zeros(1, 4, dtype=torch.long), 1)
