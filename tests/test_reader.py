import io
import itertools
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from torchdata.stateful_dataloader import StatefulDataLoader

from data_pipelines.reader import MappedStream, ShardStream, SourceSpec, expand_shards


def _record(rid: str, source: str) -> dict:
    content = [{"type": "image", "image": "media_0.png"}, {"type": "text", "text": rid}]
    return {"id": rid, "source": source, "messages": [{"role": "user", "content": content}]}


def make_shards(directory: Path, source: str, n_shards: int, per_shard: int) -> list[str]:
    """Tiny shards; media bytes are fake (the reader does not decode media)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        path = directory / f"{source}-{s:06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as w:
            for i in range(per_shard):
                rid = f"{source}-{s * per_shard + i}"
                w.write({"__key__": f"{i:09d}", "json": json.dumps(_record(rid, source)), "media_0.png": rid.encode()})
        paths.append(str(path))
    return paths


def ids(samples) -> list[str]:
    return [rec["id"] for rec, _ in samples]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    make_shards(d / "a", "a", n_shards=4, per_shard=10)
    make_shards(d / "b", "b", n_shards=3, per_shard=7)
    return d


def test_expand_shards_patterns(shard_dir):
    brace = expand_shards(str(shard_dir / "a" / "a-{000000..000003}.tar"))
    assert [Path(p).name for p in brace] == [f"a-{i:06d}.tar" for i in range(4)]
    assert expand_shards(str(shard_dir / "a")) == brace
    assert expand_shards(str(shard_dir / "a" / "*.tar")) == brace
    with pytest.raises(FileNotFoundError, match="2 shard.*a-000008.tar"):
        expand_shards(str(shard_dir / "a" / "a-{000008..000009}.tar"))


def test_sequential_read_and_samples_carry_media(shard_dir):
    stream = ShardStream(str(shard_dir / "a"), shuffle=False, epochs=1)
    out = list(stream)
    assert ids(out) == [f"a-{i}" for i in range(40)]
    rec, media = out[5]
    assert media == {"media_0.png": b"a-5"} and rec["source"] == "a"


@pytest.mark.parametrize("world, source, total", [(2, "a", 40), (3, "a", 40), (5, "a", 40), (2, "b", 21)])
def test_ranks_read_disjoint_slices_covering_everything(shard_dir, world, source, total):
    per_rank = [
        ids(ShardStream(str(shard_dir / source), seed=1, epochs=1, rank=r, world_size=world)) for r in range(world)
    ]
    flat = [x for part in per_rank for x in part]
    assert len(flat) == len(set(flat)) == total  # 5 ranks > 4 shards: split by sample instead
    assert all(part for part in per_rank)


def test_shuffle_is_seeded_and_a_permutation_per_epoch(shard_dir):
    def take(seed):
        return ids(itertools.islice(ShardStream(str(shard_dir / "a"), seed=seed, shuffle_buffer=8), 80))

    first = take(3)
    assert first == take(3) and first != take(4)
    assert first[:40] != [f"a-{i}" for i in range(40)]
    everything = Counter(f"a-{i}" for i in range(40))
    # the buffer mixes across the epoch boundary, but two whole epochs hold every sample exactly twice
    two_epochs = ids(ShardStream(str(shard_dir / "a"), seed=3, shuffle_buffer=8, epochs=2))
    # identical to the endless stream until the last 8 (the buffer drains instead of refilling)
    assert two_epochs[:72] == first[:72] and Counter(two_epochs) == everything + everything


def _resume_matches(make, cut: int, more: int):
    stream = make()
    it = iter(stream)
    head = list(itertools.islice(it, cut))
    state = json.loads(json.dumps(stream.state_dict()))  # state must be plain JSON data
    expected = list(itertools.islice(it, more))
    fresh = make()
    fresh.load_state_dict(state)
    got = list(itertools.islice(iter(fresh), more))
    return head, ids(expected), ids(got), fresh


@pytest.mark.parametrize("cut", [0, 1, 13, 39, 57])
def test_exact_resume_mixed_shuffled_across_epochs(shard_dir, cut):
    def make():
        sources = [SourceSpec("a", str(shard_dir / "a"), 3.0), SourceSpec("b", str(shard_dir / "b"), 1.0)]
        return ShardStream(sources, seed=7, shuffle_buffer=6)

    _, expected, got, fresh = _resume_matches(make, cut, 60)
    assert got == expected and len(got) == 60
    if cut:
        assert fresh.resume_skipped > 0 and fresh.stats["resume_skipped"] == fresh.resume_skipped


def test_weighted_mixing_follows_weights_and_finite_epochs_drain(shard_dir):
    sources = [SourceSpec("a", str(shard_dir / "a"), 3.0), SourceSpec("b", str(shard_dir / "b"), 1.0)]
    head = ids(itertools.islice(ShardStream(sources, seed=0, shuffle_buffer=4), 400))
    share_a = sum(x.startswith("a-") for x in head) / len(head)
    assert 0.68 < share_a < 0.82
    drained = ids(ShardStream(sources, seed=0, epochs=2))
    assert Counter(x[0] for x in drained) == {"a": 80, "b": 42}


def test_resume_of_finite_stream_and_state_checks(shard_dir):
    def make():
        return ShardStream(str(shard_dir / "b"), seed=2, shuffle_buffer=5, epochs=1)

    _, expected, got, _ = _resume_matches(make, 15, 100)
    assert got == expected and len(got) == 6
    other = ShardStream(str(shard_dir / "b"), seed=2, rank=1, world_size=2)
    state = make()
    next(iter(state))
    other.load_state_dict(state.state_dict())
    with pytest.raises(ValueError, match="exact resume needs the same ranks"):
        iter(other)


def _write_members(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_corrupt_members_and_tars_are_counted_not_fatal(tmp_path):
    good = lambda i: [(f"{i:03d}.json", json.dumps(_record(f"x-{i}", "x")).encode()), (f"{i:03d}.media_0.png", b"p")]  # noqa: E731
    members = good(0) + [("001.json", b"{not json")] + [("002.json", json.dumps(_record("x-2", "x")).encode())]
    members += [("003.media_0.png", b"p")] + good(4) + [("005.json", b"[1, 2]")] + good(6)
    _write_members(tmp_path / "s0.tar", members)
    _write_members(tmp_path / "s1.tar", good(10) + good(11) + good(12))
    data = (tmp_path / "s1.tar").read_bytes()
    (tmp_path / "s1.tar").write_bytes(data[: 2048 + 700])  # each sample is 2048 bytes: ends inside sample 11
    _write_members(tmp_path / "s2.tar", good(20) + good(21) + good(22))
    data = bytearray((tmp_path / "s2.tar").read_bytes())
    data[2048 + 100 : 2048 + 140] = b"\x07" * 40  # garbles the header of sample 21's first member
    # (sample 20 is dropped too: whether the garbled member belonged to it cannot be known)
    (tmp_path / "s2.tar").write_bytes(bytes(data))
    (tmp_path / "s3.tar").write_bytes(b"definitely not a tar file" * 40)

    stream = ShardStream([str(tmp_path / f"s{i}.tar") for i in range(4)], shuffle=False, epochs=1)
    assert ids(stream) == ["x-0", "x-4", "x-6", "x-10"]
    assert stream.stats["bad_json"] == 2  # "{not json" and a JSON list
    assert stream.stats["missing_member"] == 1  # x-2: its png is not in the tar
    assert stream.stats["no_json"] == 1  # 003 has only a png
    assert stream.stats["corrupt_tar"] == 3  # s1 truncated, s2 bad header, s3 garbage


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stateful_dataloader_resume_per_worker(shard_dir, num_workers):
    def make_loader():
        sources = [SourceSpec("a", str(shard_dir / "a"), 2.0), SourceSpec("b", str(shard_dir / "b"), 1.0)]
        mapped = MappedStream(ShardStream(sources, seed=5, shuffle_buffer=4), lambda s: s[0]["id"])
        return StatefulDataLoader(mapped, batch_size=3, num_workers=num_workers, collate_fn=list)

    loader = make_loader()
    it = iter(loader)
    for _ in range(7):
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(8)]
    del it
    resumed = make_loader()
    resumed.load_state_dict(state)
    got = list(itertools.islice(iter(resumed), 8))
    assert got == expected


def test_workers_split_disjointly_in_dataloader(shard_dir):
    loader = StatefulDataLoader(
        MappedStream(ShardStream(str(shard_dir / "a"), seed=1, epochs=1), lambda s: s[0]["id"]),
        batch_size=None,
        num_workers=2,
    )
    seen = list(loader)
    assert sorted(seen) == sorted(f"a-{i}" for i in range(40))


def test_mapped_stream_counts_and_skips_errors(shard_dir):
    def fn(sample):
        rid = sample[0]["id"]
        if rid.endswith("3"):
            raise ValueError(f"bad media in {rid}")
        return rid

    mapped = MappedStream(ShardStream(str(shard_dir / "a"), shuffle=False, epochs=1), fn)
    out = list(mapped)
    assert len(out) == 36 and not any(x.endswith("3") for x in out)
    assert mapped.stats["map_error/ValueError"] == 4
