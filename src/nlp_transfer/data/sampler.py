"""Length-grouped batches for training: little padding, random order, DDP-aware.

Public API::

    LengthGroupedBatchSampler(sampler=None, *, lengths, batch_size, num_replicas=None,
                              rank=None, seed=None, shuffle=True, drop_last=False,
                              megabatch_mult=50, longest_first=True)
        .set_epoch(epoch) / .state_dict() / .load_state_dict(state)
        .resume_at(epoch, batches_done)      # mid-epoch resume: skip the trained batches
        .batches() -> list[list[int]]        # this rank's batches for the current epoch
    lengths_of(dataset, column="input_ids") -> list[int]
    padding_stats(batches, lengths) -> (real_tokens, padded_tokens)

How an epoch is built (everything follows from ``(seed, epoch)``, so the order of any epoch
can be recomputed on resume and every rank computes the same global plan):

1. a seeded permutation of all indices (``shuffle=False``: ``0..n-1``);
2. the permutation is padded (repeating its head) to a multiple of the world size, or, with
   ``drop_last``, cut to a whole number of global batches (``batch_size * num_replicas``);
3. it is cut into *megabatches* of ``megabatch_mult`` global batches, each sorted by length
   (longest first; ties keep the permuted order);
4. each megabatch is cut into global batches; the global batches are shuffled (the one
   holding the longest example first with ``longest_first``, so out-of-memory shows up at
   step 0);
5. every global batch is split into ``num_replicas`` contiguous slices: rank ``r`` gets
   slice ``r``. At each step all ranks thus hold examples of about the same length, so no
   rank waits long for another at the gradient all-reduce.

Ranks always get the same number of batches. ``drop_last=False`` (default): no example is
lost; when ``n`` is not a multiple of ``num_replicas`` up to ``num_replicas - 1`` examples
are seen twice (as :class:`torch.utils.data.DistributedSampler` does), and the last batch
of each rank may be smaller than ``batch_size``. ``drop_last=True``: every batch is full and
up to ``batch_size * num_replicas - 1`` randomly chosen examples are skipped that epoch.

With Lightning, build it inside ``train_dataloader``: under DDP with
``use_distributed_sampler=True`` Lightning re-creates the batch sampler with a
:class:`~torch.utils.data.DistributedSampler` as ``sampler``; only that sampler's
``num_replicas`` and ``rank`` are read (its own order is ignored). Lightning 2.x calls
``set_epoch`` on ``loader.sampler`` and ``loader.batch_sampler.sampler``, never on the batch
sampler itself, so the batch sampler's ``sampler`` attribute is a small view whose
``set_epoch`` forwards to :meth:`LengthGroupedBatchSampler.set_epoch`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import BatchSampler, Sampler

# batches per length-sorted megabatch unless configured (``data.megabatch_mult``): HF's value
DEFAULT_MEGABATCH_MULT = 50


def _world() -> tuple[int, int]:
    """``(num_replicas, rank)`` of the default process group, ``(1, 0)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class _EpochView(Sampler[int]):
    """``batch_sampler.sampler``: this rank's indices in batch order; ``set_epoch`` is
    forwarded to the batch sampler (Lightning calls it here, see the module doc)."""

    def __init__(self, owner: LengthGroupedBatchSampler) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        for batch in self.owner.batches():
            yield from batch

    def __len__(self) -> int:
        return sum(len(batch) for batch in self.owner.batches())


