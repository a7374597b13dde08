"""Entity-level precision / recall / F1 for sequence labelling, identical to ``seqeval``.

Public API::

    EntityF1(labels, mode=None, scheme=None, ignore_index=-100)      # a torchmetrics.Metric
        .update(preds, target, mask=None)    # label ids [B, L] (or logits [B, L, C]) + mask
        .update_tags(preds, target)          # lists of tag strings, one list per sentence
        .compute() -> dict[str, Tensor]      # f1, precision, recall (micro), *_macro,
                                             # f1/<TYPE>, precision/<TYPE>, recall/<TYPE>,
                                             # support/<TYPE>
        .report() -> dict[str, dict[str, float]]   # per type, plain floats and counts
        .types -> list[str]                  # entity types, sorted (derived from labels)

``labels`` is the id -> tag list (``labels[i]`` is the tag of id ``i``). It fixes the entity
types, so the state is three ``[num_types]`` long tensors (true positives, predicted, gold)
reduced with ``sum`` across DDP processes.

Modes (the numbers equal ``seqeval.metrics`` on the same sequences):

* ``mode=None`` (default, conlleval-like, lenient): seqeval's ``get_entities``. A tag whose
  first letter is ``B``/``I``/``E``/``S``/``O`` is read like conlleval: ``I-X`` after ``O`` or
  after another type *starts* an ``X`` entity, and a type change ends one. Labels of either
  IOB1, IOB2 or BIOES can be scored.
* ``mode="strict", scheme="IOB2"`` (or ``"BIOES"``): seqeval's ``mode="strict"`` with
  ``scheme=IOB2`` / ``IOBES``. Only ``B-X`` (and ``S-X``) start entities; an ``I-X`` that does
  not continue a ``B-X``/``I-X`` of the same type belongs to no entity, i.e. **invalid BIO from
  a softmax head is dropped** (and, in BIOES, a ``B-X I-X`` run not closed by ``E-X`` counts
  nothing). A tag whose prefix the scheme does not allow raises ``ValueError`` when it occurs.

Scoring a softmax head: an invalid ``O I-PER I-PER`` prediction is one ``PER`` entity in the
default mode and none in strict mode, exactly as seqeval scores it.

Averages follow seqeval: micro sums counts over types; macro averages per-type scores over
the types that occur in gold or predictions. Where there is nothing to divide (no entity at
all), every score is ``0.0``; seqeval returns ``nan`` for the macro average in that single
case. Per-type keys exist for every type in ``labels`` (``0.0`` when absent).

Masking: positions where ``mask`` is False or ``target == ignore_index`` are removed and the
remaining positions of a row are read as one contiguous sentence (so window words not owned
by a window, labelled ``-100``, simply disappear). Entity extraction is vectorised over the
batch via lookup tables on ``(previous tag, tag)`` pairs; no Python loop over tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from nlp_transfer.errors import ConfigError

_DEFAULT_PREFIXES = frozenset("BIESO")
_STRICT_SCHEMES = {"IOB2": "IOB2", "BIO": "IOB2", "IOBES": "BIOES", "BIOES": "BIOES"}
_STRICT_PREFIXES = {"IOB2": frozenset("BIO"), "BIOES": frozenset("BIOES")}


def _lenient_parse(tag: str) -> tuple[str, str]:
    """seqeval ``get_entities``: prefix = first char, type = text after the first ``-``."""
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _strict_parse(tag: str) -> tuple[str, str]:
    """seqeval ``Token``: prefix = first char, type = the rest stripped of ``-``."""
    return tag[0], tag[1:].strip("-") or "_"


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """seqeval's ``end_of_chunk``: did a chunk end just before the current tag?"""
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """seqeval's ``start_of_chunk``: does a chunk start at the current tag?"""
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def _resolve_scheme(mode: str | None, scheme: Any) -> str | None:
    if mode is None:
        return None
    if mode != "strict":
        raise ConfigError(f"EntityF1 mode={mode!r} is not valid; choose one of [None, 'strict']")
    name = getattr(scheme, "__name__", scheme)  # accepts seqeval.scheme.IOB2 / IOBES too
    key = str(name).upper() if name is not None else None
    if key not in _STRICT_SCHEMES:
        raise ConfigError(
            f"EntityF1 mode='strict' needs scheme in {sorted(_STRICT_SCHEMES)}, got {scheme!r}"
        )
    return _STRICT_SCHEMES[key]


