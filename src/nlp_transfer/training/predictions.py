"""Per-example predictions of a run: the contract between training and sweep statistics.

Every run writes ``<run dir>/predictions/<split>.npz`` (``val``, ``test``) next to
``metrics.json``; aggregation reads them back for example-level bootstraps and paired tests.
A multi-task run writes one folder per task: ``predictions/<task>/<split>.npz``.

One file per split, compressed numpy arrays (a CoNLL-2003 test split is ~100 KB), so a sweep
of hundreds of jobs can afford them:

- ``index``: int64 ``[N]``, the example's position in the split as read (file order);
- ``gold``, ``pred``: int32 label ids; ``[N]`` for classification, all words of all
  sentences concatenated for sequence labeling;
- ``offsets``: int64 ``[N + 1]`` for sequence labeling (sentence ``i``'s word-level tags are
  ``gold[offsets[i]:offsets[i + 1]]``), absent for classification;
- ``labels``: the label (tag) vocabulary the ids index;
- ``task``: ``classification`` or ``sequence_labeling``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nlp_transfer.utils.io import write_atomically

TASKS = ("classification", "sequence_labeling")
SPLITS = ("val", "test")
FOLDER = "predictions"


@dataclass(frozen=True)
class Predictions:
    """Gold and predicted label ids of one split of one run."""

    task: str
    labels: list[str]
    index: np.ndarray
    gold: np.ndarray
    pred: np.ndarray
    offsets: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.gold.shape != self.pred.shape:
            raise ValueError(f"gold {self.gold.shape} and pred {self.pred.shape} differ")
        if self.task == "sequence_labeling":
            if self.offsets is None or len(self.offsets) != len(self.index) + 1:
                raise ValueError("sequence labeling predictions need offsets of length N + 1")
            if int(self.offsets[-1]) != len(self.gold):
                raise ValueError("offsets[-1] must equal the number of words")
        elif len(self.gold) != len(self.index):
            raise ValueError("classification predictions need one gold/pred per example")

    @property
    def num_examples(self) -> int:
        return len(self.index)

    def sentences(self) -> list[tuple[list[str], list[str]]]:
        """Sequence labeling: (gold tags, predicted tags) per sentence, as strings."""
        if self.offsets is None:
            raise ValueError("sentences() is for sequence labeling predictions")
        names = np.asarray(self.labels, dtype=object)
        return [
            (list(names[self.gold[a:b]]), list(names[self.pred[a:b]]))
            for a, b in zip(self.offsets[:-1], self.offsets[1:])
        ]

    @classmethod
    def from_sequences(
        cls,
        labels: Sequence[str],
        gold: Sequence[Sequence[int]],
        pred: Sequence[Sequence[int]],
        index: Sequence[int] | None = None,
    ) -> Predictions:
        """Sequence labeling predictions from per-sentence lists of tag ids."""
        lengths = [len(g) for g in gold]
        if [len(p) for p in pred] != lengths:
            raise ValueError("gold and predicted sentences differ in length")
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = lambda seqs: np.fromiter(  # noqa: E731
            (t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1])
        )
        return cls(
            task="sequence_labeling",
            labels=list(labels),
            index=np.arange(len(lengths), dtype=np.int64)
            if index is None
            else np.asarray(index, dtype=np.int64),
            gold=flat(gold),
            pred=flat(pred),
            offsets=offsets,
        )


def predictions_path(run_dir: str | Path, split: str, task: str | None = None) -> Path:
    """``<run_dir>/predictions/[<task>/]<split>.npz`` (``task``: a multi-task run's task)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder = Path(run_dir) / FOLDER
    if task is not None:
        if not task or task in (".", "..") or "/" in task or "\\" in task:
            raise ValueError(f"task name {task!r} cannot name a predictions folder")
        folder = folder / task
    return folder / f"{split}.npz"


def write_predictions(
    run_dir: str | Path, split: str, preds: Predictions, task: str | None = None
) -> Path:
    """Write one split's predictions atomically (temp file, fsync, rename)."""
    path = predictions_path(run_dir, split, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "task": np.asarray(preds.task),
        "labels": np.asarray(preds.labels, dtype=str),
        "index": preds.index.astype(np.int64, copy=False),
        "gold": preds.gold.astype(np.int32, copy=False),
        "pred": preds.pred.astype(np.int32, copy=False),
    }
    if preds.offsets is not None:
        arrays["offsets"] = preds.offsets.astype(np.int64, copy=False)

    def save(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: np.savez would add ".npz" to a name
            np.savez_compressed(f, **arrays)

    write_atomically(path, save)
    return path


def read_predictions(path: str | Path) -> Predictions:
    """Read one ``<split>.npz`` file (no pickles: ``allow_pickle=False``)."""
    with np.load(path, allow_pickle=False) as z:
        return Predictions(
            task=str(z["task"]),
            labels=[str(s) for s in z["labels"]],
            index=z["index"],
            gold=z["gold"],
            pred=z["pred"],
            offsets=z["offsets"] if "offsets" in z.files else None,
        )


def load_run_predictions(run_dir: str | Path, task: str | None = None) -> dict[str, Predictions]:
    """The splits a run (or one task of a multi-task run) wrote predictions for (possibly
    none)."""
    out = {}
    for split in SPLITS:
        path = predictions_path(run_dir, split, task)
        if path.is_file():
            out[split] = read_predictions(path)
    return out


def prediction_tasks(run_dir: str | Path) -> list[str]:
    """Task names of a multi-task run's predictions (sub-folders), sorted; ``[]`` otherwise."""
    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and any(p.glob("*.npz")))
