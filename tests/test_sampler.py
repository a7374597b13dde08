"""LengthGroupedBatchSampler: coverage across ranks, determinism, padding, DDP injection."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
import torch
from datasets import Dataset
from torch.utils.data import DataLoader, DistributedSampler

from nlp_transfer.data.sampler import LengthGroupedBatchSampler, lengths_of, padding_stats
from tests.conftest import quiet_trainer


def _lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(3, 120) for _ in range(n)]


def _ranks(
    lengths: list[int], world: int, epoch: int = 0, seed: int = 7, **kw: Any
) -> list[list[list[int]]]:
    """Every rank's batches for one epoch."""
    out = []
    for rank in range(world):
        sampler = LengthGroupedBatchSampler(
            lengths=lengths, num_replicas=world, rank=rank, seed=seed, **kw
        )
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1000, 37])
def test_every_index_once_per_epoch(world: int, n: int) -> None:
    n -= n % world  # divisible: no padding duplicates
    lengths = _lengths(n)
    per_rank = _ranks(lengths, world, batch_size=8, megabatch_mult=4)
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    assert sorted(seen) == list(range(n))
    assert set(seen.values()) == {1}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_uneven_padding_and_equal_batch_counts(world: int) -> None:
    n = 4 * 8 * world + 5  # neither a multiple of the world size nor of the global batch
    n += 1 if n % world == 0 else 0
    lengths = _lengths(n)
    per_rank = _ranks(lengths, world, batch_size=8)
    counts = {len(batches) for batches in per_rank}
    assert len(counts) == 1  # same number of steps everywhere (no DDP hang)
    sizes = {tuple(len(b) for b in batches) for batches in per_rank}
    assert len(sizes) == 1  # and the same batch size at every step
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    assert sorted(seen) == list(range(n))  # nothing lost
    duplicates = sum(c - 1 for c in seen.values())
    assert duplicates == -n % world  # padded like DistributedSampler
    sampler = LengthGroupedBatchSampler(lengths=lengths, batch_size=8, num_replicas=world, rank=0)
    assert len(sampler) == len(per_rank[0])


@pytest.mark.parametrize("world", [1, 3])
def test_drop_last_gives_full_batches(world: int) -> None:
    n = 10 * 8 * world + 11
    per_rank = _ranks(_lengths(n), world, batch_size=8, drop_last=True)
    assert {len(b) for batches in per_rank for b in batches} == {8}
    assert len({len(batches) for batches in per_rank}) == 1
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    assert set(seen.values()) == {1}
    assert len(seen) == n // (8 * world) * 8 * world


def test_fewer_examples_than_ranks() -> None:
    per_rank = _ranks([5, 9], 4, batch_size=8)
    assert [len(b) for b in per_rank] == [1, 1, 1, 1]
    assert {i for batches in per_rank for b in batches for i in b} == {0, 1}
    assert list(LengthGroupedBatchSampler(lengths=[], batch_size=4, num_replicas=1, rank=0)) == []


def test_same_seed_and_epoch_same_order() -> None:
    lengths = _lengths(500)
    a = LengthGroupedBatchSampler(lengths=lengths, batch_size=16, seed=3, num_replicas=1, rank=0)
    b = LengthGroupedBatchSampler(lengths=lengths, batch_size=16, seed=3, num_replicas=1, rank=0)
    a.set_epoch(5)
    b.set_epoch(5)
    assert list(a) == list(b)
    assert list(a) == list(a)  # iterating does not advance any state


def test_order_changes_with_epoch_and_seed() -> None:
    lengths = _lengths(500)
    sampler = LengthGroupedBatchSampler(
        lengths=lengths, batch_size=16, seed=3, num_replicas=1, rank=0
    )
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    assert epochs[0] != epochs[1] != epochs[2]
    other = LengthGroupedBatchSampler(
        lengths=lengths, batch_size=16, seed=4, num_replicas=1, rank=0
    )
    assert list(other) != epochs[0]
    # batch membership changes too, not only the batch order
    assert {tuple(sorted(b)) for b in epochs[0]} != {tuple(sorted(b)) for b in epochs[1]}


def test_state_dict_restores_order() -> None:
    lengths = _lengths(300)
    sampler = LengthGroupedBatchSampler(
        lengths=lengths, batch_size=8, seed=11, num_replicas=1, rank=0
    )
    sampler.set_epoch(4)
    state = sampler.state_dict()
    assert state == {"seed": 11, "epoch": 4}
    fresh = LengthGroupedBatchSampler(lengths=lengths, batch_size=8, seed=0, num_replicas=1, rank=0)
    fresh.load_state_dict(state)
    assert list(fresh) == list(sampler)


