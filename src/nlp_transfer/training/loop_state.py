"""Exact mid-epoch resume: seeded data order, skipping seen batches, RNG state.

Lightning 2.6 restores the loop counters of a checkpoint taken in the middle of an epoch
(``batch_idx``) but not *which* examples those batches held: a plain ``shuffle=True``
loader draws a fresh permutation from the global RNG on resume and then serves the first
``len - done`` batches of it, so some examples are seen twice and others not at all. It
does not restore the global RNG either (dropout masks differ after a resume).

:class:`ResumeState` fixes both. ``ResumeState.attach(datamodule)`` makes a plainly shuffled
training loader use a :class:`ResumableSampler` (a permutation seeded by ``(seed, epoch)``,
split over DDP ranks like ``DistributedSampler``), keeps a length-grouped batch sampler (the
default) but seeds and positions it the same way, and gives every loader a private
``torch.Generator``, so that loaders never consume the global RNG. The callback's state in
each checkpoint holds the sampler seed, the epoch, the number of batches already trained in
it and the torch/numpy/python(/CUDA) RNG states, all as plain types (``weights_only`` loads
them). On resume the sampler skips exactly the batches already trained and the RNG states
are put back just before the first training batch, so an interrupted run continues as the
uninterrupted one would have. Under DDP each rank's RNG states are gathered into the
checkpoint and every rank gets its own back (with another number of ranks, rank 0's).
"""

from __future__ import annotations

import functools
import logging
import math
import random
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from pytorch_lightning import Callback, LightningDataModule, LightningModule, Trainer
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from nlp_transfer.data.sampler import LengthGroupedBatchSampler

log = logging.getLogger(__name__)


def _world() -> tuple[int, int]:
    """``(num_replicas, rank)`` of the initialised process group, else ``(1, 0)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class ResumableSampler(DistributedSampler):
    """Shuffled order that depends only on ``(seed, epoch)``; can start an epoch part-way.

    It is a ``DistributedSampler`` (so Lightning keeps it under DDP instead of replacing it)
    whose replica count and rank come from the process group when one is initialised.
    """

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True) -> None:
        replicas, rank = _world()
        super().__init__(
            dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self._skip = 0
        self._skip_epoch: int | None = None

    def resume_at(self, epoch: int, samples_done: int) -> None:
        """Serve ``epoch`` next, without its first ``samples_done`` samples (of this rank)."""
        self.epoch = int(epoch)
        self._skip = int(samples_done)
        self._skip_epoch = self.epoch

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start; keeps a pending skip for that epoch."""
        if self._skip_epoch is not None and int(epoch) != self._skip_epoch:
            log.warning(
                "resume: the loop restarted at epoch %d, the data order was set up for epoch "
                "%d; serving epoch %d from its start",
                epoch,
                self._skip_epoch,
                epoch,
            )
            self._skip, self._skip_epoch = 0, None
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip = self._skip if self._skip_epoch == self.epoch else 0
        self._skip, self._skip_epoch = 0, None
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that Lightning treats as resumable (``state_dict``/``load_state_dict``).

    The position itself is restored by :class:`ResumeState` (which knows how many batches
    were *trained*, not just fetched); the state here is informational only. Having it
    tells Lightning that mid-epoch resume is handled, so it does not warn otherwise.
    """

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        epoch = int(sampler.epoch) if isinstance(sampler, ResumableSampler) else 0
        return {"position_kept_by": "ResumeState", "epoch": epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to do: :class:`ResumeState` positions the sampler."""