class _Tables:
    """Per-label lookup tables; index ``C`` (= number of labels) is the outside boundary."""

    def __init__(self, labels: Sequence[str], scheme: str | None) -> None:
        self.scheme = scheme
        parse = _lenient_parse if scheme is None else _strict_parse
        parsed = [parse(label) for label in labels] + [("O", "_")]
        self.types = sorted({t for p, t in parsed if p != "O"})
        type_index = {t: i for i, t in enumerate(self.types)}
        c = len(labels)
        self.type_of = torch.tensor([type_index.get(t, -1) if p != "O" else -1 for p, t in parsed])
        self.invalid = torch.zeros(c + 1, dtype=torch.bool)
        if scheme is None:
            bad = [label for label, (p, _) in zip(labels, parsed) if p not in _DEFAULT_PREFIXES]
            if bad:
                raise ConfigError(
                    f"EntityF1 cannot score labels {bad}: tags must start with one of "
                    "B, I, E, S, O (convert other schemes to BIOES first)"
                )
            self.start = torch.tensor(
                [[_start_of_chunk(p[0], q[0], p[1], q[1]) for q in parsed] for p in parsed]
            )
            self.end = torch.tensor(
                [[_end_of_chunk(p[0], q[0], p[1], q[1]) for q in parsed] for p in parsed]
            )
            return
        allowed = _STRICT_PREFIXES[scheme]
        self.invalid = torch.tensor([p not in allowed for p, _ in parsed])
        starters = ("B", "S") if scheme == "BIOES" else ("B",)
        inside_to = ("I", "E") if scheme == "BIOES" else ("I",)
        self.start = torch.tensor([p in starters for p, _ in parsed])
        self.start[c] = False
        self.inside = torch.tensor(
            [
                [p[0] in ("B", "I") and q[0] in inside_to and p[1] == q[1] for q in parsed]
                for p in parsed
            ]
        )
        closers = ("E", "S") if scheme == "BIOES" else ("B", "I")
        self.closes = torch.tensor([p in closers for p, _ in parsed])

    def to(self, device: torch.device) -> _Tables:
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self


def _pack(ids: torch.Tensor, mask: torch.Tensor, boundary: int) -> torch.Tensor:
    """Move the masked positions of each row to the front (order kept); pad with ``boundary``."""
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    packed = torch.gather(ids, 1, order)
    keep = torch.gather(mask, 1, order)
    return torch.where(keep, packed, torch.full_like(packed, boundary))


