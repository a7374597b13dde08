"""Several task datamodules behind one LightningDataModule; every batch holds one task.

Training: :class:`MultiTaskLoader` yields, at each step, the next batch of the task the
:class:`TaskScheduler` chose for that step (see :mod:`nlp_transfer.multitask.sampling`).
A task whose batches run out within an epoch starts another pass. The batch dict carries
the task name under ``"task"``.

Shuffling within a task: a :class:`ShardSampler` per task, seeded by the run's seed,
the epoch and (after the first) the pass, sharded so that every DDP process reads a
disjoint part of equal length. A task's first pass in an epoch is in the order of its
single-task run (``DistributedSampler`` order, seed + epoch); every loader has a private
``torch.Generator``, so loading data never draws from the global RNG (dropout masks are
those of the single-task run too: a one-task multitask run reproduces it exactly, with
``data.length_grouping=false``). A task with ``data.length_grouping=true`` (the default)
gets length-grouped batches instead (:class:`GroupedShardSampler`), sharded and seeded the
same way.

DDP: the task sequence is computed independently, and identically, on every process
(checked once per epoch), so all processes run the same task at every step and none waits
for a collective the others never reach.

Evaluation: one loader per task (a list), each a plain ``DataLoader`` that Lightning
shards under DDP as usual.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from pytorch_lightning import LightningDataModule
from torch.utils.data import DataLoader

from nlp_transfer.data.base import Collate, TransferDataModule
from nlp_transfer.data.sampler import DEFAULT_MEGABATCH_MULT, lengths_of
from nlp_transfer.errors import ConfigError
from nlp_transfer.multitask.sampling import (
    GroupedShardSampler,
    ShardSampler,
    check_policy,
    task_probabilities,
    task_schedule,
)

log = logging.getLogger(__name__)


class TaskCollate:
    """A task datamodule's collate that also tags the batch with the task name."""

    def __init__(self, task: str, collate: Collate) -> None:
        self.task = task
        self.collate = collate

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = dict(self.collate(features))
        batch["task"] = self.task
        return batch


