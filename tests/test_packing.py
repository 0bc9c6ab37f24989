import itertools
import json
import random

import pytest
import torch
import webdataset as wds
from torchdata.stateful_dataloader import StatefulDataLoader

from data_pipelines.encoded import IGNORE_INDEX, EncodedSample, TokenIds, VisualInputs
from data_pipelines.packing import Packer, check_sample, pack_row, split_grid, truncate_sample
from data_pipelines.reader import MappedStream, ShardStream

IDS = TokenIds(
    image=151655,
    video=151656,
    vision_start=151652,
    vision_end=151653,
    frame=151675,
    fast_start=151676,
    fast_end=151677,
    pad=151643,
)  # Qwen3 + Keye's (KeyeVLConfig's defaults)
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = IDS.image, IDS.video
VSTART, VEND, FRAME = IDS.vision_start, IDS.vision_end, IDS.frame
PATCH_DIM = 6


def make_sample(sid: str, parts: list, seed: int = 0) -> EncodedSample:
    """Parts: ("text", n) prompt tokens, ("answer", n) labelled tokens, ("image", (h, w)), ("video", [(t, h, w)...]).

    Every patch row of image/frame k is filled with ``hash(sid) + k`` so tests can see which units survived.
    """
    g = torch.Generator().manual_seed(seed)
    ids, labels, img_grid, vid_grid, img_px, vid_px = [], [], [], [], [], []
    base = (sum(map(ord, sid)) % 997) * 100.0

    def patches(rows: list, grid_row: list, out: list) -> None:
        t, h, w = grid_row
        out.append(torch.full((t * h * w, PATCH_DIM), base + len(rows)))
        rows.append(grid_row)

    for kind, arg in parts:
        if kind in ("text", "answer"):
            toks = torch.randint(10, 5000, (arg,), generator=g).tolist()
            ids += toks
            labels += toks if kind == "answer" else [IGNORE_INDEX] * arg
        elif kind == "image":
            h, w = arg
            block = [VSTART] + [IMAGE_TOKEN_ID] * (h * w // 4) + [VEND]
            ids += block
            labels += [IGNORE_INDEX] * len(block)
            patches(img_grid, [1, h, w], img_px)
        else:
            ids.append(VSTART)
            for t, h, w in arg:
                for _ in range(t):
                    ids += [FRAME, 17] + [VIDEO_TOKEN_ID] * (h * w // 4)
                patches(vid_grid, [t, h, w], vid_px)
            ids.append(VEND)
            labels += [IGNORE_INDEX] * (len(ids) - len(labels))
    n = len(ids)
    return EncodedSample(
        input_ids=torch.tensor(ids),
        labels=torch.tensor(labels),
        position_ids=torch.arange(n).expand(3, n).clone(),
        token_ids=IDS,
        visual=VisualInputs(
            torch.cat(img_px) if img_px else None,
            torch.tensor(img_grid) if img_grid else None,
            torch.cat(vid_px) if vid_px else None,
            torch.tensor(vid_grid) if vid_grid else None,
        ),
        sample_id=sid,
    )


def random_samples(n: int, seed: int, max_text: int = 900) -> list[EncodedSample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        parts = [("text", rng.randint(5, max_text))]
        if rng.random() < 0.5:
            parts.append(("image", (rng.choice([4, 8, 12]), rng.choice([4, 8]))))
        if rng.random() < 0.3:
            parts.append(("video", [(rng.randint(1, 3), 4, 8), (1, 8, 8)]))
        parts.append(("answer", rng.randint(1, 300)))
        out.append(make_sample(f"s{seed}-{i}", parts, seed=i))
    return out


def assert_row_consistent(batch, originals: dict[str, EncodedSample], max_len: int) -> None:
    """Segments of the row are the original samples, tensors and grids line up with pad-token counts."""
    assert batch.input_ids.shape == (1, max_len) and batch.position_ids.shape == (3, 1, max_len)
    cu = batch.cu_seqlens.tolist()
    assert batch.cu_seqlens.dtype == torch.int32 and cu[0] == 0 and cu[-1] == max_len
    for k, sid in enumerate(batch.sample_ids):
        s, (a, b) = originals[sid], cu[k : k + 2]
        assert torch.equal(batch.input_ids[0, a:b], s.input_ids)
        assert torch.equal(batch.labels[0, a:b], s.labels)
        assert torch.equal(batch.position_ids[:, 0, a:b], s.position_ids)
    if len(cu) - 1 > batch.num_samples:  # tail padding segment
        a = cu[batch.num_samples]
        assert (batch.labels[0, a:] == IGNORE_INDEX).all()
        assert torch.equal(batch.position_ids[0, 0, a:], torch.arange(max_len - a))
    for token, grid, px in (
        (IMAGE_TOKEN_ID, batch.visual.image_grid_thw, batch.visual.pixel_values),
        (VIDEO_TOKEN_ID, batch.visual.video_grid_thw, batch.visual.pixel_values_videos),
    ):
        n_tok = int((batch.input_ids == token).sum())
        n_patch = 0 if grid is None else int(grid.prod(-1).sum())
        assert n_tok * 4 == n_patch == (0 if px is None else px.shape[0])


def test_pack_row_boundaries_labels_and_visuals():
    a = make_sample("a", [("text", 7), ("image", (4, 8)), ("answer", 5)])
    b = make_sample("b", [("text", 3), ("video", [(2, 4, 4), (1, 8, 4)]), ("answer", 4)])
    c = make_sample("c", [("text", 2), ("image", (8, 8)), ("image", (4, 4)), ("answer", 3)])
    batch = pack_row([a, b, c], 128)
    lens = [len(a), len(b), len(c)]
    assert batch.cu_seqlens.tolist() == [0, lens[0], sum(lens[:2]), sum(lens), 128]
    assert batch.num_samples == 3 and batch.sample_ids == ["a", "b", "c"]
    assert (batch.input_ids[0, sum(lens) :] == IDS.pad).all()
    assert int((batch.labels != IGNORE_INDEX).sum()) == a.num_label_tokens + b.num_label_tokens + c.num_label_tokens
    assert batch.visual.image_grid_thw.tolist() == [[1, 4, 8], [1, 8, 8], [1, 4, 4]]
    assert batch.visual.video_grid_thw.tolist() == [[2, 4, 4], [1, 8, 4]]
    assert torch.equal(batch.visual.pixel_values, torch.cat([a.visual.pixel_values, c.visual.pixel_values]))
    assert_row_consistent(batch, {"a": a, "b": b, "c": c}, 128)
    exact = pack_row([a, b], lens[0] + lens[1])
    assert exact.cu_seqlens.tolist() == [0, lens[0], lens[0] + lens[1]]  # no empty padding segment
    assert pack_row([a], 128, pad_to_multiple_of=16).input_ids.shape[1] == -(-lens[0] // 16) * 16
    with pytest.raises(ValueError, match="row is 20"):
        pack_row([a, b], 20)


@pytest.mark.parametrize("max_len", [8192, 32768, 131072])
def test_packer_fills_rows_and_keeps_every_sample(max_len):
    samples = random_samples(60, seed=1, max_text=max_len // 6)
    originals = {s.sample_id: s for s in samples}
    packer = Packer(samples, max_seq_len=max_len, token_ids=IDS, lookahead=8)
    rows = list(packer)
    seen = [sid for r in rows for sid in r.sample_ids]
    assert sorted(seen) == sorted(originals)
    for r in rows:
        assert_row_consistent(r, originals, max_len)
    assert packer.stats["samples"] == 60 and packer.stats["rows"] == len(rows)
    assert packer.fill_ratio == sum(map(len, samples)) / (len(rows) * max_len)
    no_lookahead = Packer(samples, max_seq_len=max_len, token_ids=IDS, lookahead=1)
    list(no_lookahead)
    assert packer.fill_ratio >= no_lookahead.fill_ratio
    full_rows = rows[:-1]  # the last row holds whatever was left over
    fill = sum(int(r.cu_seqlens[r.num_samples]) for r in full_rows) / (len(full_rows) * max_len)
    assert fill > 0.95


def test_truncation_never_splits_a_visual_block():
    s = make_sample(
        "t", [("text", 10), ("image", (8, 8)), ("text", 5), ("video", [(3, 4, 8), (1, 8, 8)]), ("answer", 50)]
    )
    check_sample(s)
    starts_img = [i for i in range(len(s)) if s.input_ids[i] == IMAGE_TOKEN_ID and s.input_ids[i - 1] != IMAGE_TOKEN_ID]
    assert starts_img == [11]
    for max_len in range(12, len(s) + 1):
        t = truncate_sample(s, max_len)
        if t is None:  # every label token lies beyond the cut
            assert max_len <= len(s) - 50
            continue
        assert len(t) <= max_len
        check_sample(t)  # grids, patches and pad-token counts still agree
        assert torch.equal(t.input_ids, s.input_ids[: len(t)]) and torch.equal(t.labels, s.labels[: len(t)])
        nxt = int(s.input_ids[len(t)]) if len(t) < len(s) else None
        prev = int(t.input_ids[-1])
        assert not (nxt in (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID) and prev == nxt)  # the cut is not inside a run
        assert len(t) == max_len or nxt in (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID)  # it moved only to dodge a block
    # a cut inside the 2nd frame of the merged [3, 4, 8] row keeps 1 frame, as a per-frame grid row
    merged = make_sample("t2", [("text", 3), ("answer", 2), ("video", [(3, 4, 8)])])  # 8 pad tokens per frame
    frame2 = [i for i in range(len(merged)) if merged.input_ids[i] == VIDEO_TOKEN_ID][8]
    t = truncate_sample(merged, frame2 + 3)
    assert len(t) == frame2 and t.visual.video_grid_thw.tolist() == [[1, 4, 8]]
    assert t.visual.pixel_values_videos.shape[0] == 32
    assert torch.equal(split_grid(torch.tensor([[3, 4, 8], [1, 2, 2]])), torch.tensor([[1, 4, 8]] * 3 + [[1, 2, 2]]))


def test_packer_truncates_or_skips_overlong_and_bad_samples():
    small = make_sample("small", [("text", 20), ("answer", 10)])
    # tokens 10..29 are labelled; the image's pad tokens sit at 56..71, across the 64-token row end
    long = make_sample("long", [("text", 10), ("answer", 20), ("text", 25), ("image", (8, 8)), ("answer", 40)])
    late_labels = make_sample("late", [("text", 70), ("answer", 5)])
    bad = make_sample("bad", [("text", 5), ("image", (4, 4)), ("answer", 3)])
    bad.visual.image_grid_thw = torch.tensor([[1, 8, 8]])
    items = [small, long, late_labels, bad]

    skipping = Packer(items, max_seq_len=64, token_ids=IDS, truncate=False)
    rows = list(skipping)
    assert [r.sample_ids for r in rows] == [["small"]]
    assert skipping.stats["skipped_overlong"] == 2 and skipping.stats["skipped_inconsistent"] == 1

    truncating = Packer(items, max_seq_len=64, token_ids=IDS, truncate=True)
    rows = list(truncating)
    assert [sid for r in rows for sid in r.sample_ids] == ["small", "long"]
    assert truncating.stats["truncated"] == 1 and truncating.stats["skipped_no_labels_after_truncation"] == 1
    long_row = next(r for r in rows if "long" in r.sample_ids)
    assert long_row.visual.image_grid_thw is None and long_row.visual.pixel_values is None  # cut before the image
    assert long_row.cu_seqlens.tolist() == [0, 56, 64]
    assert torch.equal(long_row.labels[0, :56], long.labels[:56])


class CountingStream:
    """A deterministic stateful upstream whose state is just a position (stands in for MappedStream)."""

    def __init__(self, samples):
        self.samples, self.pos = samples, 0

    def __iter__(self):
        while self.pos < len(self.samples):
            self.pos += 1
            yield self.samples[self.pos - 1]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


@pytest.mark.parametrize("stateful", [True, False])
@pytest.mark.parametrize("cut", [0, 1, 5])
def test_packer_resume_is_exact(stateful, cut):
    samples = random_samples(80, seed=2, max_text=700)

    def make():
        return Packer(CountingStream(samples) if stateful else samples, max_seq_len=2048, token_ids=IDS, lookahead=6)

    packer = make()
    it = iter(packer)
    head = [r.sample_ids for r in itertools.islice(it, cut)]
    state = packer.state_dict()
    expected = [r.sample_ids for r in it]
    resumed = make()
    resumed.load_state_dict(state)
    got = [r.sample_ids for r in resumed]
    assert got == expected and sorted(sum(head + got, [])) == sorted(s.sample_id for s in samples)
    if stateful and cut:
        assert 0 < state["replay"] < state["pulled"]  # only since the oldest waiting sample, not from the start
    assert resumed.stats["rows"] == packer.stats["rows"]


def _encode(item) -> EncodedSample:
    """Stand-in for the processor: a deterministic sample whose size depends on the record."""
    rec, _ = item
    n = int(rec["id"].split("-")[1])
    return make_sample(rec["id"], [("text", 50 + 37 * n % 400), ("image", (4, 4 * (1 + n % 3))), ("answer", 9)], n)


def test_shards_to_packed_rows_resume_under_stateful_dataloader(tmp_path):
    for s in range(4):
        with wds.TarWriter(str(tmp_path / f"p-{s}.tar"), mtime=0) as w:
            for i in range(15):
                rid = f"p-{s * 15 + i}"
                w.write({"__key__": f"{i:06d}", "json": json.dumps({"id": rid, "source": "p", "messages": []})})

    def make_loader():
        stream = ShardStream(str(tmp_path / "p-{0..3}.tar"), seed=3, shuffle_buffer=5)
        packer = Packer(MappedStream(stream, _encode), max_seq_len=1024, token_ids=IDS, lookahead=4)
        return StatefulDataLoader(packer, batch_size=None, num_workers=2)

    loader = make_loader()
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    expected = [next(it).sample_ids for _ in range(6)]
    del it
    resumed = make_loader()
    resumed.load_state_dict(state)
    assert [b.sample_ids for b in itertools.islice(iter(resumed), 6)] == expected
