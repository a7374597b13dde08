"""Which task each training step uses, and which examples of a task each process reads.

Task schedules are pure functions of ``(policy, sizes, steps, seed, epoch)``: every DDP
process computes the same sequence without talking to the others, so all processes run
the same task at every step (the shared encoder's gradients are all-reduced across
processes that did the same forward). Policies:

* ``proportional``: each step draws task ``t`` with ``p_t ∝ n_t`` (training examples).
* ``temperature``: ``p_t ∝ n_t ** (1 / T)``; ``T = 1`` is proportional, large ``T``
  approaches uniform (Arivazhagan et al., 2019).
* ``round_robin``: tasks in turn, in configuration order (equal shares).

Draws are independent (with replacement) from a NumPy generator seeded with
``[seed, epoch]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from nlp_transfer.data.sampler import DEFAULT_MEGABATCH_MULT, LengthGroupedBatchSampler
from nlp_transfer.errors import ConfigError

POLICIES = ("proportional", "temperature", "round_robin")


def check_policy(policy: str, temperature: float = 1.0) -> None:
    """Fail early on an unknown policy or a non-positive temperature."""
    if policy not in POLICIES:
        raise ConfigError(f"multitask.sampling={policy!r}: choose one of {list(POLICIES)}")
    if policy == "temperature" and not float(temperature) > 0:
        raise ConfigError(f"multitask.temperature must be > 0, got {temperature}")


def task_probabilities(sizes: Sequence[int], policy: str, temperature: float = 1.0) -> np.ndarray:
    """Probability of drawing each task at one step under ``policy``."""
    check_policy(policy, temperature)
    n = np.asarray(sizes, dtype=np.float64)
    if n.ndim != 1 or len(n) == 0 or (n <= 0).any():
        raise ConfigError(f"every task needs training examples; sizes are {list(sizes)}")
    if policy == "round_robin":
        weights = np.ones_like(n)
    elif policy == "proportional":
        weights = n
    else:
        weights = n ** (1.0 / float(temperature))
    return weights / weights.sum()


def task_schedule(
    sizes: Sequence[int],
    steps: int,
    policy: str,
    seed: int = 0,
    epoch: int = 0,
    temperature: float = 1.0,
) -> list[int]:
    """The task index of each of ``steps`` training steps of ``epoch``."""
    probs = task_probabilities(sizes, policy, temperature)
    if policy == "round_robin":
        return [i % len(probs) for i in range(steps)]
    rng = np.random.default_rng([int(seed), int(epoch)])
    return rng.choice(len(probs), size=int(steps), p=probs).tolist()


def pass_seed(seed: int, task_index: int, epoch: int, pass_index: int) -> int:
    """Seed of the shuffle of one pass over a task's training examples.

    The first pass of an epoch uses ``seed + epoch``, as ``DistributedSampler`` and the
    single-task runs' sampler do, so each task's examples come in the order its own
    single-task run would use; further passes within the epoch get seeds mixed from
    ``(seed, task, epoch, pass)``.
    """
    if pass_index == 0:
        return int(seed) + int(epoch)
    mixed = np.random.SeedSequence([int(seed), int(task_index), int(epoch), int(pass_index)])
    return int(mixed.generate_state(1)[0])


class GroupedShardSampler(LengthGroupedBatchSampler):
    """Length-grouped batches of one task (``data.length_grouping``), sharded across DDP
    processes like :class:`ShardSampler`, in an order seeded by :func:`pass_seed`.

    A batch sampler: every process gets the same number of batches as with
    :class:`ShardSampler` and the same batch size.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        task_index: int = 0,
        megabatch_mult: int = DEFAULT_MEGABATCH_MULT,
    ) -> None:
        super().__init__(
            lengths=lengths,
            batch_size=batch_size,
            num_replicas=world_size,
            rank=rank,
            seed=seed,
            megabatch_mult=megabatch_mult,
        )
        self.base_seed, self.task_index = int(seed), int(task_index)

    def set_pass(self, epoch: int, pass_index: int) -> None:
        """Choose the batches for pass ``pass_index`` over the task within ``epoch``."""
        self.seed = pass_seed(self.base_seed, self.task_index, epoch, pass_index)
        self.set_epoch(0)


class ShardSampler(Sampler[int]):
    """A seeded shuffle of one task's examples, sharded across DDP processes.

    Every process draws the same permutation (see :func:`pass_seed`) and keeps every
    ``world_size``-th index from ``rank``; the permutation is padded by wrapping around so
    all processes get the same number of examples (exactly like
    :class:`torch.utils.data.DistributedSampler`). A task sampled more often than it has
    batches starts another pass, in a fresh order.
    """

    def __init__(
        self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0, task_index: int = 0
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.size, self.rank, self.world_size = int(size), int(rank), int(world_size)
        self.seed, self.task_index = int(seed), int(task_index)
        self.epoch, self.pass_index = 0, 0

    def set_pass(self, epoch: int, pass_index: int) -> None:
        """Choose the order for pass ``pass_index`` over the task within ``epoch``."""
        self.epoch, self.pass_index = int(epoch), int(pass_index)

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size)

    def __iter__(self) -> Iterator[int]:
        seed = pass_seed(self.seed, self.task_index, self.epoch, self.pass_index)
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(self.size, generator=gen).tolist()
        total = len(self) * self.world_size
        while len(order) < total:  # wrap around (more processes than examples: repeat)
            order += order[: total - len(order)]
        return iter(order[self.rank : total : self.world_size])
