"""A training data loader whose batches are a function of (seed, iteration), for exact resume.

Detectron2's loader draws the image order and the augmentations from streams that start over
after ``--resume``, so a resumed run sees other images and crops. Here, with ``SEED >= 0``:

* the global batch of iteration ``i`` is read from a stream of seeded epoch permutations
  (``numpy.random.default_rng([seed, epoch])``), grouped into batches of one aspect-ratio
  orientation (landscape / portrait, from the records' ``width``/``height``) like Detectron2's
  aspect-ratio grouping; rank ``r`` takes its contiguous share of each global batch;
* the mapper's augmentations for slot ``j`` of batch ``i`` run after ``seed_all_rng`` with a seed
  derived from ``(seed, i, j)``, in whichever worker process maps it.

A run resumed at ``i`` (replaying only index arithmetic) gets the uninterrupted run's batches.
"""

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from detectron2.data import get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng


def iteration_seed(seed: int, iteration: int, slot: int = -1) -> int:
    """A 32-bit RNG seed for (run seed, iteration, slot of the batch; -1: the training step)."""
    return int(np.random.SeedSequence([seed, iteration, slot + 1]).generate_state(1)[0])


def seeded_batches(
    orientations: Sequence[bool], batch_size: int, seed: int, start_iter: int = 0
) -> Iterator[list[int]]:
    """Global batches of ``batch_size`` record indices, from iteration ``start_iter`` on
    (earlier ones are computed and dropped), infinitely. ``orientations``: per record, True if
    landscape (``width > height``); all equal disables grouping in effect."""
    buckets: dict[bool, list[int]] = {True: [], False: []}
    iteration, epoch = 0, 0
    while True:
        for index in np.random.default_rng([seed, epoch]).permutation(len(orientations)):
            bucket = buckets[bool(orientations[index])]
            bucket.append(int(index))
            if len(bucket) == batch_size:
                if iteration >= start_iter:
                    yield list(bucket)
                bucket.clear()
                iteration += 1
        epoch += 1


class _SeededMapDataset(torch.utils.data.Dataset):
    """``dataset[(index, seed)]`` maps record ``index`` with the RNGs seeded by ``seed``."""

    def __init__(self, records: list[dict[str, Any]], mapper: Callable[[dict], Any]):
        self.records = records
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        """The mapped record ``index``; when the mapper drops it (returns None, e.g. a video
        pair whose crop keeps no object of both frames), the next records in turn, each with the
        same seed: a function of (index, seed) still, so batches stay full and reproducible."""
        index, seed = item
        for offset in range(len(self.records)):
            seed_all_rng(seed)
            mapped = self.mapper(dict(self.records[(index + offset) % len(self.records)]))
            if mapped is not None:
                return mapped
        raise ValueError(
            f"The mapper dropped every record of the training set (first: "
            f"{self.records[index].get('file_name')}): nothing to train on"
        )


class SeededTrainLoader:
    """An iterable of per-rank training batches (lists of mapped dicts), see the module doc.

    ``start_iter`` may be changed before iteration begins (the trainer sets it on resume);
    iterating starts the underlying ``DataLoader`` lazily, so nothing is prefetched before.
    """

    def __init__(self, cfg, mapper: Callable[[dict], Any]):
        self.records = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
        self.dataset = _SeededMapDataset(self.records, mapper)
        self.seed = cfg.SEED
        self.batch_size = cfg.SOLVER.IMS_PER_BATCH
        self.group = cfg.DATALOADER.ASPECT_RATIO_GROUPING
        self.num_workers = cfg.DATALOADER.NUM_WORKERS
        self.start_iter = 0
        world = comm.get_world_size()
        if self.batch_size % world:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH ({self.batch_size}) must be divisible by "
                f"the number of processes ({world})"
            )

    def _rank_batches(self) -> Iterator[list[tuple[int, int]]]:
        per_rank = self.batch_size // comm.get_world_size()
        first = comm.get_rank() * per_rank
        orientations = [self.group and r.get("width", 0) > r.get("height", 0) for r in self.records]
        batches = seeded_batches(orientations, self.batch_size, self.seed, self.start_iter)
        for iteration, batch in enumerate(batches, start=self.start_iter):
            slots = range(first, first + per_rank)
            yield [(batch[j], iteration_seed(self.seed, iteration, j)) for j in slots]

    def __iter__(self) -> Iterator[list[Any]]:
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self._rank_batches(),
            num_workers=self.num_workers,
            collate_fn=trivial_batch_collator,
        )
        yield from loader
