"""Linear-chain CRF (own implementation) and a CRF word-labelling head.

Public API::

    allowed_transitions(labels, scheme) -> (transitions [C, C], start [C], end [C])  # bool
    LinearChainCRF(num_labels, allowed=None)
        .nll(emissions [B, T, C], tags [B, T], mask [B, T], reduction="mean") -> Tensor
        .log_partition(emissions, mask) -> [B]
        .score(emissions, tags, mask) -> [B]
        .viterbi(emissions, mask) -> LongTensor [B, T]
        .marginals(emissions, mask) -> [B, T, C]
    CRFHead(input_size, num_labels, labels=None, scheme="IOB2", constrained=False,
            hidden_dim=None, dropout=0.1, activation="gelu")
        .forward(features [B, W, H], mask) -> emissions [B, W, C]
        .loss(emissions, labels [B, W] (-100 = ignore), mask) -> scalar
        .decode(emissions, mask) -> LongTensor [B, W]
        .probabilities(emissions, mask) -> [B, W, C]    # CRF marginals

Scores: ``start[y_0] + sum_t emissions[t, y_t] + sum_t transitions[y_{t-1}, y_t] + end[y_last]``
over the positions where ``mask`` is True. **Masks need not be prefixes**: the selected
positions of each row are read as one contiguous chain (the others are skipped, not broken).
``CRFHead.loss`` uses ``mask & (labels != -100)``, so window words that belong to another
window (label ``-100``, see :mod:`nlp_transfer.data.alignment`) are left out of the chain while
still having given context to the encoder; ``decode`` uses ``mask`` alone and labels every
word. Rows with no selected position contribute zero loss and are excluded from the mean.

Constraints (``constrained=True``) add ``-10000`` to forbidden start/transition/end scores
(finite, so a gold path that breaks them still has a finite loss); the learnable scores are
unaffected. Rules: IOB2: no ``O->I-X``, ``B-X->I-Y``, ``I-X->I-Y``, ``start->I-X``. IOB1:
``B-X`` only after ``B-X``/``I-X``, never at the start. BIOES: after ``B-X``/``I-X`` only
``I-X``/``E-X``; after ``O``/``E-*``/``S-*``/start only ``O``/``B-*``/``S-*``; the end only
after ``O``/``E-*``/``S-*``. CRF arithmetic runs in float32 whatever the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nlp_transfer.errors import ConfigError
from nlp_transfer.heads.token import IGNORE_INDEX, build_classifier
from nlp_transfer.tagging import PREFIXES, normalize_scheme, split_tag

FORBIDDEN = -10000.0


def allowed_transitions(
    labels: Sequence[str], scheme: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boolean ``(transitions[from, to], start[to], end[from])`` allowed by ``scheme``."""
    scheme = normalize_scheme(scheme)
    parsed = []
    for label in labels:
        prefix, type_ = split_tag(label)
        if prefix not in PREFIXES[scheme] or (prefix != "O") != (type_ is not None):
            raise ConfigError(f"label {label!r} is not a valid {scheme} tag")
        parsed.append((prefix, type_))

    def ok(prev: tuple[str, str | None] | None, cur: tuple[str, str | None] | None) -> bool:
        # prev None = sentence start, cur None = sentence end
        p_prefix, p_type = prev if prev is not None else ("O", None)
        c_prefix, c_type = cur if cur is not None else ("O", None)
        if scheme == "IOB2":
            return c_prefix != "I" or (p_prefix in ("B", "I") and p_type == c_type)
        if scheme == "IOB1":
            if c_prefix == "B":
                return prev is not None and p_prefix in ("B", "I") and p_type == c_type
            return True
        if p_prefix in ("B", "I"):
            return c_prefix in ("I", "E") and p_type == c_type
        return c_prefix in ("O", "B", "S")

    transitions = torch.tensor([[ok(p, c) for c in parsed] for p in parsed], dtype=torch.bool)
    start = torch.tensor([ok(None, c) for c in parsed], dtype=torch.bool)
    end = torch.tensor([ok(p, None) for p in parsed], dtype=torch.bool)
    return transitions, start, end


