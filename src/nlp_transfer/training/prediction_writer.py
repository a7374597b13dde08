"""A Lightning callback that writes the per-example predictions of a run's final evaluation.

:class:`PredictionWriter` sits in the trainer's callbacks for the whole run but collects
only while :attr:`~PredictionWriter.active` (``fit_and_score`` switches it on after ``fit``,
so it sees the best checkpoint's ``validate`` and ``test`` passes whose numbers go to
``metrics.json``, not the per-epoch validation). It reads what the module's metrics read:
the batch's labels and the predictions ``validation_step`` / ``test_step`` return.

- classification: one ``(example_id, gold, pred)`` per example;
- sequence labeling: word-level tags per sentence; windows of a long sentence are merged
  with :func:`~nlp_transfer.data.alignment.merge_window_predictions` (each word from the
  window that owns it), and words labelled ``-100`` are dropped, exactly as
  :class:`~nlp_transfer.metrics.entity.EntityF1` drops them.

At the end of each epoch the rows are gathered from every DDP process (duplicates that a
distributed sampler pads in are dropped), ordered by example index, and rank 0 writes
``predictions/[<task>/]<split>.npz`` (see :mod:`nlp_transfer.training.predictions`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pytorch_lightning import Callback, LightningModule, Trainer

from nlp_transfer.data.alignment import IGNORE_INDEX, merge_window_predictions
from nlp_transfer.training.predictions import Predictions, write_predictions

if TYPE_CHECKING:
    from nlp_transfer.module import TransferCore

log = logging.getLogger(__name__)

INDEX_KEYS = {"classification": "example_id", "sequence_labeling": "sentence_id"}


def _task_of(pl_module: TransferCore, batch: dict[str, Any]) -> tuple[str | None, str, list]:
    """``(task name or None, task type, labels)`` of a batch (``TransferCore.task_for``)."""
    name, task = pl_module.task_for(batch)
    return name, task.name, list(task.labels)


def _gather(rows: list[Any]) -> list[Any] | None:
    """Every process's rows on rank 0 (None elsewhere); the rows as they are without DDP."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return rows
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    if dist.get_rank() != 0:
        return None
    return [r for part in gathered for r in part]


class PredictionWriter(Callback):
    """Collect ``(index, gold, pred)`` of the final validate / test passes and write them.

    Args:
        run_dir: the run's output folder (files go to ``run_dir/predictions``).
        active: collect from the start (tests); ``fit_and_score`` sets it after ``fit``.
    """

    def __init__(self, run_dir: str | Path, active: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.active = active
        self.written: list[Path] = []
        # (split, task name) -> task type, labels, rows
        self._rows: dict[tuple[str, str | None], dict[str, Any]] = {}
        self._warned = False

    # -- collecting ------------------------------------------------------------------------
    def _collect(self, split: str, pl_module: LightningModule, outputs: Any, batch: Any) -> None:
        if not self.active or not isinstance(batch, dict):
            return
        preds = outputs.get("preds") if isinstance(outputs, dict) else outputs
        name, kind, labels = _task_of(pl_module, batch)
        index_key = INDEX_KEYS[kind]
        if not isinstance(preds, torch.Tensor) or index_key not in batch:
            if not self._warned:
                log.warning(
                    "predictions: the %s batches have no %r (or the step returned no "
                    "predictions); no predictions file is written for them",
                    kind,
                    index_key,
                )
                self._warned = True
            return
        entry = self._rows.setdefault((split, name), {"kind": kind, "labels": labels, "rows": []})
        preds, gold = preds.detach().cpu(), batch["labels"].detach().cpu()
        index = batch[index_key].detach().cpu()
        if kind == "classification":
            entry["rows"].extend(zip(index.tolist(), gold.tolist(), preds.tolist()))
            return
        word_mask = batch["word_mask"].detach().cpu().bool()
        owned = batch["owned_mask"].detach().cpu().bool()
        offset = batch["word_offset"].detach().cpu()
        whole = (offset == 0) & (word_mask.sum(1) == batch["sentence_words"].detach().cpu())
        for i in range(len(index)):
            n = int(word_mask[i].sum())
            if bool(whole[i]):
                keep = word_mask[i] & (gold[i] != IGNORE_INDEX)
                row = (int(index[i]), gold[i][keep].tolist(), preds[i][keep].tolist())
            else:  # a window: merged at the epoch's end
                row = (
                    int(index[i]),
                    int(offset[i]),
                    owned[i, :n].tolist(),
                    preds[i, :n].tolist(),
                    gold[i, :n].tolist(),
                )
            entry["rows"].append(row)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._collect("val", pl_module, outputs, batch)

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collect("test", pl_module, outputs, batch)

    # -- writing ---------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write("val", trainer)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write("test", trainer)

    def _write(self, split: str, trainer: Trainer) -> None:
        if not self.active:
            return
        keys = sorted((k for k in self._rows if k[0] == split), key=lambda k: str(k[1]))
        for key in keys:  # same order on every process: each gather is a collective
            entry = self._rows.pop(key)
            rows = _gather(entry["rows"])
            if rows is None or not trainer.is_global_zero:
                continue
            preds = build_predictions(entry["kind"], entry["labels"], rows)
            path = write_predictions(self.run_dir, split, preds, task=key[1])
            self.written.append(path)
            log.info("predictions: %d examples -> %s", preds.num_examples, path)


def build_predictions(kind: str, labels: list[str], rows: list[Any]) -> Predictions:
    """:class:`Predictions` from collected rows, ordered by example index; a row seen twice
    (a distributed sampler's padding) counts once."""
    if kind == "classification":
        unique = dict((int(i), (g, p)) for i, g, p in rows)
        order = sorted(unique)
        return Predictions(
            task=kind,
            labels=labels,
            index=np.asarray(order, dtype=np.int64),
            gold=np.asarray([unique[i][0] for i in order], dtype=np.int32),
            pred=np.asarray([unique[i][1] for i in order], dtype=np.int32),
        )
    sentences: dict[int, tuple[list[int], list[int]]] = {}
    windows: dict[tuple[int, int], tuple[Any, ...]] = {}
    for row in rows:
        if len(row) == 3:
            sentences[row[0]] = (row[1], row[2])
        else:
            windows[(row[0], row[1])] = row
    if windows:
        sids, offsets, owned, pred, gold = zip(*windows.values())
        merged_pred = merge_window_predictions(pred, sids, offsets, owned)
        merged_gold = merge_window_predictions(gold, sids, offsets, owned)
        for sid, tags in merged_gold.items():
            keep = [j for j, t in enumerate(tags) if t != IGNORE_INDEX]
            sentences[sid] = ([tags[j] for j in keep], [merged_pred[sid][j] for j in keep])
    order = sorted(sentences)
    return Predictions.from_sequences(
        labels,
        [sentences[s][0] for s in order],
        [sentences[s][1] for s in order],
        index=order,
    )
