"""Label vocabulary: built from the training split, stored with the model."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from nlp_transfer.errors import DataError


class LabelVocab:
    """An ordered, immutable label ↔ id mapping."""

    def __init__(self, labels: Sequence[str]) -> None:
        if len(set(labels)) != len(labels):
            raise ValueError(f"duplicate labels in {list(labels)}")
        self.labels: list[str] = [str(x) for x in labels]
        self._index = {label: i for i, label in enumerate(self.labels)}

    @classmethod
    def from_labels(cls, labels: Iterable[str]) -> LabelVocab:
        """Sorted unique labels: deterministic whatever the order of the data."""
        return cls(sorted({str(x) for x in labels}))

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, label: object) -> bool:
        return label in self._index

    def encode(self, label: str, source: str = "") -> int:
        try:
            return self._index[str(label)]
        except KeyError:
            raise DataError(
                f"{source}: label {label!r} does not occur in the training data; "
                f"known labels: {self.labels}. Add examples of it to train, or remove it."
            ) from None

    def decode(self, index: int) -> str:
        return self.labels[index]