def extract_entities(
    packed: torch.Tensor, tables: _Tables
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entities of packed label ids ``[B, L]`` (padding = boundary id).

    Returns ``(row, start, end_exclusive, type_index)`` long tensors, one entry per entity.
    """
    batch, length = packed.shape
    boundary = torch.full((batch, 1), tables.type_of.numel() - 1, device=packed.device)
    ext = torch.cat([packed, boundary], dim=1)  # [B, L+1]: tag at position i
    prev = torch.cat([boundary, packed], dim=1)  # [B, L+1]: tag at position i-1
    if tables.scheme is None:
        starts = tables.start[prev, ext].nonzero()
        ends = tables.end[prev, ext].nonzero()
        if starts.shape[0] != ends.shape[0]:  # cannot happen for B/I/E/S/O prefixes
            raise RuntimeError("unbalanced chunk starts and ends")
        row, start, end = starts[:, 0], starts[:, 1], ends[:, 1]
        return row, start, end, tables.type_of[ext[row, start]]
    starts = tables.start[ext].nonzero()
    row, start = starts[:, 0], starts[:, 1]
    positions = torch.arange(length + 1, device=packed.device).expand(batch, -1)
    breaks = ~tables.inside[prev, ext]
    marked = torch.where(breaks, positions, torch.full_like(positions, length + 1))
    next_break = marked.flip(1).cummin(dim=1).values.flip(1)
    end = next_break[row, start + 1]
    valid = tables.closes[ext[row, end - 1]]
    row, start, end = row[valid], start[valid], end[valid]
    return row, start, end, tables.type_of[ext[row, start]]


class EntityF1(Metric):
    """Entity-level micro/macro P/R/F1 and a per-type report, equal to ``seqeval``.

    See the module docstring for modes, masking and how invalid BIO is scored.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    tp: torch.Tensor
    predicted: torch.Tensor
    gold: torch.Tensor

    def __init__(
        self,
        labels: Sequence[str],
        mode: str | None = None,
        scheme: Any = None,
        ignore_index: int = -100,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.labels = [str(label) for label in labels]
        if not self.labels:
            raise ConfigError("EntityF1 needs a non-empty id -> tag list")
        self.mode = mode
        self.scheme = _resolve_scheme(mode, scheme)
        self.ignore_index = ignore_index
        self._tables = _Tables(self.labels, self.scheme)
        self._index = {label: i for i, label in enumerate(self.labels)}
        self.types: list[str] = list(self._tables.types)
        n = len(self.types)
        self.add_state("tp", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("predicted", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("gold", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def _tables_on(self, device: torch.device) -> _Tables:
        if self._tables.type_of.device != device:
            self._tables.to(device)
        return self._tables

    def update(
        self,
        preds: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Add a batch: ``preds`` label ids ``[B, L]`` (or scores ``[B, L, C]``), ``target``
        label ids ``[B, L]``, optional bool ``mask`` ``[B, L]``."""
        if preds.dim() == target.dim() + 1:
            preds = preds.argmax(-1)
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ")
        if target.dim() == 1:
            preds, target = preds[None], target[None]
            mask = None if mask is None else mask[None]
        device = self.tp.device
        preds, target = preds.to(device).long(), target.to(device).long()
        keep = target != self.ignore_index
        if mask is not None:
            keep = keep & mask.to(device=device, dtype=torch.bool)
        num_labels = len(self.labels)
        for name, ids in (("preds", preds), ("target", target)):
            used = ids[keep]
            if used.numel() and (used.min() < 0 or used.max() >= num_labels):
                raise ValueError(f"{name} has label ids outside [0, {num_labels})")
        tables = self._tables_on(device)
        pred_packed = _pack(preds, keep, num_labels)
        gold_packed = _pack(target, keep, num_labels)
        if self.scheme is not None:
            for packed in (pred_packed, gold_packed):
                bad = tables.invalid[packed]
                if bad.any():
                    tag = self.labels[int(packed[bad][0])]
                    raise ValueError(
                        f"tag {tag!r} is not valid in strict {self.scheme} scoring "
                        f"(allowed prefixes: {sorted(_STRICT_PREFIXES[self.scheme])})"
                    )
        n_types = len(self.types)
        span = pred_packed.shape[1] + 2
        keys = []
        for packed, state in ((pred_packed, self.predicted), (gold_packed, self.gold)):
            row, start, end, type_ = extract_entities(packed, tables)
            state += torch.bincount(type_, minlength=n_types)
            keys.append(((row * span + start) * span + end) * n_types + type_)
        pred_keys, gold_keys = keys
        matched = torch.isin(pred_keys, gold_keys)
        pred_types = pred_keys % n_types if n_types else pred_keys
        self.tp += torch.bincount(pred_types[matched], minlength=n_types)

    def update_tags(self, preds: Sequence[Sequence[str]], target: Sequence[Sequence[str]]) -> None:
        """Add sentences given as tag strings (each tag must be in ``labels``)."""
        if len(preds) != len(target):
            raise ValueError(f"{len(preds)} predicted sentences but {len(target)} gold ones")
        length = max((len(s) for s in target), default=0)
        pred_ids = torch.full((len(target), length), self.ignore_index, dtype=torch.long)
        gold_ids = pred_ids.clone()
        for i, (p, g) in enumerate(zip(preds, target)):
            if len(p) != len(g):
                raise ValueError(f"sentence {i}: {len(p)} predicted tags but {len(g)} gold tags")
            try:
                pred_ids[i, : len(p)] = torch.tensor([self._index[t] for t in p], dtype=torch.long)
                gold_ids[i, : len(g)] = torch.tensor([self._index[t] for t in g], dtype=torch.long)
            except KeyError as err:
                raise ValueError(
                    f"sentence {i}: tag {err.args[0]!r} is not in the label list {self.labels}"
                ) from None
        self.update(pred_ids, gold_ids)

    def _scores(self) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        tp, predicted, gold = (s.tolist() for s in (self.tp, self.predicted, self.gold))

        def prf(t: int, p: int, g: int) -> tuple[float, float, float]:
            precision = t / p if p else 0.0
            recall = t / g if g else 0.0
            denom = precision + recall
            return precision, recall, (2 * precision * recall / denom if denom else 0.0)

        per_type = {}
        for name, t, p, g in zip(self.types, tp, predicted, gold):
            precision, recall, f1 = prf(t, p, g)
            per_type[name] = {
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "support": g,
                "predicted": p,
                "tp": t,
            }
        micro = prf(sum(tp), sum(predicted), sum(gold))
        seen = [s for s in per_type.values() if s["support"] or s["predicted"]]
        summary = {"precision": micro[0], "recall": micro[1], "f1": micro[2]}
        for key in ("precision", "recall", "f1"):
            summary[f"{key}_macro"] = sum(s[key] for s in seen) / len(seen) if seen else 0.0
        return summary, per_type

    def compute(self) -> dict[str, torch.Tensor]:
        """Micro/macro scores and per-type ``<score>/<TYPE>`` as scalar tensors."""
        summary, per_type = self._scores()
        out = {}
        for key, value in summary.items():
            out[key] = torch.tensor(value, device=self.tp.device)
        for name, scores in per_type.items():
            for key in ("precision", "recall", "f1"):
                out[f"{key}/{name}"] = torch.tensor(scores[key], device=self.tp.device)
            out[f"support/{name}"] = torch.tensor(scores["support"], device=self.tp.device)
        return out

    def report(self) -> dict[str, dict[str, float]]:
        """Per-type ``precision``/``recall``/``f1``/``support``/``predicted``/``tp`` plus
        ``"micro avg"`` and ``"macro avg"`` rows, as Python numbers (float64)."""
        summary, per_type = self._scores()
        report = dict(per_type)
        report["micro avg"] = {
            "precision": summary["precision"],
            "recall": summary["recall"],
            "f1": summary["f1"],
            "support": int(self.gold.sum()),
        }
        report["macro avg"] = {
            "precision": summary["precision_macro"],
            "recall": summary["recall_macro"],
            "f1": summary["f1_macro"],
            "support": int(self.gold.sum()),
        }
        return report


def sentence_counts(
    labels: Sequence[str],
    gold: Any,
    pred: Any,
    offsets: Any,
    mode: str | None = None,
    scheme: Any = None,
) -> Any:
    """Per-sentence ``[S, 3]`` int64 numpy counts ``(true positives, predicted, gold)`` of
    entities, scored exactly as :class:`EntityF1` (``gold``/``pred``: all words' tag ids
    concatenated; sentence ``i`` is ``[offsets[i]:offsets[i + 1]]``). Summing the rows and
    taking ``2 tp / (predicted + gold)`` gives the micro F1 of any subset of sentences."""
    import numpy as np

    tables = _Tables([str(label) for label in labels], _resolve_scheme(mode, scheme))
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    n, width = len(lengths), int(lengths.max(initial=0))
    inside = np.arange(width)[None, :] < lengths[:, None]
    span = width + 2
    out = np.zeros((n, 3), dtype=np.int64)
    keys = []
    for col, ids in ((1, pred), (2, gold)):
        grid = np.full((n, width), len(labels), dtype=np.int64)
        grid[inside] = np.asarray(ids, dtype=np.int64)
        row, start, end, type_ = extract_entities(torch.from_numpy(grid), tables)
        out[:, col] = np.bincount(row.numpy(), minlength=n)
        keys.append((row, ((row * span + start) * span + end) * (len(tables.types) + 1) + type_))
    (pred_rows, pred_keys), (_, gold_keys) = keys
    matched = torch.isin(pred_keys, gold_keys)
    out[:, 0] = np.bincount(pred_rows[matched].numpy(), minlength=n)
    return out
