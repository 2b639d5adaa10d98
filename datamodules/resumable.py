"""A training order that survives a crash: sampler and loader whose position Lightning checkpoints.

Why this exists:

* Lightning restores a mid-epoch position only for loaders that are themselves stateful: it calls
  ``state_dict()`` / ``load_state_dict()`` on the *DataLoader* objects of the train CombinedLoader,
  never on their samplers (``lightning.pytorch.loops.fit_loop``, checked in Lightning 2.6). So the
  loader, not the sampler, carries the state; ``torchdata``'s StatefulDataLoader is not needed.
* The order of an epoch is a pure function of ``(seed, epoch)`` — not of a generator's history — so
  a resumed process rebuilds exactly the order the crashed one was walking, and skips what it had
  already trained on.
* Every index is yielded as ``(epoch, index)``: datasets derive their per-item augmentation from
  ``(seed, epoch, index)`` (:func:`derive_seed`) instead of the global or per-worker RNG, so the
  resumed run also sees the same augmentations, whatever the number of workers or ranks.
* The sampler is a ``DistributedSampler``: Lightning then leaves it in place under DDP/FSDP and it
  shards itself, rank ``r`` taking positions ``r, r+W, r+2W, …`` of the global order. Rank ``r``'s
  k-th batch therefore holds samples of the single-process k-th batch of size ``W × batch_size``:
  the same global batches at any world size (the DDP-equivalence test relies on this).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

log = logging.getLogger(__name__)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a hash of integers (order matters): independent streams per (seed, epoch, index)."""
    words = [int(p) % 2**64 for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def split_index(index: Any) -> tuple[int, int]:
    """``(epoch, index)`` from what a sampler yields: a pair from :class:`EpochSampler`, else a plain index (epoch 0)."""
    if isinstance(index, (tuple, list)):
        epoch, i = index
        return int(epoch), int(i)
    return 0, int(index)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _pairs(epoch: int, indices: torch.Tensor, chunk: int = 65536) -> Iterator[tuple[int, int]]:
    """``(epoch, index)`` lazily: an epoch of a slide cohort has tens of millions of indices."""
    for s in range(0, len(indices), chunk):
        for i in indices[s : s + chunk].tolist():
            yield epoch, i


class EpochSampler(DistributedSampler):
    """``samples_per_epoch`` indices per epoch (a fresh permutation, or several when it exceeds the
    dataset), sharded over ranks, yielded as ``(epoch, index)``.

    World size and rank default to the initialised process group (Lightning builds the train
    loader after it), else 1 and 0. Like ``DistributedSampler``, the global order is padded with its
    first indices to a multiple of the world size so every rank takes the same number of steps.
    """

    def __init__(self, dataset: Dataset, samples_per_epoch: int | None = None, shuffle: bool = True, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None):
        world, this_rank = _world()
        super().__init__(dataset, num_replicas=world if num_replicas is None else num_replicas,
                         rank=this_rank if rank is None else rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.dataset_size = len(dataset)  # type: ignore[arg-type]
        if self.dataset_size == 0:
            raise ValueError("EpochSampler: the dataset is empty")
        self.samples_per_epoch = int(samples_per_epoch or self.dataset_size)
        self.num_samples = math.ceil(self.samples_per_epoch / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self._start = 0

    def global_order(self, epoch: int) -> torch.Tensor:
        """The order of the whole epoch (all ranks), before sharding."""
        n, total = self.dataset_size, self.samples_per_epoch
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(total / n))])[:total]
        else:
            order = torch.arange(total) % n
        if self.total_size > total:  # pad so every rank gets num_samples
            order = torch.cat([order, order[: self.total_size - total]])
        return order

    def start_at(self, position: int) -> None:
        """Begin the next iteration at this rank's ``position``-th sample of the current epoch (once)."""
        self._start = int(position)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self._start = self._start, 0
        epoch = self.epoch
        mine = self.global_order(epoch)[self.rank : self.total_size : self.num_replicas][start:]
        return _pairs(epoch, mine)

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A DataLoader over an :class:`EpochSampler` that reports and restores its place in the epoch.

    ``state_dict()`` is ``{epoch, batches}``: how many batches of which epoch were handed to the
    trainer. Lightning asks for it while dumping a checkpoint and passes it back to
    ``load_state_dict()`` before the resumed epoch starts; the next iteration of that epoch then
    starts right after those batches. Counting the batches the loader yields is exact because
    Lightning does not prefetch from sized loaders (``_PrefetchDataFetcher``).

    ``__iter__`` is lazy (a generator): the epoch is read at the first ``next()``, i.e. after
    Lightning's ``set_epoch``, even though Lightning calls ``iter()`` earlier on resume.
    The worker base seed is re-derived from ``(seed, epoch)`` each epoch for the same reason.
    """

    def __init__(self, dataset: Dataset, *, sampler: EpochSampler, **kwargs: Any):
        # Lightning may rebuild the loader with another sampler (`overfit_batches`): it then acts as
        # a plain DataLoader with an empty state
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._position = {"epoch": getattr(sampler, "epoch", 0), "batches": 0}
        self._pending: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._iterate_epoch()

    def _iterate_epoch(self) -> Iterator[Any]:
        sampler = self.sampler
        if not isinstance(sampler, EpochSampler):
            yield from super().__iter__()
            return
        epoch = sampler.epoch
        skip = 0
        if self._pending is not None:
            if self._pending["epoch"] == epoch:
                skip = self._pending["batches"]
            self._pending = None
        sampler.start_at(skip * int(self.batch_size or 1))
        if self.generator is not None:
            self.generator.manual_seed(derive_seed(sampler.seed, epoch, 1))
        self._position = {"epoch": epoch, "batches": skip}
        if skip:
            log.info("resuming epoch %d after %d batches", epoch, skip)
        for batch in super().__iter__():
            self._position["batches"] += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler = self.sampler
        if not isinstance(sampler, EpochSampler):
            return {}
        return {**self._position, "batch_size": int(self.batch_size or 1), "num_replicas": sampler.num_replicas,
                "seed": sampler.seed, "samples_per_epoch": sampler.samples_per_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        if not isinstance(sampler, EpochSampler) or not state:
            return
        same = (state.get("batch_size") == self.batch_size and state.get("num_replicas") == sampler.num_replicas
                and state.get("seed") == sampler.seed and state.get("samples_per_epoch") == sampler.samples_per_epoch)
        if not same:
            log.warning("the checkpoint's data order (%s) differs from this run's (batch_size=%s, world size=%s, seed=%s, "
                        "samples_per_epoch=%s): the resumed epoch restarts from its beginning",
                        {k: state.get(k) for k in ("batch_size", "num_replicas", "seed", "samples_per_epoch")},
                        self.batch_size, sampler.num_replicas, sampler.seed, sampler.samples_per_epoch)
            state = {**state, "batches": 0}
        self._pending = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}
        sampler.set_epoch(int(state["epoch"]))
