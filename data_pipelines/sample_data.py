"""A small, fully generated multimodal dataset for the demo and end-to-end tests.

Everything here has a verifiable answer so that training visibly works: images show one coloured shape
("what colour is the shape?"), videos have a known number of scene cuts and on-screen text. It writes:

- ``media/``: PNG images, h264 mp4 videos (scene cuts, on-screen text), Thyme crop outputs;
- ``pretrain.jsonl`` (captions and video descriptions), ``sft.jsonl`` (all five SFT modes: thinking,
  non-thinking, auto-think, think-with-image, video; also split per source under ``sft/`` so a mix config can
  weight them), ``rl.jsonl`` (prompts with ``solution`` and a
  five-level ``hints`` ladder);
- ``eval/``: benchmark fixtures in each benchmark's own format (``time/timebench.jsonl``,
  ``kc_mmbench/subsets/*.tsv`` + ``images/``, ``video_mcq/videos.jsonl``).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from data_pipelines import synthetic

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
LETTERS = "ABCD"


@dataclass
class SampleDataReport:
    root: str
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in self.counts.items())


def draw_shape(path: Path, colour: str, shape: str, size: int = 112, seed: int = 0) -> Path:
    """One filled shape of ``colour`` on a gray background, slightly jittered by ``seed``."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (128, 128, 128))
    d = ImageDraw.Draw(img)
    m = size // 5 + rng.randint(-6, 6)
    box = (m, m, size - m, size - m)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=fill)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _user(*items: dict) -> dict:
    return {"role": "user", "content": list(items)}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _write_jsonl(path: Path, records: list[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return len(records)


def _thyme_response(colour: str, shape: str, crop_rel: str) -> list[dict]:
    code = (
        "<code>\n```python\nimg = Image.open(image_path)\nw, h = img.size\n"
        "crop = img.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4))\n"
        "processed_path = os.path.join(temp_output_dir, 'crop.png')\ncrop.save(processed_path)\n"
        "print(processed_path)\n```\n</code>"
    )
    return [
        _text(f"<think>I will zoom into the centre of the image.{code}<sandbox_output>"),
        {"type": "image", "image": crop_rel},
        _text(f"</sandbox_output>The crop shows a {colour} {shape}.</think><answer>{colour}</answer>"),
    ]


def make_sample_data(root: str | Path, n_images: int = 12, seed: int = 0) -> SampleDataReport:
    """Write the dataset under ``root`` (idempotent: files are rewritten deterministically)."""
    root = Path(root)
    media = root / "media"
    rng = random.Random(seed)
    images: list[tuple[str, str, str]] = []  # (relative path, colour, shape)
    for i in range(n_images):
        colour = list(COLOURS)[i % len(COLOURS)]
        shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        rel = f"images/shape_{i:03d}.png"
        draw_shape(media / rel, colour, shape, seed=seed + i)
        crop_rel = f"images/shape_{i:03d}_crop.png"
        Image.open(media / rel).crop((28, 28, 84, 84)).save(media / crop_rel)
        images.append((rel, colour, shape))

    videos: list[tuple[str, int]] = []  # (relative path, number of scene cuts)
    (media / "videos").mkdir(parents=True, exist_ok=True)
    for i, every in enumerate((40, 20, 10, 8)):
        rel = f"videos/cuts_{i}.mp4"
        synthetic.scene_cuts(media / rel, every=every, num_frames=40, fps=10.0, height=112, width=160, seed=seed + i)
        videos.append((rel, 40 // every - 1))
    text_rel = "videos/text.mp4"
    synthetic.text_video(media / text_rel, seconds=3.0, fps=5.0, seed=seed)

    colour_q = "What colour is the shape?"
    cut_q = "How many scene cuts are in this video? Answer with a number."
    pretrain = [
        {
            "id": f"cap-{i}",
            "source": "caption",
            "messages": [
                _user({"type": "image", "image": rel}, _text("Describe the image.")),
                {"role": "assistant", "content": f"A {colour} {shape} on a gray background."},
            ],
        }
        for i, (rel, colour, shape) in enumerate(images)
    ]
    pretrain += [
        {
            "id": f"vid-{i}",
            "source": "video",
            "messages": [
                _user({"type": "video", "video": rel, "fps": 2.0}, _text("Describe the video.")),
                {"role": "assistant", "content": f"Moving blocks with {cuts} scene cuts."},
            ],
        }
        for i, (rel, cuts) in enumerate(videos)
    ]
    pretrain += [
        {
            "id": f"text-{i}",
            "source": "text",
            "messages": [_user(_text(f"What is {a} plus {b}?")), {"role": "assistant", "content": str(a + b)}],
        }
        for i, (a, b) in enumerate((rng.randint(1, 9), rng.randint(1, 9)) for _ in range(6))
    ]

    sft: list[dict] = []
    for i, (rel, colour, shape) in enumerate(images):
        img = {"type": "image", "image": rel}
        sft.append(
            {
                "id": f"nothink-{i}",
                "source": "non_thinking",
                "mode": "no_think",
                "messages": [_user(img, _text(colour_q)), {"role": "assistant", "content": colour}],
            }
        )
        sft.append(
            {
                "id": f"think-{i}",
                "source": "thinking",
                "mode": "think",
                "messages": [
                    _user(img, _text(colour_q)),
                    {
                        "role": "assistant",
                        "content": f"<think>The {shape} is filled with {colour}.</think><answer>{colour}</answer>",
                    },
                ],
            }
        )
        sft.append(
            {
                "id": f"auto-{i}",
                "source": "auto_think",
                "mode": "auto",
                "messages": [
                    _user(img, _text(colour_q)),
                    {"role": "assistant", "content": f"<analysis>A simple perception question.</analysis>{colour}"},
                ],
            }
        )
        sft.append(
            {
                "id": f"thyme-{i}",
                "source": "think_with_image",
                "mode": "think",
                "messages": [
                    _user(img, _text(colour_q)),
                    {"role": "assistant", "content": _thyme_response(colour, shape, rel.replace(".png", "_crop.png"))},
                ],
            }
        )
    for i, (rel, cuts) in enumerate(videos):
        vid = {"type": "video", "video": rel, "fps": 2.0}
        sft.append(
            {
                "id": f"video-nothink-{i}",
                "source": "video",
                "mode": "no_think",
                "messages": [_user(vid, _text(cut_q)), {"role": "assistant", "content": str(cuts)}],
            }
        )
        sft.append(
            {
                "id": f"video-think-{i}",
                "source": "video",
                "mode": "think",
                "messages": [
                    _user(vid, _text(cut_q)),
                    {
                        "role": "assistant",
                        "content": f"<think>I count {cuts} changes of scene.</think><answer>{cuts}</answer>",
                    },
                ],
            }
        )

    rl = [
        {
            "id": f"rl-{i}",
            "source": "colour",
            "mode": "no_think",
            "messages": [_user({"type": "image", "image": rel}, _text(colour_q + " Answer with one word."))],
            "solution": colour,
            "hints": [
                "Look at the filled region in the middle of the image.",
                "Ignore the gray background; name the colour of the shape.",
                f"The answer is one of: {', '.join(COLOURS)}.",
                f"The shape is a {shape}; its colour is a primary-like colour.",
                f"The answer is {colour}.",
            ],
        }
        for i, (rel, colour, shape) in enumerate(images)
    ]

    counts = {
        "images": len(images),
        "videos": len(videos) + 1,
        "pretrain": _write_jsonl(root / "pretrain.jsonl", pretrain),
        "sft": _write_jsonl(root / "sft.jsonl", sft),
        **{
            f"sft_{src}": _write_jsonl(root / "sft" / f"{src}.jsonl", [r for r in sft if r["source"] == src])
            for src in dict.fromkeys(r["source"] for r in sft)
        },
        "rl": _write_jsonl(root / "rl.jsonl", rl),
    }
    counts.update(write_eval_fixtures(root / "eval", media, images, videos, text_rel, seed))
    return SampleDataReport(str(root), counts)


def balance_answers(items: list[tuple[list[str], str]], rng: random.Random) -> list[tuple[list[str], str]]:
    """``(options, correct option text)`` → ``(options, correct letter)`` with every letter correct equally often
    (±1) among items with the same number of options, as ``keye eval-filter`` rebalances a filtered set: the
    correct option is swapped into a seeded, balanced position, the other options keep their order."""
    out: list[tuple[list[str], str] | None] = [None] * len(items)
    by_k: dict[int, list[int]] = {}
    for i, (options, _) in enumerate(items):
        by_k.setdefault(len(options), []).append(i)
    for k, group in sorted(by_k.items()):
        offset = rng.randrange(k)  # a group smaller than k must not always start at A
        targets = [(offset + j) % k for j in range(len(group))]
        rng.shuffle(targets)
        for i, target in zip(group, targets):
            options, correct = list(items[i][0]), items[i][1]
            cur = options.index(correct)
            options[cur], options[target] = options[target], options[cur]
            out[i] = (options, LETTERS[target])
    return [o for o in out if o is not None]


def write_eval_fixtures(
    out: Path, media: Path, images: list[tuple[str, str, str]], videos: list[tuple[str, int]], text_rel: str, seed: int
) -> dict[str, int]:
    """Benchmark fixtures in each benchmark's published (or documented) format, pointing at ``media``."""
    rng = random.Random(seed)
    counts: dict[str, int] = {}

    # TIME: our documented JSONL record, five dimensions; correct letters balanced per option count.
    time_specs = []  # (id, dimension, video, options, correct option)
    dims = ("Dynamic", "Reasoning", "Duration", "Location", "Order")
    for i, (rel, cuts) in enumerate(videos):
        for j, dim in enumerate(dims):
            options = [str(cuts + d) for d in range(3 if dim in ("Duration", "Location") else 4)]
            rng.shuffle(options)
            time_specs.append((f"time-{i}-{j}", dim, rel, options, str(cuts)))
    time_rows = [
        {
            "id": rid,
            "dimension": dim,
            "video_path": str((media / rel).resolve()),
            "clip_start": 0.0,
            "clip_end": 4.0,
            "question": "How many scene cuts happen in the clip?",
            "options": options,
            "answer": letter,
            "source_dataset": "synthetic",
        }
        for (rid, dim, rel, _, _), (options, letter) in zip(
            time_specs, balance_answers([(o, c) for *_, o, c in time_specs], rng)
        )
    ]
    counts["eval_time"] = _write_jsonl(out / "time" / "timebench.jsonl", time_rows)

    # KC-MMBench: subsets/*.tsv with list-literal frame paths under images/.
    kc = out / "kc_mmbench"
    frames_rel = []
    for i in range(3):
        paths = synthetic.write_frame_images(
            kc / "images" / f"clip{i}", num_frames=4, height=84, width=112, seed=seed + i
        )
        frames_rel.append([str(Path(p).relative_to(kc / "images")) for p in paths])
    tasks = {
        "CPV.tsv": [("这个商品是什么颜色？", "红色")],
        "Video_Topic.tsv": [("这些视频与第一个视频主题相同吗？", "是_否")],
        "Video_Order.tsv": [("这些视频的正确顺序是什么？", "1,2,3")],
        "PornComment.tsv": [("这条评论是否低俗？", "否")],
        "High_like.tsv": [("这个视频点赞率高吗？", "是")],
        "SPU.tsv": [("这两个商品是同一款吗？", "否")],
    }
    (kc / "subsets").mkdir(parents=True, exist_ok=True)
    n_kc = 0
    for name, rows in tasks.items():
        with (kc / "subsets" / name).open("w", newline="") as fh:
            writer = csv.writer(fh, delimiter="\t")
            writer.writerow(["index", "question", "answer", "category", "image_path"])
            for k, (question, answer) in enumerate(rows * 2):
                writer.writerow([k, question, answer, "synthetic", repr(frames_rel[k % len(frames_rel)])])
                n_kc += 1
    counts["eval_kc_mmbench"] = n_kc

    # Generic video MCQ (the README's video_mcq JSONL); correct letters balanced per option count (A-D all used).
    mcq_specs = [  # (id, video, question, options, correct option, category)
        (f"mcq-{i}", rel, "How many scene cuts?", [str(cuts + d) for d in (0, 2, 5, 1)], str(cuts), "counting")
        for i, (rel, cuts) in enumerate(videos)
    ]
    mcq_specs.append(("mcq-text", text_rel, "Is there text on screen?", ["yes", "no"], "yes", "ocr"))
    balanced = balance_answers([(o, c) for _, _, _, o, c, _ in mcq_specs], random.Random(f"video_mcq:{seed}"))
    mcq = [
        {
            "id": rid,
            "video": str((media / rel).resolve()),
            "question": question,
            "options": options,
            "answer": letter,
            "category": category,
        }
        for (rid, rel, question, _, _, category), (options, letter) in zip(mcq_specs, balanced)
    ]
    counts["eval_video_mcq"] = _write_jsonl(out / "video_mcq" / "videos.jsonl", mcq)
    return counts
