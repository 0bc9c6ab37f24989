"""Thyme's prompt format (KEYE_FACTS B §1.1): a system prompt that offers the code tool, and a user turn that
carries each image's path and size, because the model's code opens the image file itself.

The wording is ours; the structure (``<code>`` + fenced python + ``</code>``, results in ``<sandbox_output>``,
"User Image Path"/"User Image Size" lines, ``<think>``/``<answer>`` format) is Thyme's.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

THYME_SYSTEM_PROMPT = (
    "You are a helpful assistant. Solve the problem step by step. When a detail of the image is too small or "
    "unclear, or a calculation is needed, you may write Python code: to crop a region of interest, resize, rotate "
    "or enhance the contrast of the image, or to compute a result. Put the code between <code> and </code> as a "
    "```python block. Open the image from the path the user gives, save processed images under "
    "/mnt/data/temp_processed_images/ with a random file name and print processed_path, or print the computed "
    "result. The output comes back between <sandbox_output> and </sandbox_output>; then continue reasoning."
)
ANSWER_FORMAT = (
    "Output the thinking process (with any code) in <think> </think> and the final answer in <answer> </answer>."
)


def image_lines(image_paths: Sequence[str]) -> str:
    """The "User Image Path"/"User Image Size" lines (numbered when there are several images)."""
    lines = []
    for i, path in enumerate(image_paths):
        with Image.open(path) as im:
            w, h = im.size
        tag = f" {i + 1}" if len(image_paths) > 1 else ""
        lines += [f"User Image Path{tag}: {os.path.abspath(path)}", f"User Image Size{tag}: {w}x{h}"]
    return "\n".join(lines)


def thyme_conversation(
    question: str, image_paths: Sequence[str | Path] = (), system_prompt: str = THYME_SYSTEM_PROMPT
) -> list[dict]:
    """System + user turn in Thyme's evaluation format: images, question, path/size lines, answer format."""
    paths = [str(p) for p in image_paths]
    content: list[dict] = [{"type": "image", "image": p} for p in paths]
    text = "\n".join(part for part in (question, image_lines(paths), ANSWER_FORMAT) if part)
    content.append({"type": "text", "text": text})
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": content}]


def add_thyme_prompt(
    messages: Sequence[dict], image_paths: Sequence[str], system_prompt: str = THYME_SYSTEM_PROMPT
) -> list[dict]:
    """An existing conversation (e.g. a benchmark's) in Thyme's format: the system prompt when it has none, and
    the path/size lines and answer format appended to the last user turn."""
    msgs = copy.deepcopy(list(messages))
    if not msgs or msgs[0].get("role") != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    users = [m for m in msgs if m.get("role") == "user"]
    if not users:
        raise ValueError("add_thyme_prompt: the conversation has no user turn")
    last = users[-1]
    extra = "\n".join(part for part in (image_lines(image_paths), ANSWER_FORMAT) if part)
    if isinstance(last.get("content"), str):
        last["content"] = f"{last['content']}\n{extra}"
    else:
        last["content"] = list(last.get("content") or []) + [{"type": "text", "text": "\n" + extra}]
    return msgs
