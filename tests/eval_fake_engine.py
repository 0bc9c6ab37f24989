"""Deterministic engines for the eval tests: they answer by reading the prompt, never by decoding media.

A prompt carries its own scripted reply as ``⟦reply:TEXT⟧`` (``⟦reply@NAME:TEXT⟧`` for an engine made with
``engine_args.name=NAME``, falling back to the plain form). Every media path in a conversation must exist, so a
test fails if the harness hands the engine a wrong path. The environment variable ``EVAL_FAKE_KILL_AFTER=K``
SIGKILLs the process once K samples have been answered (a crash test: nothing after the kill can run; it is
not an engine argument because the harness pins engine arguments between a run and its resume); ``engine_args.fail_ids`` lists ids
(``⟦id:X⟧`` in the prompt) whose generation raises, as an unreadable video would.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

_REPLY = re.compile(r"⟦reply(?:@(\w+))?:(.*?)⟧", re.DOTALL)
_ID = re.compile(r"⟦id:(.*?)⟧")


def _text_of(conv: list[dict]) -> str:
    return "\n".join(i["text"] for m in conv for i in m["content"] if i.get("type") == "text")


def _check_media(conv: list[dict]) -> None:
    for m in conv:
        for item in m["content"]:
            kind = item.get("type")
            if kind in ("image", "video"):
                paths = item[kind] if isinstance(item[kind], list) else [item[kind]]
                for p in paths:
                    if not Path(p).is_file():
                        raise FileNotFoundError(f"fake engine: media file missing: {p}")


class FakeEngine:
    def __init__(self, name: str = "", kill_after: int = 0, fail_ids: list[str] | None = None) -> None:
        self.name = name
        self.kill_after = kill_after
        self.fail_ids = set(fail_ids or [])
        self.answered = 0
        self.calls: list[list[list[dict]]] = []
        self.settings: list[Any] = []

    def reply(self, text: str) -> str:
        named = {n: r for n, r in _REPLY.findall(text) if n}
        if self.name and self.name in named:
            return named[self.name]
        plain = [r for n, r in _REPLY.findall(text) if not n]
        return plain[-1] if plain else "I cannot tell."

    def generate(self, conversations: list[list[dict]], settings: Any) -> list[str]:
        self.calls.append(conversations)
        self.settings.append(settings)
        outputs = []
        for conv in conversations:
            _check_media(conv)
            text = _text_of(conv)
            ids = _ID.findall(text)
            if ids and ids[0] in self.fail_ids:
                raise RuntimeError(f"fake engine: cannot read the video of {ids[0]}")
            outputs.append(self.reply(text))
        self.answered += len(outputs)
        if self.kill_after and self.answered >= self.kill_after:
            # The outputs of this call are never returned: like a crash in the middle of a batch.
            os.kill(os.getpid(), signal.SIGKILL)
        return outputs


def make(cfg: Any) -> FakeEngine:
    args = dict(cfg.engine_args)
    return FakeEngine(
        name=str(args.get("name", "")),
        kill_after=int(os.environ.get("EVAL_FAKE_KILL_AFTER", "0")),
        fail_ids=args.get("fail_ids"),
    )


def make_judge_a(cfg: Any) -> FakeEngine:
    return FakeEngine(name="a")


def make_judge_b(cfg: Any) -> FakeEngine:
    return FakeEngine(name="b")


def make_judge_c(cfg: Any) -> FakeEngine:
    return FakeEngine(name="c")


# ---- fixture data in each benchmark's published format ------------------------------------------------------------


def tag(reply: str, sid: str, **named: str) -> str:
    """Prompt text that scripts the fake engine's reply (and names the sample for ``fail_ids``)."""
    extra = "".join(f" ⟦reply@{n}:{r}⟧" for n, r in named.items())
    return f"⟦id:{sid}⟧ ⟦reply:{reply}⟧{extra}"


def write_time(root: Path, items: list[dict[str, Any]]) -> Path:
    """``timebench.jsonl`` + one shared 1-second 64×64 mp4 under ``videos/``; items: id, dimension, options,
    answer, reply (and optional clip_start/clip_end, named replies)."""
    import json

    from data_pipelines.synthetic import tiny

    root.mkdir(parents=True, exist_ok=True)
    tiny(root / "videos" / "clip.mp4", seconds=1.0, fps=8)
    with (root / "timebench.jsonl").open("w", encoding="utf-8") as fh:
        for it in items:
            rec = {
                "id": it["id"],
                "dimension": it["dimension"],
                "video_path": "videos/clip.mp4",
                "clip_start": it.get("clip_start"),
                "clip_end": it.get("clip_end"),
                "question": f"What happens? {tag(it['reply'], it['id'], **it.get('named', {}))}",
                "options": it["options"],
                "answer": it["answer"],
                "source_dataset": "synthetic",
            }
            fh.write(json.dumps(rec) + "\n")
    return root


def write_kc(root: Path, rows: dict[str, list[dict[str, Any]]]) -> Path:
    """``subsets/<TSV>`` with list-literal ``image_path`` cells + JPEG frames under ``images/``."""
    import csv

    from data_pipelines.synthetic import write_frame_images

    frames = write_frame_images(root / "images" / "v0", num_frames=2, height=64, width=64)
    rel = [str(Path(f).relative_to(root / "images")) for f in frames]
    (root / "subsets").mkdir(parents=True, exist_ok=True)
    for tsv, items in rows.items():
        with (root / "subsets" / tsv).open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, delimiter="\t")
            w.writerow(["index", "question", "answer", "category", "image_path"])
            for it in items:
                paths = it.get("image_path", str(rel))
                question = f"问题 {tag(it['reply'], str(it['id']), **it.get('named', {}))}"
                w.writerow([it["id"], question, it["answer"], it.get("category", ""), paths])
    return root


def write_videomme(root: Path, items: list[dict[str, Any]]) -> Path:
    """Video-MME-like JSON (``question_id``, ``videoID``, ``duration``, ``options`` "A. …", ``answer``) + mp4s."""
    import json

    from data_pipelines.synthetic import tiny

    tiny(root / "data" / "vid0.mp4", seconds=1.0, fps=8)
    rows = [
        {
            "question_id": it["id"],
            "videoID": it.get("video", "vid0"),
            "duration": it["duration"],
            "question": f"Which? {tag(it['reply'], it['id'])}",
            "options": [f"{chr(65 + i)}. {o}" for i, o in enumerate(it["options"])],
            "answer": it["answer"],
        }
        for it in items
    ]
    (root / "videomme.json").write_text(json.dumps(rows), encoding="utf-8")
    return root
