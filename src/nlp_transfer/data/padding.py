"""Right-padding of token rows into one ``long`` tensor: the collate functions' hot loop."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_to(
    seqs: Sequence[Sequence[int] | torch.Tensor], value: int, width: int | None = None
) -> torch.Tensor:
    """``[len(seqs), width]`` long tensor of the rows, right-padded with ``value``.

    ``width`` defaults to the longest row; a longer row raises ``ValueError``. Tensors and
    numpy arrays are read with ``tolist()``. The rows are padded as Python lists and converted
    with one ``torch.tensor`` call: about three times faster per batch than filling a tensor
    row by row (one small tensor and one slice assignment per row).
    """
    rows = [row.tolist() if hasattr(row, "tolist") else list(row) for row in seqs]
    longest = max((len(r) for r in rows), default=0)
    if width is None:
        width = longest
    elif longest > width:
        raise ValueError(f"a row of {longest} values does not fit the padded width {width}")
    if not rows or width == 0:
        return torch.full((len(rows), width), value, dtype=torch.long)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)