def test_resume_at_skips_trained_batches_once() -> None:
    lengths = _lengths(400)
    full = LengthGroupedBatchSampler(lengths=lengths, batch_size=8, seed=2, num_replicas=1, rank=0)
    full.set_epoch(3)
    epoch3 = list(full)
    resumed = LengthGroupedBatchSampler(
        lengths=lengths, batch_size=8, seed=2, num_replicas=1, rank=0
    )
    resumed.resume_at(3, 10)
    resumed.set_epoch(3)  # Lightning's call at the epoch start keeps the skip
    assert list(resumed) == epoch3[10:]
    assert list(resumed) == epoch3  # the skip applies once
    resumed.resume_at(3, 5)
    resumed.set_epoch(4)  # another epoch: the skip is dropped
    full.set_epoch(4)
    assert list(resumed) == list(full)


def test_seed_defaults_to_lightning_global_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "1234")
    assert LengthGroupedBatchSampler(lengths=[1, 2], batch_size=1).seed == 1234


def test_much_less_padding_than_random_batches() -> None:
    lengths = _lengths(3200, seed=1)
    sampler = LengthGroupedBatchSampler(lengths=lengths, batch_size=32, num_replicas=1, rank=0)
    real, grouped = padding_stats(list(sampler), lengths)
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    random_batches = [order[i : i + 32] for i in range(0, len(order), 32)]
    real_random, random_padded = padding_stats(random_batches, lengths)
    assert real == real_random == sum(lengths)
    assert grouped < 0.6 * random_padded
    assert grouped < 1.05 * real  # megabatches of 50 batches: almost no padding left


def test_ranks_share_similar_lengths_per_step() -> None:
    """A step's global batch is one sorted slice: rank 0 the longest part, rank 1 the next."""
    lengths = _lengths(2000, seed=2)
    per_rank = _ranks(lengths, 2, batch_size=16)
    spreads = []
    for b0, b1 in zip(*per_rank):
        assert min(lengths[i] for i in b0) >= max(lengths[i] for i in b1)
        step = [lengths[i] for i in b0 + b1]
        spreads.append(max(step) - min(step))
    assert sum(spreads) / len(spreads) < 10  # random batches of 32 span about 100


def test_longest_batch_first() -> None:
    lengths = _lengths(1000, seed=3)
    sampler = LengthGroupedBatchSampler(lengths=lengths, batch_size=10, num_replicas=1, rank=0)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        first = next(iter(sampler))
        assert max(lengths[i] for i in first) == max(lengths)


def test_no_shuffle_is_fixed_and_sorted_within_megabatches() -> None:
    lengths = _lengths(100)
    sampler = LengthGroupedBatchSampler(
        lengths=lengths, batch_size=10, shuffle=False, longest_first=False, num_replicas=1, rank=0
    )
    batches = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) == batches
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        LengthGroupedBatchSampler(lengths=[1], batch_size=0)
    with pytest.raises(ValueError):
        LengthGroupedBatchSampler(lengths=[1], batch_size=1, num_replicas=2, rank=2)


def test_lengths_of_arrow_dataset_and_list() -> None:
    ds = Dataset.from_dict({"input_ids": [[1, 2, 3], [4], [5, 6]], "labels": [0, 1, 0]})
    assert lengths_of(ds) == [3, 1, 2]
    assert lengths_of(ds.select([2, 0])) == [2, 3]
    assert lengths_of([{"input_ids": [1, 2]}, {"input_ids": []}]) == [2, 0]


def test_dataloader_and_lightning_ddp_injection() -> None:
    """Lightning re-creates a BatchSampler subclass with a DistributedSampler under DDP."""
    from lightning_fabric.utilities.data import _replace_dunder_methods
    from pytorch_lightning.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler

    lengths = _lengths(64)
    data = [{"x": i} for i in range(64)]
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = DataLoader(
            data,
            batch_sampler=LengthGroupedBatchSampler(lengths=lengths, batch_size=4, seed=5),
            collate_fn=lambda rows: [r["x"] for r in rows],
        )
    assert len(loader) == 16
    shards = []
    for rank in range(2):
        dist = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True)
        new = _update_dataloader(loader, dist)
        assert isinstance(new.batch_sampler, LengthGroupedBatchSampler)
        assert (new.batch_sampler.num_replicas, new.batch_sampler.rank) == (2, rank)
        assert new.batch_sampler.seed == 5
        assert new.batch_sampler.source_sampler is dist
        shards.append([i for batch in new for i in batch])
    assert sorted(shards[0] + shards[1]) == list(range(64))


def test_lightning_sets_the_epoch() -> None:
    """Lightning calls set_epoch on ``batch_sampler.sampler``; every epoch gets its order."""
    import pytorch_lightning as pl

    lengths = _lengths(96, seed=4)

    class Recorder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[int]] = []

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            self.seen.append(batch.tolist())
            return (self.weight * batch.float()).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def train_dataloader(self) -> DataLoader:
            sampler = LengthGroupedBatchSampler(lengths=lengths, batch_size=8, seed=9)
            return DataLoader(list(range(96)), batch_sampler=sampler)

    model = Recorder()
    trainer = quiet_trainer(max_epochs=3)
    trainer.fit(model)
    reference = LengthGroupedBatchSampler(lengths=lengths, batch_size=8, seed=9)
    expected = []
    for epoch in range(3):
        reference.set_epoch(epoch)
        expected += list(reference)
    assert model.seen == expected