def capture_rng() -> dict[str, Any]:
    """torch, numpy, python and CUDA RNG states as tensors and plain containers."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def _private_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _loader_kwargs(loader: DataLoader) -> dict[str, Any]:
    """The settings of ``loader`` other than dataset, sampler and batching."""
    kwargs: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
    }
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return kwargs


class ResumeState(Callback):
    """Saves and restores the data order position and the RNG states (see module doc).

    Args:
        seed: seeds the training data order (with the epoch); ``None`` draws one, which is
            then kept in the checkpoints so that a resume continues the same order.
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.seed = int(seed) if seed is not None else secrets.randbits(31)
        self.sampler: ResumableSampler | None = None
        self._trainer: Trainer | None = None
        self._pending_position: dict[str, int] | None = None
        self._pending_rng: dict[str, Any] | None = None
        # a checkpoint's data.megabatch_mult: its epoch's batches depend on it
        self._saved_megabatch_mult: int | None = None

    # -- wiring -----------------------------------------------------------------------------
    def attach(self, datamodule: LightningDataModule) -> None:
        """Route the datamodule's loaders through :meth:`train_loader` / :meth:`eval_loader`."""
        for name, wrap in (
            ("train_dataloader", self.train_loader),
            ("val_dataloader", self.eval_loader),
            ("test_dataloader", self.eval_loader),
        ):
            original = getattr(datamodule, name, None)
            if original is not None:
                setattr(datamodule, name, _wrapped(original, wrap))

    def train_loader(self, loader: Any) -> Any:
        """``loader`` with a :class:`ResumableSampler` in place of its random sampler.

        Loaders that do not shuffle a map-style dataset with a plain ``RandomSampler`` are
        returned as they are (their order does not depend on the global RNG, or cannot be
        reproduced by this sampler).
        """
        if isinstance(loader, DataLoader) and isinstance(
            loader.batch_sampler, LengthGroupedBatchSampler
        ):
            # seed and position are set in on_train_start / on_train_epoch_start, on the
            # batch sampler the trainer really iterates (under DDP Lightning rebuilds it
            # from its init args)
            return ResumableDataLoader(
                loader.dataset,
                batch_sampler=loader.batch_sampler,
                generator=_private_generator(self.seed),
                **_loader_kwargs(loader),
            )
        if not _plain_shuffled(loader):
            return self.eval_loader(loader)
        sampler = ResumableSampler(loader.dataset, seed=self.seed)
        rebuilt = ResumableDataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=sampler,
            drop_last=loader.drop_last,
            generator=_private_generator(self.seed),
            **_loader_kwargs(loader),
        )
        self.sampler = sampler
        if self._pending_position is not None:
            self._apply_position(sampler, int(loader.batch_size))
        return rebuilt

    def eval_loader(self, loader: Any) -> Any:
        """Give a loader a private generator, so iterating it leaves the global RNG alone."""
        if isinstance(loader, DataLoader) and loader.generator is None:
            loader.generator = _private_generator(self.seed)
        return loader

    def _take_position(self) -> tuple[int, int]:
        """The pending ``(epoch, batches done in it)`` to continue from (consumed)."""
        pos = self._pending_position
        assert pos is not None
        self._pending_position = None
        epoch, done, total = pos["epoch"], pos["batches_done"], pos["num_batches"]
        if total >= 0 and done >= total:  # the epoch was complete: start the next one
            epoch, done = epoch + 1, 0
        return epoch, done

    def _apply_position(self, sampler: ResumableSampler, batch_size: int) -> None:
        epoch, done = self._take_position()
        sampler.resume_at(epoch, done * batch_size)
        log.info("resume: epoch %d continues after %d trained batches", epoch, done)

    # -- Lightning hooks --------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        rng = capture_rng()
        state: dict[str, Any] = {"seed": self.seed, "rng": rng}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank dumps the checkpoint together (rank 0 writes it): gather all ranks'
            # states, since dropout draws differ between ranks (different padded lengths)
            per_rank: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, rng)
            state["rng_per_rank"] = per_rank
        trainer = self._trainer
        if trainer is not None:
            loop = trainer.fit_loop
            total = trainer.num_training_batches
            state.update(
                epoch=int(trainer.current_epoch),
                batches_done=int(loop.epoch_loop.batch_progress.current.processed),
                num_batches=int(total) if math.isfinite(total) else -1,
            )
            batch_sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
            if isinstance(batch_sampler, LengthGroupedBatchSampler):
                state["megabatch_mult"] = int(batch_sampler.megabatch_mult)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict.get("seed", self.seed))
        self._pending_rng = state_dict.get("rng")
        per_rank = state_dict.get("rng_per_rank")
        replicas, rank = _world()
        if per_rank and len(per_rank) == replicas:
            self._pending_rng = per_rank[rank]
        if state_dict.get("megabatch_mult") is not None:
            self._saved_megabatch_mult = int(state_dict["megabatch_mult"])
        if "epoch" in state_dict:
            self._pending_position = {
                k: int(state_dict[k]) for k in ("epoch", "batches_done", "num_batches")
            }

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning skips on_train_epoch_start when it restarts mid-epoch
        self._prepare_grouped(trainer)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._prepare_grouped(trainer)  # loaders may be rebuilt between epochs

    def _prepare_grouped(self, trainer: Trainer) -> None:
        """Seed a length-grouped batch sampler and position it on resume (before the
        epoch's iterator exists: Lightning creates it after these hooks)."""
        batch_sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
        if not isinstance(batch_sampler, LengthGroupedBatchSampler):
            return
        batch_sampler.seed = self.seed
        saved = self._saved_megabatch_mult
        if saved is not None and saved != batch_sampler.megabatch_mult:
            log.warning(
                "resume: the checkpoint's run used data.megabatch_mult=%d, this one %d; "
                "keeping %d so that the resumed run sees the batches the plan had",
                saved,
                batch_sampler.megabatch_mult,
                saved,
            )
            batch_sampler.megabatch_mult = saved
        if self._pending_position is None:
            return
        epoch, done = self._take_position()
        if epoch != trainer.current_epoch:
            log.warning(
                "resume: the loop restarted at epoch %d, the checkpoint was taken in epoch %d; "
                "serving epoch %d from its start",
                trainer.current_epoch,
                epoch,
                trainer.current_epoch,
            )
            return
        batch_sampler.resume_at(epoch, done)
        log.info("resume: epoch %d continues after %d trained batches", epoch, done)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending_rng is not None:
            restore_rng(self._pending_rng)
            self._pending_rng = None


def _plain_shuffled(loader: Any) -> bool:
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return False
    sampler = loader.sampler
    return (
        type(sampler) is RandomSampler
        and not sampler.replacement
        and sampler._num_samples is None
        and loader.batch_size is not None
    )


def _wrapped(original: Callable[[], Any], wrap: Callable[[Any], Any]) -> Callable[[], Any]:
    @functools.wraps(original)
    def loader() -> Any:
        return wrap(original())

    return loader
