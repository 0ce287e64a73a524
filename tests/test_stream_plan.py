"""The per-rank batch counts MedVisTrainer stops every rank with (``stream_plan.rank_batch_counts``), checked against
what real DataLoaders over the real per-rank streams deliver: shard counts that divide among the ranks and ones that
do not (datasets' sample-level split), more workers than shards, uneven shard sizes, drop_last, several epochs, and an
epoch resumed from a checkpoint. The ranks' streams are built in this one process with RANK / WORLD_SIZE values."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from hf_medvis.core.tasks import MAE
from hf_medvis.data.prepare import prepare
from hf_medvis.data.stream_plan import rank_batch_counts
from hf_medvis.data.streaming import load_shard_stream, resume_position, stream_control
from hf_medvis.data.transforms import create_transform

T = create_transform(MAE, False, image_size=8)


@pytest.fixture(scope="module")
def mixed(phantom_dir, tmp_path_factory) -> tuple[Path, dict]:
    """One base holding the 49 phantom images prepared twice: shards of 5 ([5] * 9 + [4]) and of 3 ([3] * 16 + [1])."""
    base = tmp_path_factory.mktemp("plan")
    shards = []
    for name, size in (("a", 5), ("b", 3)):
        prepare(str(phantom_dir / "images"), str(base / name), size=16, shard_size=size, salt="plan")
        manifest = json.loads((base / name / "manifest.json").read_text())
        shards += [{**shard, "path": f"{name}/{shard['path']}"} for shard in manifest["shards"]]
    assert [s["samples"] for s in shards] == [5] * 9 + [4] + [3] * 16 + [1]
    return base, {**manifest, "shards": shards}


def subset(manifest: dict, picks: list[int]) -> dict:
    shards = [manifest["shards"][i] for i in picks]
    return {
        **manifest,
        "shards": shards,
        "totals": {**manifest["totals"], "written": sum(s["samples"] for s in shards)},
    }


def rank_stream(monkeypatch, base: Path, manifest: dict, rank: int, world: int, shuffle: bool):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    return load_shard_stream(str(base), manifest, image_transform=T, shuffle=shuffle, seed=11, shuffle_buffer=4)


def delivered(ds, epoch: int, batch_size: int, num_workers: int, drop_last: bool) -> list[list[str]]:
    ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last)
    return [list(batch["key"]) for batch in loader]


# (shards picked from the 27, world size, workers, batch size, drop_last, shuffle)
LAYOUTS = [
    (list(range(27)), 3, 2, 4, False, True),  # 27 / 3 ranks: whole shards, uneven sizes
    ([0, 9, 10, 1, 11, 12, 13, 2], 2, 3, 3, False, True),  # 8 shards / 2 ranks / 3 workers
    ([0, 1, 9, 10, 11, 26, 12], 2, 2, 4, False, True),  # 7 shards / 2 ranks: every rank keeps 1 sample in 2
    ([9, 0, 10], 3, 4, 2, True, False),  # more workers than shards, drop_last, unshuffled
    ([0, 1, 2, 3, 9, 26], 2, 0, 5, True, True),  # no workers: the main process reads, drop_last
]


# Layouts with 3-4 workers on purpose (more workers than shards): torch's "suggested max number of worker" notice for
# this 2-core machine is expected here, not a defect.
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@pytest.mark.parametrize("picks, world, workers, batch_size, drop_last, shuffle", LAYOUTS)
def test_planned_counts_match_the_loaders(mixed, monkeypatch, picks, world, workers, batch_size, drop_last, shuffle):
    base, manifest = mixed
    manifest = subset(manifest, picks)
    options = {"batch_size": batch_size, "num_workers": workers, "drop_last": drop_last}
    for epoch in (0, 3):
        streams = [rank_stream(monkeypatch, base, manifest, r, world, shuffle) for r in range(world)]
        actual = [len(delivered(ds, epoch, **options)) for ds in streams]
        for ds in streams:  # every rank computes every rank's count, alike
            assert rank_batch_counts(stream_control(ds), epoch=epoch, **options) == actual, (epoch, actual)

    # Resumed in epoch 3 after the batches every rank took before its checkpoint: the counts of what is left, and each
    # rank's samples of the epoch exactly once across the resume (also where ranks keep 1 sample in ``world``).
    full = [delivered(rank_stream(monkeypatch, base, manifest, r, world, shuffle), 3, **options) for r in range(world)]
    taken = min(len(batches) for batches in full) // 2 + 1
    counts, rest = [], []
    for rank in range(world):
        ds = rank_stream(monkeypatch, base, manifest, rank, world, shuffle)
        control = stream_control(ds)
        position = resume_position(control, epoch=3, batches=taken, **options)
        control.skip, control.resume_order, control.skip_epoch, control.epoch = position.skip, position.order, 3, 3
        counts.append(rank_batch_counts(control, epoch=3, **options))
        rest.append(delivered(ds, 3, **options))
        before = [key for batch in full[rank][:taken] for key in batch]
        assert Counter(before + [key for batch in rest[rank] for key in batch]) == Counter(
            key for batch in full[rank] for key in batch
        )
    assert counts == [[len(batches) for batches in rest]] * world


def test_every_rank_stops_after_the_fewest_batches_or_fails_loudly(mixed, monkeypatch):
    from hf_medvis.training import trainer as trainer_module

    base, manifest = mixed
    manifest = subset(manifest, [0, 26])  # 2 ranks: one shard of 5 samples (3 batches), one of 1 (1 batch)
    options = {"batch_size": 2, "num_workers": 1, "drop_last": False}
    loaders = []
    for rank in range(2):
        ds = rank_stream(monkeypatch, base, manifest, rank, 2, True)
        ds.set_epoch(1)
        loaders.append(trainer_module._RanksStopTogether(ds, **options))
    plain = [len(delivered(loader.dataset, 1, **options)) for loader in loaders]
    assert sorted(plain) == [1, 3]
    assert [len(list(loader)) for loader in loaders] == [min(plain)] * 2  # no process group: nothing is exchanged

    # A plan that does not match the loaders raises rather than leaving the other ranks waiting in a collective.
    short = plain.index(1)
    monkeypatch.setattr(trainer_module, "rank_batch_counts", lambda *a, **k: [n + 1 for n in plain])
    with pytest.raises(RuntimeError, match="ended after 1 batches"):
        list(loaders[short])
    monkeypatch.setattr(trainer_module, "rank_batch_counts", lambda *a, **k: [0 if r == short else 3 for r in range(2)])
    with pytest.raises(RuntimeError, match="more than the 0 batches"):
        list(loaders[short])
