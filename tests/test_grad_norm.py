"""total_norm: the clipping norm from dot products, as get_total_norm computes it."""

from __future__ import annotations

import pytest
import torch

from nlp_transfer.training.grad_norm import total_norm


def test_total_norm_matches_get_total_norm_for_every_kind_of_tensor() -> None:
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(300, 40, generator=g)
    tensors = [
        dense,
        torch.randn(40, 30, generator=g).t(),  # not contiguous: vector_norm path
        torch.randn(77, generator=g).to(torch.bfloat16),
        torch.randn(5, 3, generator=g).double(),
        torch.empty(0),
    ]
    expected = torch.nn.utils.get_total_norm([t.float() for t in tensors])
    assert float(total_norm(tensors)) == pytest.approx(float(expected), rel=1e-6)
    assert total_norm(tensors).dtype == torch.float32
    sparse = torch.sparse_coo_tensor(torch.tensor([[1, 1, 4]]), torch.ones(3, 2), (6, 2))
    assert float(total_norm([sparse])) == pytest.approx((4 + 4 + 1 + 1) ** 0.5)
    assert float(total_norm([])) == 0.0
    # more accurate than a float32 vector_norm: compare with float64
    exact = float(torch.linalg.vector_norm(dense.double()))
    assert abs(float(total_norm([dense])) - exact) / exact < 1e-6
