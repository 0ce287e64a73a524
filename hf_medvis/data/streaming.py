"""Training input: prepared shards as a ``datasets.IterableDataset`` (any fsspec URL), or a raw folder as a map-style
``datasets.Dataset``. Rows carry ``pixel_values`` (uint8 tensor [1, H, W] after ``image_transform``), ``key``, ``group``
and ``finding_labels``; float conversion and normalisation happen on the accelerator (``transforms.normalize_batch``).

Shard streams:

- Shards are ``datasets`` data sources: ``split_dataset_by_node`` (RANK / WORLD_SIZE) gives each node its shards, and
  ``datasets`` gives each DataLoader worker its share of those. ``shuffle`` permutes the shard order and mixes samples
  in a buffer, both reseeded from ``seed`` + epoch (``set_epoch``; the Trainer calls it).
- Bytes are read through fsspec/adlfs with our storage options (``datasets``' Image feature loses them for ``az://``);
  transient storage errors are retried with backoff; a shard that stays unreadable (or fails its checksum) raises
  ``ShardReadError``, or is skipped and counted with ``skip_bad_shards``.
- Position: the whole stream is deterministic for a given seed, epoch, world size and worker count, so a position is
  "epoch + batches consumed". ``datasets``' own ``state_dict()`` cannot give exactly-once here: it drops the shuffle
  buffer's content on resume. ``StreamControl`` instead replays the epoch and drops the consumed samples in each worker
  before they are decoded (``hf_medvis.training.stream_state.StreamStateCallback`` drives it from checkpoints).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import datasets
import numpy as np
import torch
import torch.utils.data
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, default_collate

from ..core import storage
from ..core.launch_env import rank_and_world_size
from . import shard_format
from .folder import build_folder_dataset
from .transforms import apply_image_transform

logger = logging.getLogger(__name__)

STREAM_COLUMNS: tuple[str, ...] = ("key", "group", "finding_labels", "view_position")


class ShardReadError(RuntimeError):
    """A shard that stayed unreadable after retries, or whose bytes do not match the manifest checksum."""


class ShardLocation(NamedTuple):
    """A prepared-shard location, resolved: its base URL and its manifest. Found once per source (``find_manifest``)
    and handed on, so no later step reads the manifest again."""

    base: str
    manifest: dict


def find_manifest(source: str, storage_options: dict | str | None = None) -> ShardLocation | None:
    """(base URL, manifest) when ``source`` is a prepared-shard location (or its manifest.json), else None."""
    if storage.has_glob(source):
        return None
    base = (
        source[: -len(shard_format.MANIFEST_NAME)].rstrip("/")
        if source.endswith(shard_format.MANIFEST_NAME)
        else source
    )
    url = storage.join(base, shard_format.MANIFEST_NAME)
    try:
        data = storage.read_metadata(url, storage_options)  # read once per process while the file is unchanged
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        if "://" not in source and not os.path.exists(url):
            return None
        raise ShardReadError(f"cannot read {storage.describe(url)}: {type(err).__name__}") from None
    manifest = json.loads(data)
    if manifest.get("format") != shard_format.FORMAT_NAME:
        raise ValueError(f"{storage.describe(url)} is not an hf_medvis shard manifest")
    if manifest.get("version", 0) > shard_format.FORMAT_VERSION:
        raise ValueError(f"{storage.describe(url)} has format version {manifest['version']}; upgrade hf_medvis")
    return ShardLocation(base, manifest)


@dataclass
class StreamControl:
    """Shared, picklable state of one shard stream: what a resume needs and what the workers read.

    ``epoch`` (when set) overrides the epoch the Trainer passes to ``set_epoch``: after a resume the Trainer restarts its
    epoch count for iterable datasets. ``skip`` maps DataLoader worker id -> samples to drop at the start of epoch
    ``skip_epoch``. Changes reach workers because they receive a copy when the DataLoader starts iterating (use
    non-persistent workers).
    """

    base: str
    shards: list[dict]
    storage_options: dict = field(repr=False)
    seed: int
    shuffle: bool
    shuffle_buffer: int
    rank: int
    world_size: int
    split_by_node: bool
    skip_bad_shards: bool
    manifest_sha256: str
    total_samples: int
    epoch: int | None = None
    skip: dict[int, int] | None = None
    skip_epoch: int | None = None
    resume_order: list[int] | None = None  # worker id of each batch left in epoch ``skip_epoch``

    def __repr__(self) -> str:  # never show storage options (credentials)
        return f"StreamControl(base={storage.describe(self.base)!r}, shards={len(self.shards)}, epoch={self.epoch})"

    def position_fingerprint(self) -> dict:
        """What must match between a checkpoint and a resumed run for the replay to be exact."""
        return {
            "manifest_sha256": self.manifest_sha256,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "world_size": self.world_size,
            "split_by_node": self.split_by_node,
        }


def _worker_id() -> int:

    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


class ShardReader:
    """Generator body for one data source (a shard): bytes through fsspec with retries, checksum, rows in order."""

    def __init__(self, base: str, storage_options: dict, skip_bad_shards: bool, with_pixels: bool = True) -> None:
        self.base, self.storage_options = base, storage_options
        self.skip_bad_shards, self.with_pixels = skip_bad_shards, with_pixels
        self.bad_shards = 0

    def __call__(self, shards: list[dict]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            if not self.with_pixels:
                for _ in range(shard["samples"]):
                    yield {"worker": _worker_id()}
                continue
            url = storage.join(self.base, shard["path"])
            try:
                data = storage.read_bytes(url, self.storage_options)
                if shard.get("sha256") and shard_format.sha256_hex(data) != shard["sha256"]:
                    raise ShardReadError(f"shard {shard['path']} does not match its manifest checksum (corrupt)")
                rows = list(shard_format.iter_shard_rows(data))
            except Exception as err:
                message = f"unreadable shard {storage.describe(url)}: {type(err).__name__}: {err}"
                if not self.skip_bad_shards:
                    raise ShardReadError(message) from None
                self.bad_shards += 1
                logger.warning("%s -- skipped (%d bad shards skipped in this worker)", message, self.bad_shards)
                continue
            yield from rows

    def __repr__(self) -> str:
        return f"ShardReader({storage.describe(self.base)!r})"


class _ResumeSkip:
    """``filter(with_indices=True)``: drops the samples this worker had delivered before the checkpoint, undecoded."""

    def __init__(self, control: StreamControl) -> None:
        self.control = control

    def __call__(self, example: dict, index: int) -> bool:
        c = self.control
        if not c.skip or c.epoch != c.skip_epoch:
            return True
        # Under a sample-level node split, datasets keeps 1 sample in ``step`` of this worker's stream after this filter:
        # the k samples the worker had delivered were the first k * step read here.
        return index >= c.skip.get(_worker_id(), 0) * examples_step(c)


class DecodeStoredPixels:
    """Stored pixels -> uint8 tensor [1, H, W] -> ``image_transform`` -> ``pixel_values``."""

    def __init__(self, image_transform: Callable | None) -> None:
        self.image_transform = image_transform

    def __call__(self, example: dict) -> dict:

        stored = shard_format.stored_pixels(example)
        array = stored[None] if stored.ndim == 2 else stored.transpose(2, 0, 1)  # [C, H, W]
        if array.dtype != np.uint8:  # 16-bit shards keep depth on disk; batches travel as uint8
            array = np.round(array.astype(np.float32) / 257.0).astype(np.uint8)
        return {
            "pixel_values": apply_image_transform(self.image_transform, torch.from_numpy(array.copy()), example["key"])
        }


class _EpochFromControl:
    """Installed as ``dataset.set_epoch``: the Trainer's epoch number is replaced by the stream's own."""

    def __init__(self, dataset: datasets.IterableDataset, control: StreamControl) -> None:
        self.dataset, self.control = dataset, control

    def __call__(self, epoch: int) -> None:

        datasets.IterableDataset.set_epoch(
            self.dataset, self.control.epoch if self.control.epoch is not None else epoch
        )


def examples_step(control: StreamControl) -> int:
    """1, or the world size when shards do not divide among the nodes: ``split_dataset_by_node`` then gives each node 1
    sample in world size of every worker's stream (``datasets``' sample-level split) instead of whole shards."""
    by_samples = control.split_by_node and control.world_size > 1 and len(control.shards) % control.world_size
    return control.world_size if by_samples else 1


def _build_stream(control: StreamControl, reader: ShardReader) -> datasets.IterableDataset:

    ds = datasets.IterableDataset.from_generator(reader, gen_kwargs={"shards": list(control.shards)})
    if control.split_by_node and control.world_size > 1:
        if examples_step(control) > 1:
            logger.warning(
                "%d shards do not divide among %d nodes: every node reads every shard and keeps 1 sample in %d; "
                "prepare with a shard count that is a multiple of the world size",
                len(control.shards),
                control.world_size,
                control.world_size,
            )
        ds = split_dataset_by_node(ds, rank=control.rank, world_size=control.world_size)
    if control.shuffle:
        ds = ds.shuffle(seed=control.seed, buffer_size=max(1, control.shuffle_buffer))
    return ds


def load_shard_stream(
    base: str,
    manifest: dict,
    *,
    image_transform: Callable | None = None,
    storage_options: dict | str | None = None,
    shuffle: bool = True,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    skip_bad_shards: bool = False,
    split_by_node: bool = True,
) -> datasets.IterableDataset:
    """The ``datasets.IterableDataset`` over a prepared-shard location; ``stream_control(ds)`` gives its control."""
    options = storage.storage_options_for(base, storage_options)
    rank, world_size = rank_and_world_size()
    control = StreamControl(
        base=base,
        shards=[dict(s) for s in manifest["shards"]],
        storage_options=options,
        seed=seed,
        shuffle=shuffle,
        shuffle_buffer=shuffle_buffer,
        rank=rank,
        world_size=world_size,
        split_by_node=split_by_node,
        skip_bad_shards=skip_bad_shards,
        manifest_sha256=shard_format.sha256_hex(json.dumps(manifest["shards"], sort_keys=True).encode()),
        total_samples=int(manifest["totals"]["written"]),
    )
    ds = _build_stream(control, ShardReader(base, options, skip_bad_shards))
    ds = ds.filter(_ResumeSkip(control), with_indices=True)
    version_1 = manifest.get("version", 1) < 2
    stored = ["pixels" if version_1 else "image", "height", "width", "bits"]
    if manifest.get("preprocessing", {}).get("mask_labels"):  # segmentation masks (prepare --masks_dir): unused here
        stored.append("mask")
    ds = ds.map(DecodeStoredPixels(image_transform), remove_columns=stored)
    ds = ds.remove_columns(["source_hash", "orig_height", "orig_width"] + ([] if version_1 else ["labels"]))
    ds.stream_control = control
    ds.batch_plan = True  # stream_plan.rank_batch_counts models this dataset (not a .take() or other wrapper of it)
    return ds


def stream_control(dataset: Any) -> StreamControl | None:
    """The control of a dataset returned by ``load_image_dataset`` for shards (None for anything else)."""
    return getattr(dataset, "stream_control", None)


def drive_epochs(dataset: datasets.IterableDataset, control: StreamControl) -> None:
    """Makes ``dataset.set_epoch`` use ``control.epoch`` (the callback's count) instead of the caller's number."""
    dataset.set_epoch = _EpochFromControl(dataset, control)


def _first_item(batch: list) -> tuple[int, int]:
    return batch[0]["worker"], len(batch)


def epoch_batches(
    control: StreamControl, *, epoch: int, batch_size: int, num_workers: int, drop_last: bool = False
) -> list[tuple[int, int]]:
    """(worker id, batch size) of every batch this rank's DataLoader delivers in ``epoch``, in delivery order.

    Runs a pixel-free twin of the stream (same shards, node split, seeds and epoch; one row per sample) through a real
    DataLoader with the same worker count, so worker assignment and round-robin order, including workers that run out
    early, come from the same code as in training. Reads no shard."""
    twin = _build_stream(control, ShardReader(control.base, control.storage_options, False, with_pixels=False))
    twin.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(
        twin, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last, collate_fn=_first_item
    )
    return list(loader)


@dataclass
class ResumePosition:
    """Where a stream resumes after ``batches`` batches of an epoch (see ``resume_position``)."""

    epoch_ended: bool  # those batches were the whole epoch: the next pass is the next epoch, from its start
    skip: dict[int, int]  # DataLoader worker id -> samples it had delivered (dropped undecoded on resume)
    order: list[int]  # worker id of each remaining batch, in the order the uninterrupted run delivers them


def resume_position(
    control: StreamControl, *, epoch: int, batches: int, batch_size: int, num_workers: int, drop_last: bool = False
) -> ResumePosition:
    plan = epoch_batches(control, epoch=epoch, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last)
    skip: dict[int, int] = {}
    for worker, size in plan[:batches]:
        skip[worker] = skip.get(worker, 0) + size
    return ResumePosition(len(plan) <= batches, skip, [worker for worker, _ in plan[batches:]])


def worker_skip_counts(
    control: StreamControl, *, epoch: int, batches: int, batch_size: int, num_workers: int, drop_last: bool = False
) -> dict[int, int]:
    """Samples each DataLoader worker had delivered after ``batches`` batches of ``epoch``."""
    return resume_position(
        control, epoch=epoch, batches=batches, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last
    ).skip


class _TagWorker:
    """Collate wrapper run in the DataLoader worker: (worker id, batch), so the main process knows each batch's source."""

    def __init__(self, collate_fn: Callable) -> None:
        self.collate_fn = collate_fn

    def __call__(self, examples: list) -> tuple[int, Any]:
        return _worker_id(), self.collate_fn(examples)


def _in_planned_order(tagged: Iterator[tuple[int, Any]], order: list[int]) -> Iterator[Any]:
    pending: dict[int, list] = {}
    for expected in order:
        while not pending.get(expected):
            item = next(tagged, None)
            if item is None:
                return
            pending.setdefault(item[0], []).append(item[1])
        yield pending[expected].pop(0)
    for items in pending.values():  # nothing is expected here; never drop a batch silently
        yield from items
    for _, batch in tagged:
        yield batch


class StreamDataLoader(DataLoader):
    """A DataLoader over a shard stream: in the epoch a checkpoint interrupted, the
    remaining batches come in the order the uninterrupted run delivers them. (A new DataLoader iterator starts its
    worker round-robin at worker 0, while the interrupted epoch would have continued with the next worker in turn.)
    Batches are buffered only while they arrive out of turn: at most about one per worker."""

    def __init__(
        self, dataset: datasets.IterableDataset, *args: Any, collate_fn: Callable | None = None, **kwargs: Any
    ) -> None:
        super().__init__(dataset, *args, collate_fn=_TagWorker(collate_fn or default_collate), **kwargs)
        self.stream = stream_control(dataset)

    def set_epoch(self, epoch: int) -> None:
        # What accelerate's DataLoaderShard.set_epoch does: the Trainer calls it before each epoch.
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        tagged = super().__iter__()
        control = self.stream
        if control is not None and control.resume_order and control.epoch == control.skip_epoch:
            order, control.resume_order = control.resume_order, None  # the resumed epoch only
            yield from _in_planned_order(tagged, order)
        else:
            for _, batch in tagged:
                yield batch


def load_image_dataset(
    source: str,
    *,
    image_transform: Callable,
    storage_options: dict | str | None = None,
    labels_file: str | None = None,
    shuffle: bool = True,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    skip_bad_shards: bool = False,
    split_by_node: bool = True,
) -> datasets.Dataset | datasets.IterableDataset:
    """Training/validation data from ``source``: prepared shards -> ``datasets.IterableDataset``; a raw folder, glob or
    URL -> map-style ``datasets.Dataset`` decoding on access (for small data). Columns: ``pixel_values``, ``key``,
    ``group``, ``finding_labels`` (+ ``view_position`` for shards, ``path`` for raw folders)."""
    found = find_manifest(source, storage_options)
    if found is not None:
        base, manifest = found
        return load_shard_stream(
            base,
            manifest,
            image_transform=image_transform,
            storage_options=storage_options,
            shuffle=shuffle,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            skip_bad_shards=skip_bad_shards,
            split_by_node=split_by_node,
        )

    options = storage.storage_options_for(source, storage_options)
    return build_folder_dataset(source, image_transform, labels_file=labels_file, storage_options=options)