def _compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutation moving each row's selected positions to the front (order kept) and the
    resulting prefix mask."""
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    lengths = mask.sum(1, keepdim=True)
    packed = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths
    return order, packed


class LinearChainCRF(nn.Module):
    """Linear-chain CRF over ``num_labels`` tags with optional hard constraints."""

    def __init__(
        self,
        num_labels: int,
        allowed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.transitions = nn.Parameter(torch.zeros(num_labels, num_labels))
        self.start = nn.Parameter(torch.zeros(num_labels))
        self.end = nn.Parameter(torch.zeros(num_labels))
        nn.init.uniform_(self.transitions, -0.1, 0.1)
        if allowed is None:
            allowed = (
                torch.ones(num_labels, num_labels, dtype=torch.bool),
                torch.ones(num_labels, dtype=torch.bool),
                torch.ones(num_labels, dtype=torch.bool),
            )
        names = ("transition_penalty", "start_penalty", "end_penalty")
        shapes = ((num_labels, num_labels), (num_labels,), (num_labels,))
        for name, ok, shape in zip(names, allowed, shapes):
            if tuple(ok.shape) != shape:
                raise ValueError(f"{name}: constraint shape {tuple(ok.shape)} != {shape}")
            penalty = torch.zeros(shape).masked_fill(~ok.bool(), FORBIDDEN)
            self.register_buffer(name, penalty)

    def _scores(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            self.transitions.float() + self.transition_penalty,
            self.start.float() + self.start_penalty,
            self.end.float() + self.end_penalty,
        )

    def _prepare(
        self, emissions: torch.Tensor, mask: torch.Tensor | None, *others: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Compact masked positions to the front; returns emissions, prefix mask, order."""
        if mask is None:
            mask = torch.ones(emissions.shape[:2], dtype=torch.bool, device=emissions.device)
        mask = mask.to(device=emissions.device, dtype=torch.bool)
        order, packed_mask = _compact(mask)
        idx = order.unsqueeze(-1).expand(-1, -1, emissions.shape[-1])
        packed = torch.gather(emissions.float(), 1, idx)
        moved = [torch.gather(o, 1, order) for o in others]
        return packed, packed_mask, order, moved

    def _forward_algorithm(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        transitions, start, end = self._scores()
        score = start + emissions[:, 0]
        for t in range(1, emissions.shape[1]):
            step = torch.logsumexp(score.unsqueeze(2) + transitions, dim=1) + emissions[:, t]
            score = torch.where(mask[:, t, None], step, score)
        return torch.logsumexp(score + end, dim=1)

    def log_partition(
        self, emissions: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``log Z`` per row ``[B]`` (0 for rows without selected positions)."""
        packed, packed_mask, _, _ = self._prepare(emissions, mask)
        if packed.shape[1] == 0:
            return packed.new_zeros(packed.shape[0])
        log_z = self._forward_algorithm(packed, packed_mask)
        return log_z.masked_fill(~packed_mask[:, 0], 0.0)

    def score(
        self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Unnormalised score of the path ``tags`` per row ``[B]``."""
        packed, packed_mask, _, (tags,) = self._prepare(emissions, mask, tags)
        if packed.shape[1] == 0:
            return packed.new_zeros(packed.shape[0])
        transitions, start, end = self._scores()
        tags = tags.long().masked_fill(~packed_mask, 0)
        valid = packed_mask.float()
        emit = torch.gather(packed, 2, tags.unsqueeze(-1)).squeeze(-1)
        total = (emit * valid).sum(1) + start[tags[:, 0]]
        pairs = transitions[tags[:, :-1], tags[:, 1:]]
        total = total + (pairs * valid[:, 1:]).sum(1)
        lengths = packed_mask.sum(1)
        last = tags.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        total = total + end[last]
        return total.masked_fill(lengths == 0, 0.0)

    def nll(
        self,
        emissions: torch.Tensor,
        tags: torch.Tensor,
        mask: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Negative log-likelihood; ``reduction`` in ``mean`` (over non-empty rows), ``sum``,
        ``none``."""
        if reduction not in ("mean", "sum", "none"):
            raise ConfigError(f"reduction={reduction!r}: choose one of ['mean', 'sum', 'none']")
        if mask is None:
            mask = torch.ones(emissions.shape[:2], dtype=torch.bool, device=emissions.device)
        losses = self.log_partition(emissions, mask) - self.score(emissions, tags, mask)
        if reduction == "none":
            return losses
        if reduction == "sum":
            return losses.sum()
        rows = mask.bool().any(1)
        return losses.sum() / rows.sum().clamp(min=1)

    def viterbi(self, emissions: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Best path ``[B, T]`` (vectorised over the batch); unselected positions arbitrary."""
        packed, packed_mask, order, _ = self._prepare(emissions, mask)
        batch, length, num_labels = packed.shape
        if length == 0:
            return torch.zeros(batch, 0, dtype=torch.long, device=emissions.device)
        transitions, start, end = self._scores()
        identity = torch.arange(num_labels, device=packed.device).expand(batch, -1)
        score = start + packed[:, 0]
        history = []
        for t in range(1, length):
            best, pointer = (score.unsqueeze(2) + transitions).max(dim=1)
            step = best + packed[:, t]
            keep = packed_mask[:, t, None]
            score = torch.where(keep, step, score)
            history.append(torch.where(keep, pointer, identity))
        tag = (score + end).argmax(dim=1)
        path = [tag]
        for pointer in reversed(history):
            tag = pointer.gather(1, tag.unsqueeze(1)).squeeze(1)
            path.append(tag)
        packed_path = torch.stack(path[::-1], dim=1)
        out = torch.zeros_like(packed_path)
        return out.scatter_(1, order, packed_path)

    def marginals(self, emissions: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior marginals ``p(y_t = c)`` ``[B, T, C]`` (gradient of ``log Z``)."""
        with torch.enable_grad():
            leaf = emissions.detach().float().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_partition(leaf, mask).sum(), leaf)
        return grad


class CRFHead(nn.Module):
    """Emission classifier (linear or MLP, as :class:`TokenHead`) followed by a linear-chain CRF.

    ``labels`` (the id -> tag list) and ``scheme`` are needed when ``constrained=True``.
    """

    task = "sequence_labeling"  # the task it fits (checked at start: nlp_transfer.validation)
    context_args = ("labels",)  # nlp_transfer.heads.base.HEAD_CONTEXT

    def __init__(
        self,
        input_size: int,
        num_labels: int,
        labels: Sequence[str] | None = None,
        scheme: str = "IOB2",
        constrained: bool = False,
        hidden_dim: int | None = None,
        dropout: float = 0.1,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.classifier = build_classifier(input_size, num_labels, hidden_dim, dropout, activation)
        allowed = None
        if constrained:
            if labels is None or len(labels) != num_labels:
                raise ConfigError(
                    f"CRFHead(constrained=True) needs the {num_labels} labels (id -> tag list), "
                    f"got {None if labels is None else len(labels)}"
                )
            allowed = allowed_transitions(labels, scheme)
        self.crf = LinearChainCRF(num_labels, allowed)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Word features ``[B, W, H]`` -> emission scores ``[B, W, C]``."""
        return self.classifier(features)

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """CRF NLL over the chain of words with ``mask`` True and ``labels != -100``,
        averaged over rows that have such words."""
        keep = labels != IGNORE_INDEX
        if mask is not None:
            keep = keep & mask.bool()
        return self.crf.nll(logits, labels.masked_fill(~keep, 0), keep)

    def decode(self, logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Viterbi label ids ``[B, W]`` over the words selected by ``mask``."""
        return self.crf.viterbi(logits, mask)

    def probabilities(self, logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """CRF posterior marginals per word ``[B, W, C]``."""
        return self.crf.marginals(logits, mask)
