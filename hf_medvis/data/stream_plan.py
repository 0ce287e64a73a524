"""How many batches each rank's DataLoader delivers in one epoch of a shard stream, computed from the manifest alone:
no shard is read, no process started, no rank asked. ``MedVisTrainer`` stops every rank after the smallest count, so
ranks take the same number of optimizer steps without agreeing on anything while they train.

The count follows what ``datasets`` does with the stream that ``streaming.load_shard_stream`` builds (``datasets``
5.x, ``iterable_dataset.py``; ``tests/test_stream_plan.py`` checks it against real DataLoaders):

1. Shard order. ``shuffle`` permutes the shard list once, with ``np.random.default_rng(seed)``
   (``IterableDataset.shuffle`` -> ``ExamplesIterable.shuffle_data_sources``: ``rng.shuffle`` of the index list); at
   iteration every epoch but 0 permutes it again with ``np.random.default_rng(epoch)``
   (``_prepare_ex_iterable_for_iteration``), shuffled stream or not.
2. Node split (``split_dataset_by_node``). Shard count a multiple of the world size: node ``r`` takes the shards at
   positions ``r, r + world, ...`` of that order. Otherwise every node reads every shard and, in each DataLoader
   worker's stream, keeps sample ``r`` of every ``world`` (``StepExamplesIterable``, applied per worker).
3. Worker split (``_iter_pytorch``): worker ``w`` of ``n`` takes positions ``w, w + n, ...`` of its node's shards;
   workers beyond the shard count get none. No worker (``num_workers=0``): the main process reads them all.
4. Batches: each worker batches its own samples, so each has its own partial last batch (dropped with ``drop_last``).
5. A resumed epoch (``StreamControl.skip``) drops, per worker, the samples it had delivered before the checkpoint:
   whole batches, the same number on every rank (the ranks stepped together), so every rank has that many fewer.

The buffer shuffle reorders samples within a worker and never moves one between workers: it changes no count.
"""

from __future__ import annotations

import math

import numpy as np

from .streaming import StreamControl, examples_step


def _permuted(order: list[int], seed: int) -> list[int]:
    indices = list(range(len(order)))
    np.random.default_rng(seed).shuffle(indices)
    return [order[i] for i in indices]


def shard_order(control: StreamControl, epoch: int) -> list[int]:
    """Indices into ``control.shards`` in the order ``datasets`` reads them in ``epoch`` (before any split)."""
    order = list(range(len(control.shards)))
    if control.shuffle:
        order = _permuted(order, control.seed)
    if epoch:
        order = _permuted(order, epoch)
    return order


def worker_samples(control: StreamControl, *, epoch: int, rank: int, num_workers: int) -> list[int]:
    """Samples each DataLoader worker of ``rank`` delivers in a whole ``epoch`` (one entry when ``num_workers`` is 0)."""
    order = shard_order(control, epoch)
    step = examples_step(control)
    world = control.world_size if control.split_by_node else 1
    node = order[rank::world] if step == 1 and world > 1 else order
    workers = max(1, num_workers)
    counts = []
    for worker in range(workers):
        read = sum(int(control.shards[i]["samples"]) for i in node[worker::workers])
        counts.append(len(range(rank, read, step)) if step > 1 else read)
    return counts


def batches_of(samples: int, batch_size: int, drop_last: bool) -> int:
    return samples // batch_size if drop_last else math.ceil(samples / batch_size)


def resumed_batches(control: StreamControl, *, batch_size: int) -> int:
    """Batches this rank had delivered in the resumed epoch before its checkpoint (0 outside that epoch)."""
    if not control.skip or control.epoch != control.skip_epoch:
        return 0
    return sum(math.ceil(samples / batch_size) for samples in control.skip.values())


def rank_batch_counts(
    control: StreamControl, *, epoch: int, batch_size: int, num_workers: int, drop_last: bool = False
) -> list[int]:
    """Batches every rank's DataLoader delivers in ``epoch`` of the stream (entry ``r``: rank ``r``), after the
    positioned start of a resumed epoch. Computed the same way on every rank: the ranks agree without talking."""
    world = control.world_size if control.split_by_node else 1
    done = resumed_batches(control, batch_size=batch_size)
    counts = []
    for rank in range(world):
        samples = worker_samples(control, epoch=epoch, rank=rank, num_workers=num_workers)
        counts.append(sum(batches_of(n, batch_size, drop_last) for n in samples) - done)
    return counts
