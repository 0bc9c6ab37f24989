"""``KeyeVLProcessor``: conversations with images and videos → token ids, labels, positions and patches.

The chat format is Qwen's (``<|im_start|>role\\n … <|im_end|>\\n``, default system prompt). Each image becomes
``<|vision_start|>`` + n × ``<|image_pad|>`` + ``<|vision_end|>``; each video frame j becomes ``<|frame|>`` +
its timestamp ("12.5") + n_j × ``<|video_pad|>``, fast frames wrapped in ``<|fast_start|> … <|fast_end|>``
(KEYE_FACTS Part A §2–3). Expansion happens on token ids, not strings, so a 60K-token video costs no
tokenizer time. Labels cover assistant text and its ``<|im_end|>`` only; visual tokens, Thyme sandbox
outputs (``<sandbox_output>…</sandbox_output>``) and everything else are ``IGNORE_INDEX``.

Token ids come from the model config (``token_ids``: ``KeyeVLConfig``'s ``*_token_id`` fields, the checkpoint's
``config.json`` in ``from_pretrained``) and the tokenizer's padding token; every encoded sample carries them.

Saved beside the tokenizer: ``preprocessor_config.json`` (the released image processor's file: its pixel limits,
rescale factor, mean and std, read into ``image_config``; see ``keye.preprocessor_config``) and
``keye_processor_config.json`` (our own settings: the first-stage image limits, video options, system prompt, Thyme
flag). Every image and video is turned into pixels through ``encode_image``/``encode_video`` with ``image_config``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from data_pipelines.encoded import IGNORE_INDEX, EncodedSample, TokenIds, VisualInputs
from data_pipelines.media import FAST, VideoClip, VideoOptions, timestamp_text
from data_pipelines.resize import MAX_PIXELS, MIN_PIXELS
from keye.configuration import KeyeVLConfig
from keye.image_processing import image_to_patches, video_to_patches
from keye.preprocessor_config import ImageProcessorConfig
from keye.reasoning import apply_mode
from keye.released_processor import merge_grids
from keye.rope import multimodal_position_ids
from keye.tokenizer import load_tokenizer

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
PROCESSOR_CONFIG = "keye_processor_config.json"
SANDBOX_TAG = re.compile(r"(<sandbox_output>|</sandbox_output>)")
MERGE = 2
PATCH = 14

# A Jinja rendering of the same template, saved with the tokenizer for tools that use apply_chat_template
# (vLLM, lmms-eval). tests/test_processor.py checks it renders exactly what encode_conversation tokenises.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- else %}{{- item['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass
class ProcessorConfig:
    """Our settings beyond the released ``preprocessor_config.json``; saved as ``keye_processor_config.json``.

    ``min_pixels``/``max_pixels`` are the *first* image resize (keye-vl-utils' ``fetch_image`` defaults, overridable
    per message item); the released image processor's own limits, applied after it, are ``ImageProcessorConfig``'s.
    """

    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    video: VideoOptions = dataclasses.field(default_factory=VideoOptions)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    thyme_final_round_only: bool = True  # Thyme SFT: mask all but the last code round (KEYE_FACTS B §1.4)


def load_processor_config(directory: str | Path) -> ProcessorConfig:
    """``directory/keye_processor_config.json`` (our video options and first-stage image limits), or the defaults
    when the directory has none (older checkpoints); a bad key is an error naming it and the file. No tokenizer is
    loaded: ``keye video-info --model`` reads the video options here, as ``from_pretrained`` does."""
    from keye.typed_config import from_dict

    cfg_path = Path(directory) / PROCESSOR_CONFIG
    if not cfg_path.is_file():
        return ProcessorConfig()
    return from_dict(ProcessorConfig, json.loads(cfg_path.read_text()), str(cfg_path))


def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """Copy of ``messages`` with string content turned into a one-item text list; validates roles and types."""
    out = []
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: role must be system, user or assistant, got {role!r}")
        content = msg.get("content", "")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        for j, item in enumerate(content):
            if item.get("type") not in ("text", "image", "video"):
                raise ValueError(f"message {i} item {j}: type must be text, image or video, got {item.get('type')!r}")
        out.append({"role": role, "content": [dict(item) for item in content]})
    return out


def _with_mode(messages: list[dict], mode: str | None) -> list[dict]:
    """Append the reasoning-mode suffix (/think, /no_think) to the text of every user turn."""
    if not mode or mode == "auto":
        return messages
    for msg in messages:
        if msg["role"] != "user":
            continue
        texts = [it for it in msg["content"] if it["type"] == "text"]
        if texts:
            texts[-1]["text"] = apply_mode(texts[-1]["text"], mode)
        else:
            msg["content"].append({"type": "text", "text": apply_mode("", mode)})
    return messages


class KeyeVLProcessor:
    """Tokenizer + pixel processing + chat template. ``encode_conversation`` serves training and inference.

    ``config``: our settings (``keye_processor_config.json``); ``image_config``: the released image processor's
    (``preprocessor_config.json``, published Keye-VL 1.5 values by default); ``model_config``: the ``KeyeVLConfig``
    whose token ids it encodes with (``token_ids``; the config's defaults when not given).
    """

    def __init__(
        self,
        tokenizer=None,
        config: ProcessorConfig | None = None,
        image_config: ImageProcessorConfig | None = None,
        model_config: KeyeVLConfig | None = None,
    ) -> None:
        self.tokenizer = tokenizer or load_tokenizer()
        self.tokenizer.chat_template = CHAT_TEMPLATE
        self.config = config or ProcessorConfig()
        self.image_config = image_config or ImageProcessorConfig()
        self.token_ids = TokenIds.from_config(model_config or KeyeVLConfig(), self.tokenizer.pad_token_id)
        self._text_cache: dict[str, list[int]] = {}

    # --- persistence -----------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(directory))
        self.image_config.save(directory)
        (directory / PROCESSOR_CONFIG).write_text(json.dumps(dataclasses.asdict(self.config), indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path, model_config: KeyeVLConfig | None = None) -> KeyeVLProcessor:
        """Tokenizer, ``preprocessor_config.json`` and ``keye_processor_config.json`` of ``directory``; a missing
        JSON file (older checkpoints) means its defaults, a bad key in one is an error naming it and the file.
        Token ids are ``model_config``'s, by default those of the checkpoint's ``config.json`` when it has one."""
        directory = Path(directory)
        if model_config is None and (directory / "config.json").is_file():
            model_config = KeyeVLConfig.from_pretrained(directory)
        return cls(
            load_tokenizer(directory),
            load_processor_config(directory),
            ImageProcessorConfig.load(directory),
            model_config,
        )

    # --- text ------------------------------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        cached = self._text_cache.get(text)
        if cached is None:
            cached = self.tokenizer.encode(text, add_special_tokens=False)
            if len(text) < 64:
                self._text_cache[text] = cached
        return cached

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # --- media -----------------------------------------------------------------------------------------------
    def load_image_item(self, item: dict, media_root: str | Path | None) -> Image.Image:
        """The image of a message item after the first resize (keye-vl-utils' ``fetch_image``: the item's
        ``min_pixels``/``max_pixels`` or ``resized_height``/``resized_width``, else ``config``'s limits)."""
        from data_pipelines.image_reader import load_image

        source = item.get("image")
        if isinstance(source, (str, Path)) and media_root is not None and not Path(source).is_absolute():
            source = str(Path(media_root) / source)
        resized = None
        if item.get("resized_height") and item.get("resized_width"):
            resized = (int(item["resized_height"]), int(item["resized_width"]))
        return load_image(
            source,
            int(item.get("min_pixels", self.config.min_pixels)),
            int(item.get("max_pixels", self.config.max_pixels)),
            resized,
        )

    def encode_image(
        self, item: dict | Image.Image, media_root: str | Path | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Patches and grid ``[1, h/14, w/14]`` of an image item (or a PIL image): both resizes, then rescale and
        normalise with ``image_config``. The one way images become pixels, in training, inference and tools."""
        if isinstance(item, Image.Image):
            item = {"image": item}
        return image_to_patches(self.load_image_item(item, media_root), self.image_config)

    def encode_video(self, clip: VideoClip) -> tuple[torch.Tensor, list[list[int]]]:
        """Patches and per-frame grids of a loaded clip: frames at their slow/fast sizes, rescaled and normalised
        with ``image_config`` (its pixel limits do not apply to videos, as in the released processor)."""
        return video_to_patches(clip, self.image_config)

    def video_options(self, item: dict) -> VideoOptions:
        return self.config.video.for_item(item)

    def load_video_item(self, item: dict, media_root: str | Path | None) -> VideoClip:
        from data_pipelines.video_reader import load_video

        source = item.get("video")
        if isinstance(source, VideoClip):
            return source

        def rooted(p):
            return str(Path(media_root) / p) if media_root is not None and not Path(p).is_absolute() else p

        if isinstance(source, (list, tuple)):
            source = [rooted(p) for p in source]
        elif isinstance(source, (str, Path)):
            source = rooted(source)
        return load_video(source, self.video_options(item))

    def image_ids(self, grid: list[int]) -> list[int]:
        t = self.token_ids
        return [t.vision_start] + [t.image] * (grid[1] * grid[2] // (MERGE * MERGE)) + [t.vision_end]

    def video_ids(self, clip: VideoClip, grids: list[list[int]]) -> list[int]:
        t = self.token_ids
        ids = [t.vision_start]
        for j, (_, h, w) in enumerate(grids):
            ids.append(t.frame)
            if clip.timestamps:
                ids.extend(self._ids(timestamp_text(clip.timestamps[j])))
            pads = [t.video] * (h * w // (MERGE * MERGE))
            if clip.frame_types[j] == FAST:
                ids.extend([t.fast_start, *pads, t.fast_end])
            else:
                ids.extend(pads)
        ids.append(t.vision_end)
        return ids

    def _sample(
        self, ids: list[int], labels: list[int], img_patches, img_grids, vid_patches, vid_grids, **kw
    ) -> EncodedSample:
        """An ``EncodedSample`` of ``ids`` with its multimodal positions and the collected patches and grids
        (``[1, h, w]`` per image, run-length merged rows per video)."""
        t = self.token_ids
        input_ids = torch.tensor(ids, dtype=torch.long)
        visual = VisualInputs(
            torch.cat(img_patches) if img_patches else None,
            torch.tensor(img_grids, dtype=torch.long).view(-1, 3) if img_grids else None,
            torch.cat(vid_patches) if vid_patches else None,
            torch.tensor(vid_grids, dtype=torch.long).view(-1, 3) if vid_grids else None,
        )
        return EncodedSample(
            input_ids=input_ids,
            labels=torch.tensor(labels, dtype=torch.long),
            position_ids=multimodal_position_ids(
                input_ids, t.image, t.video, visual.image_grid_thw, visual.video_grid_thw, MERGE
            ),
            token_ids=t,
            visual=visual,
            **kw,
        )

    # --- encoding --------------------------------------------------------------------------------------------
    def encode_conversation(
        self,
        messages: Sequence[dict],
        mode: str | None = None,
        add_generation_prompt: bool = False,
        media_root: str | Path | None = None,
        sample_id: str = "",
        source: str = "",
        continue_final_message: bool = False,
    ) -> EncodedSample:
        """Tokenise one conversation; images/videos are paths (under ``media_root``), bytes, PIL or VideoClip.

        ``continue_final_message``: leave the last (assistant) turn open, without ``<|im_end|>``, so generation
        continues inside it (the Thyme tool loop splices sandbox output into the same assistant turn).
        """
        msgs = _with_mode(normalize_messages(messages), mode)
        # --- continue_final_message (owned by the Thyme tool loop) ---
        if continue_final_message:
            if add_generation_prompt:
                raise ValueError("continue_final_message and add_generation_prompt exclude each other")
            if not msgs or msgs[-1]["role"] != "assistant":
                found = msgs[-1]["role"] if msgs else "no messages"
                raise ValueError(f"continue_final_message needs an assistant turn last, found {found}")
        # --- end continue_final_message ---
        if not msgs or msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": [{"type": "text", "text": self.config.system_prompt}]})
        ids: list[int] = []
        labels: list[int] = []
        img_patches, img_grids, vid_patches, vid_grids = [], [], [], []

        def emit(piece: list[int], trained: bool) -> None:
            ids.extend(piece)
            labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))

        for n_msg, msg in enumerate(msgs):
            assistant = msg["role"] == "assistant"
            emit(self._ids(f"<|im_start|>{msg['role']}\n"), False)
            turn_start = len(ids)
            inside_sandbox = False
            sandbox_ends: list[int] = []
            for item in msg["content"]:
                if item["type"] == "text":
                    for part in SANDBOX_TAG.split(item.get("text", "")):
                        if not part:
                            continue
                        if part == "<sandbox_output>":
                            inside_sandbox = True
                            emit(self._ids(part), False)
                        elif part == "</sandbox_output>":
                            inside_sandbox = False
                            emit(self._ids(part), False)
                            sandbox_ends.append(len(ids))
                        else:
                            emit(self._ids(part), assistant and not inside_sandbox)
                elif item["type"] == "image":
                    patches, grid = self.encode_image(item, media_root)
                    img_patches.append(patches)
                    img_grids.append(grid)
                    emit(self.image_ids(grid), False)
                else:
                    clip = self.load_video_item(item, media_root)
                    patches, grids = self.encode_video(clip)
                    vid_patches.append(patches)
                    vid_grids.extend(merge_grids(grids))
                    emit(self.video_ids(clip, grids), False)
            if assistant and self.config.thyme_final_round_only and len(sandbox_ends) >= 2:
                # Thyme SFT: only the final code round and the answer are supervised.
                labels[turn_start : sandbox_ends[-2]] = [IGNORE_INDEX] * (sandbox_ends[-2] - turn_start)
            if continue_final_message and n_msg == len(msgs) - 1:
                break  # the open assistant turn: no <|im_end|>
            emit(self._ids("<|im_end|>"), assistant)
            emit(self._ids("\n"), False)
        if add_generation_prompt:
            emit(self._ids("<|im_start|>assistant\n"), False)

        return self._sample(
            ids, labels, img_patches, img_grids, vid_patches, vid_grids, sample_id=sample_id, source=source
        )

    def encode_prompt(
        self, text: str, images: Sequence[Image.Image] = (), videos: Sequence[VideoClip] = ()
    ) -> EncodedSample:
        """A raw prompt whose ``<|image_pad|>``/``<|video_pad|>`` placeholders are matched to ``images``/``videos``.

        Each placeholder stands for one whole image or video and is expanded here; the counts must match.
        """
        ids = self._ids(text) if len(text) < 64 else self.tokenizer.encode(text, add_special_tokens=False)
        t = self.token_ids
        n_img = ids.count(t.image)
        n_vid = ids.count(t.video)
        if n_img != len(images) or n_vid != len(videos):
            raise ValueError(
                f"prompt has {n_img} image and {n_vid} video placeholders but {len(images)} images and "
                f"{len(videos)} videos were given"
            )
        out: list[int] = []
        img_patches, img_grids, vid_patches, vid_grids = [], [], [], []
        images_left, videos_left = list(images), list(videos)
        for tok in ids:
            if tok == t.image:
                patches, grid = self.encode_image({"image": images_left.pop(0)})
                img_patches.append(patches)
                img_grids.append(grid)
                out.extend(self.image_ids(grid)[1:-1])
            elif tok == t.video:
                clip = videos_left.pop(0)
                patches, grids = self.encode_video(clip)
                vid_patches.append(patches)
                vid_grids.extend(merge_grids(grids))
                out.extend(self.video_ids(clip, grids)[1:-1])
            else:
                out.append(tok)
        return self._sample(out, [IGNORE_INDEX] * len(out), img_patches, img_grids, vid_patches, vid_grids)

    def collate_for_generation(self, samples: Sequence[EncodedSample]) -> dict[str, Any]:
        """Left-pad encoded prompts into one batch for ``model.generate`` (positions are computed by the model)."""
        pad_id = self.token_ids.pad
        longest = max(len(s) for s in samples)
        input_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
        for b, s in enumerate(samples):
            input_ids[b, longest - len(s) :] = s.input_ids
            attention_mask[b, longest - len(s) :] = 1
        visual = VisualInputs.concat(s.visual for s in samples)
        return {"input_ids": input_ids, "attention_mask": attention_mask, **visual.as_kwargs()}

    def __call__(
        self,
        conversations: Sequence[Sequence[dict]],
        mode: str | None = None,
        add_generation_prompt: bool = True,
        media_root: str | Path | None = None,
    ) -> dict[str, Any]:
        """Batch of conversations → left-padded model inputs for generation."""
        encoded = [self.encode_conversation(c, mode, add_generation_prompt, media_root) for c in conversations]
        return self.collate_for_generation(encoded)