class TaskScheduler:
    """The task of every training step of an epoch.

    It is the multitask loader's ``sampler``: Lightning calls :meth:`set_epoch` at the
    start of every epoch, and the sequence depends only on the configuration, the seed
    and the epoch.

    Args:
        names: task names, in configuration order.
        sizes: training examples per task (drive ``proportional`` / ``temperature``).
        batches: training batches per task in this process (one pass).
        policy / temperature: see :mod:`nlp_transfer.multitask.sampling`.
        steps_per_epoch: steps per epoch; ``None``: the sum of ``batches``.
        seed: seeds the draws (with the epoch).
    """

    def __init__(
        self,
        names: Sequence[str],
        sizes: Sequence[int],
        batches: Sequence[int],
        policy: str = "proportional",
        temperature: float = 1.0,
        steps_per_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        check_policy(policy, temperature)
        self.names = list(names)
        self.sizes = [int(n) for n in sizes]
        self.batches = [int(b) for b in batches]
        self.policy = policy
        self.temperature = float(temperature)
        self.steps = int(steps_per_epoch) if steps_per_epoch else sum(self.batches)
        if self.steps < 1:
            raise ConfigError(f"multitask.steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def probabilities(self) -> dict[str, float]:
        probs = task_probabilities(self.sizes, self.policy, self.temperature)
        return {n: float(p) for n, p in zip(self.names, probs)}

    def schedule(self, epoch: int | None = None) -> list[int]:
        """Task index per step of ``epoch`` (default: the current one)."""
        return task_schedule(
            self.sizes,
            self.steps,
            self.policy,
            seed=self.seed,
            epoch=self.epoch if epoch is None else epoch,
            temperature=self.temperature,
        )

    def counts(self, epoch: int | None = None) -> dict[str, int]:
        """Steps per task in ``epoch``."""
        order = self.schedule(epoch)
        return {name: order.count(i) for i, name in enumerate(self.names)}


class MultiTaskLoader:
    """One epoch of single-task batches in the scheduler's order (an iterable with a
    length; Lightning uses it as is and injects no sampler into it)."""

    def __init__(
        self,
        loaders: dict[str, DataLoader],
        scheduler: TaskScheduler,
        shard_samplers: dict[str, ShardSampler | GroupedShardSampler],
    ) -> None:
        if list(loaders) != scheduler.names:
            raise ValueError(f"loaders {list(loaders)} do not match tasks {scheduler.names}")
        self.loaders = loaders
        self.sampler = scheduler
        self.shard_samplers = shard_samplers

    def __len__(self) -> int:
        return self.sampler.steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # a generator: nothing runs (no RNG is drawn) until the first batch is asked for
        epoch = self.sampler.epoch
        order = self.sampler.schedule(epoch)
        self._check_same_on_all_ranks(epoch, order)
        iterators: dict[str, Iterator[dict[str, Any]]] = {}
        passes: dict[str, int] = {}
        for index in order:
            name = self.sampler.names[index]
            batch = next(iterators[name], None) if name in iterators else None
            if batch is None:  # first use in this epoch, or the task ran out: a new pass
                pass_index = passes.get(name, 0)
                passes[name] = pass_index + 1
                self.shard_samplers[name].set_pass(epoch, pass_index)
                iterators[name] = iter(self.loaders[name])
                batch = next(iterators[name])
            yield batch

    def _check_same_on_all_ranks(self, epoch: int, order: list[int]) -> None:
        """Under DDP, fail loudly (instead of hanging) if processes disagree on the plan."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        plan = [epoch, order, [len(dl) for dl in self.loaders.values()]]
        digest = hashlib.sha1(json.dumps(plan).encode()).hexdigest()
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, digest)
        if len(set(gathered)) != 1:
            raise RuntimeError(
                f"multitask: DDP processes disagree on the task schedule of epoch {epoch} "
                f"(digests {gathered}); every process must see the same tasks and sizes"
            )


class MultiTaskDataModule(LightningDataModule):
    """Task datamodules (classification and sequence labeling, mixed) sharing one tokenizer.

    Args:
        tasks: task name → its datamodule (built with the shared encoder's tokenizer).
        sampling: ``proportional`` | ``temperature`` | ``round_robin``.
        temperature: ``T`` of the ``temperature`` policy.
        steps_per_epoch: training steps per epoch; ``None``: the sum of the tasks' batches.
        seed: seeds the task sequence and the within-task shuffles.
    """

    def __init__(
        self,
        tasks: dict[str, TransferDataModule],
        sampling: str = "proportional",
        temperature: float = 1.0,
        steps_per_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ConfigError("multitask: `tasks` is empty; configure at least one task")
        check_policy(sampling, temperature)
        self.tasks = dict(tasks)
        self.sampling = sampling
        self.temperature = float(temperature)
        self.steps_per_epoch = steps_per_epoch
        self.seed = int(seed)
        self.scheduler: TaskScheduler | None = None

    # -- description -------------------------------------------------------------------------
    @property
    def task_types(self) -> dict[str, str]:
        """Task name → ``classification`` or ``sequence_labeling``."""
        return {name: dm.task for name, dm in self.tasks.items()}

    @property
    def labels(self) -> dict[str, list[str]]:
        return {name: dm.labels for name, dm in self.tasks.items()}

    def train_sizes(self) -> list[int]:
        """Training examples (sentences) per task, in task order."""
        sizes = []
        for dm in self.tasks.values():
            dm.load_examples()
            sizes.append(len(dm.examples["train"]))
        return sizes

    def tasks_with(self, split: str) -> list[str]:
        """Tasks that have ``split`` (validation always exists: it is carved from train)."""
        out = []
        for name, dm in self.tasks.items():
            dm.load_examples()
            if split in dm.examples:
                out.append(name)
        return out

    # -- hooks ---------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        for dm in self.tasks.values():
            dm.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for dm in self.tasks.values():
            dm.setup(stage)

    # -- loaders -------------------------------------------------------------------------------
    @staticmethod
    def _process() -> tuple[int, int]:
        """``(rank, world_size)`` of this process."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _loader_kwargs(self, name: str, dm: TransferDataModule) -> dict[str, Any]:
        return {
            "collate_fn": TaskCollate(name, dm.collate),
            "num_workers": dm.num_workers,
            "persistent_workers": dm.num_workers > 0,
            # workers' seeds come from here, not from the global RNG
            "generator": torch.Generator().manual_seed(self.seed),
        }

    def train_dataloader(self) -> MultiTaskLoader:
        rank, world = self._process()
        loaders: dict[str, DataLoader] = {}
        shards: dict[str, ShardSampler | GroupedShardSampler] = {}
        for index, (name, dm) in enumerate(self.tasks.items()):
            ds = dm.tokenized("train")
            kwargs = self._loader_kwargs(name, dm)
            if getattr(dm, "length_grouping", False):
                grouped = GroupedShardSampler(
                    lengths_of(ds),
                    dm.batch_size,
                    rank,
                    world,
                    self.seed,
                    index,
                    megabatch_mult=getattr(dm, "megabatch_mult", DEFAULT_MEGABATCH_MULT),
                )
                shards[name] = grouped
                loaders[name] = DataLoader(ds, batch_sampler=grouped, **kwargs)
            else:
                plain = ShardSampler(len(ds), rank, world, self.seed, index)
                shards[name] = plain
                loaders[name] = DataLoader(ds, batch_size=dm.batch_size, sampler=plain, **kwargs)
        self.scheduler = TaskScheduler(
            list(self.tasks),
            self.train_sizes(),
            [len(dl) for dl in loaders.values()],
            policy=self.sampling,
            temperature=self.temperature,
            steps_per_epoch=self.steps_per_epoch,
            seed=self.seed,
        )
        log.info(
            "multitask sampling %s: p=%s, %d steps per epoch (batches per pass: %s)",
            self.sampling,
            {k: round(v, 4) for k, v in self.scheduler.probabilities().items()},
            self.scheduler.steps,
            dict(zip(self.tasks, self.scheduler.batches)),
        )
        return MultiTaskLoader(loaders, self.scheduler, shards)

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        return [
            DataLoader(
                dm.tokenized(split),
                batch_size=dm.eval_batch_size,
                shuffle=False,
                **self._loader_kwargs(name, dm),
            )
            for name, dm in self.tasks.items()
            if name in self.tasks_with(split)
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("validation")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def state_dict(self) -> dict[str, Any]:
        return {"labels": self.labels, "tasks": self.task_types}