class LengthGroupedBatchSampler(BatchSampler):
    """Batches of examples of similar length, in a seeded random order, split across ranks.

    Args:
        sampler: optional; only its ``num_replicas`` / ``rank`` attributes are used (a
            ``DistributedSampler`` injected by Lightning; kept as ``source_sampler``). Its
            index order is ignored.
        lengths: length of every example (e.g. ``len(input_ids)``), indexed like the dataset.
        batch_size: examples per batch on each rank.
        num_replicas / rank: defaults: from ``sampler``, else the process group, else 1 / 0.
        seed: base seed; ``None`` reads ``PL_GLOBAL_SEED`` (set by ``seed_everything``), else 0.
        shuffle: random permutation and batch order; ``False`` keeps a fixed order.
        drop_last: drop the incomplete last global batch instead of padding (see module doc).
        megabatch_mult: global batches per sorted megabatch; larger means less padding and
            less randomness.
        longest_first: put the global batch holding the longest example first.
    """

    def __init__(
        self,
        sampler: Sampler[int] | None = None,
        *,
        lengths: Sequence[int],
        batch_size: int,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        megabatch_mult: int = DEFAULT_MEGABATCH_MULT,
        longest_first: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if megabatch_mult < 1:
            raise ValueError(f"megabatch_mult must be >= 1, got {megabatch_mult}")
        world, this_rank = _world()
        if num_replicas is None:
            num_replicas = getattr(sampler, "num_replicas", None) or world
        if rank is None:
            rank = getattr(sampler, "rank", None)
            rank = this_rank if rank is None else rank
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        # BatchSampler's attributes, read by Lightning
        self.source_sampler = sampler
        self.sampler = _EpochView(self)
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last)
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else int(seed)
        self.shuffle = bool(shuffle)
        self.megabatch_mult = int(megabatch_mult)
        self.longest_first = bool(longest_first)
        self.epoch = 0
        self._skip = 0
        self._skip_epoch: int | None = None

    # -- state ------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields (Lightning calls it at every
        epoch start); a pending :meth:`resume_at` skip is kept only for its own epoch."""
        if self._skip_epoch is not None and int(epoch) != self._skip_epoch:
            self._skip, self._skip_epoch = 0, None
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Serve ``epoch`` next without its first ``batches_done`` batches (of this rank),
        e.g. from a mid-epoch checkpoint; later epochs are whole again."""
        self.epoch = int(epoch)
        self._skip, self._skip_epoch = int(batches_done), self.epoch

    def state_dict(self) -> dict[str, int]:
        """Everything the order depends on besides the constructor arguments."""
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])

    # -- plan -------------------------------------------------------------------------------
    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def _num_used(self) -> int:
        """Indices one epoch uses over all ranks (after padding or dropping)."""
        n = len(self.lengths)
        if self.drop_last:
            return n // self.global_batch_size * self.global_batch_size
        return math.ceil(n / self.num_replicas) * self.num_replicas

    def __len__(self) -> int:
        """Batches per rank and epoch (the same on every rank)."""
        return math.ceil(self._num_used() / self.global_batch_size)

    def _order(self, generator: torch.Generator) -> torch.Tensor:
        n = len(self.lengths)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        used = self._num_used()
        if used <= n:
            return order[:used]
        repeats = math.ceil(used / n)  # n < num_replicas pads with several copies
        return order.repeat(repeats)[:used]

    def global_batches(self) -> list[torch.Tensor]:
        """The epoch's global batches (each sorted longest first), in the order of steps."""
        if len(self.lengths) == 0:
            return []
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = self._order(generator)
        size = self.global_batch_size
        batches: list[torch.Tensor] = []
        for mega in order.split(size * self.megabatch_mult):
            ranked = mega[torch.argsort(self.lengths[mega], descending=True, stable=True)]
            batches.extend(ranked.split(size))
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
        if self.longest_first and batches:
            top = max(range(len(batches)), key=lambda i: int(self.lengths[batches[i][0]]))
            batches.insert(0, batches.pop(top))
        return batches

    def batches(self) -> list[list[int]]:
        """This rank's batches for the current epoch."""
        out = []
        for batch in self.global_batches():
            share = len(batch) // self.num_replicas  # a multiple of num_replicas by design
            out.append(batch[self.rank * share : (self.rank + 1) * share].tolist())
        return out

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches()
        skip = self._skip if self._skip_epoch == self.epoch else 0
        self._skip, self._skip_epoch = 0, None
        yield from batches[skip:]


def lengths_of(dataset: Any, column: str = "input_ids") -> list[int]:
    """Length of ``column`` in every row: fast (Arrow) for a ``datasets.Dataset``, else
    ``len(dataset[i][column])``."""
    if hasattr(dataset, "with_format") and hasattr(dataset, "column_names"):
        import pyarrow.compute as pc

        table = dataset.with_format("arrow")[:]  # honours select()/shuffle() indices
        return pc.list_value_length(table.column(column)).to_pylist()
    return [len(dataset[i][column]) for i in range(len(dataset))]


def padding_stats(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> tuple[int, int]:
    """``(real_tokens, padded_tokens)`` when each batch is padded to its longest example."""
    real = padded = 0
    for batch in batches:
        sizes = [int(lengths[i]) for i in batch]
        real += sum(sizes)
        padded += max(sizes, default=0) * len(sizes)
    return real, padded
