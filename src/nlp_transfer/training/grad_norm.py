"""The total 2-norm of many gradients, for clipping: one BLAS dot product per tensor.

``torch.nn.utils.get_total_norm`` computes one ``vector_norm`` per gradient (on CPU its
``foreach`` path is a loop of those). For MiniLM's 10.9M non-embedding gradients that took
1.56 ms per step on the benchmark CPU; a dot product of each flattened fp32 gradient with
itself took 1.04 ms and was closer to a float64 reference (relative error 5e-7 against
4e-6), so clipping scales by a slightly more accurate norm, a little sooner.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

_DOT_DTYPES = (torch.float32, torch.float64)


def _dot_friendly(t: torch.Tensor) -> bool:
    return (
        t.device.type == "cpu"
        and not t.is_sparse
        and t.dtype in _DOT_DTYPES
        and t.is_contiguous()
        and t.numel() > 0
    )


def total_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """2-norm of all ``tensors`` together (0 for none), as an fp32 0-d tensor.

    Dense contiguous fp32/fp64 CPU tensors go through ``torch.dot``, other CPU tensors
    (bf16, strided, sparse) through an fp32 ``vector_norm``, and tensors on other devices
    through ``torch.nn.utils.get_total_norm`` (its foreach kernels are fast there).
    """
    tensors = list(tensors)
    squares = [torch.dot(t.view(-1), t.view(-1)).float() for t in tensors if _dot_friendly(t)]
    rest = [t.coalesce().values() if t.is_sparse else t for t in tensors if not _dot_friendly(t)]
    rest = [t for t in rest if t.numel() > 0]
    squares += [
        torch.linalg.vector_norm(t, dtype=torch.float32).square()
        for t in rest
        if t.device.type == "cpu"
    ]
    elsewhere = [t for t in rest if t.device.type != "cpu"]
    if elsewhere:
        squares.append(torch.nn.utils.get_total_norm(elsewhere).float().square().cpu())
    if not squares:
        return torch.tensor(0.0)
    return torch.stack(squares).sum().sqrt()
