"""Generation from a saved checkpoint: the transformers engine, used by ``keye chat``, the eval harness, RL rollouts
and the Thyme loop (``keye.generation`` has the engine interface and the vLLM engine).

``ChatEngine`` owns a model and its processor; ``generate`` takes chat-format conversations (text, image and
video items), left-pads them into one batch and decodes with the KV cache (greedy when temperature is 0).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from data_pipelines.encoded import EncodedSample


@dataclass
class GenerationSettings:
    """Decoding settings. ``temperature == 0`` means greedy (the evaluation default)."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None

    @classmethod
    def from_config(cls, cfg: object, **overrides) -> GenerationSettings:
        """Settings from any config with same-named fields (eval's ``generation``, RL's ``rollout``); the rest of
        the config (batch size, group size, …) is not a decoding setting and is ignored."""
        values = {f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)}
        return cls(**{**values, **overrides})

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass
class GenerationResult:
    """One batch's answers. ``token_ids`` end before the end-of-turn token; ``logprobs`` (engines that report them:
    vLLM) are the engine's log-prob of each sampled token, the end-of-turn token's included when it was sampled."""

    texts: list[str]
    token_ids: list[list[int]]
    visual_tokens: list[int]
    prompt_tokens: list[int]
    seconds: float
    first_token_seconds: float | None = None
    logprobs: list[list[float]] | None = None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class ChatEngine:
    """A model + processor pair ready to answer conversations (the ``transformers`` generation engine)."""

    name = "transformers"
    holds_weights = False  # generates with the model it was given: a trainer's updates are seen at once

    def __init__(self, model, processor, device: str | None = None) -> None:
        self.device = torch.device(device or default_device())
        self.model = model.to(self.device).eval()
        self.processor = processor

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, media: dict | None = None, device: str | None = None, dtype: str = "auto"
    ) -> ChatEngine:
        """Load a checkpoint written by ``keye init`` or a training run. ``media`` overrides video options."""
        from keye.auto import register
        from keye.modeling import KeyeVLForConditionalGeneration
        from keye.paths import checkpoint_dir
        from keye.processing import KeyeVLProcessor

        model_dir = checkpoint_dir(model_dir)  # "did you mean RUN/hf?" when given a run or a checkpoint step
        register()
        device = device or default_device()
        torch_dtype = torch.float32
        if dtype == "auto" and device.startswith("cuda"):
            torch_dtype = torch.bfloat16
        elif dtype not in ("auto", "float32"):
            torch_dtype = getattr(torch, dtype)
        model = KeyeVLForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch_dtype)
        return cls(model, cls.media_processor(KeyeVLProcessor.from_pretrained(model_dir), media), device)

    @staticmethod
    def media_processor(processor, media: dict | None):
        """``processor`` with its video options overridden by ``media`` (eval's media settings); an unknown key
        is an error naming it."""
        if media:
            video_keys = {f.name for f in dataclasses.fields(processor.config.video)}
            unknown = sorted(set(media) - video_keys - {"min_pixels", "max_pixels"})
            if unknown:
                raise ValueError(f"unknown media setting '{unknown[0]}' (known: {sorted(video_keys)})")
            processor.config.video = dataclasses.replace(
                processor.config.video, **{k: v for k, v in media.items() if k in video_keys}
            )
        return processor

    def encode(self, conversations: Sequence[Sequence[dict]], mode: str | None = None) -> list[EncodedSample]:
        return [self.processor.encode_conversation(c, mode=mode, add_generation_prompt=True) for c in conversations]

    @torch.inference_mode()
    def generate_encoded(
        self,
        samples: Sequence[EncodedSample],
        settings: GenerationSettings,
        streamer=None,
    ) -> GenerationResult:
        """Decode a batch of already-encoded prompts (left-padded, KV cache)."""
        start = time.perf_counter()
        batch = self.processor.collate_for_generation(samples)
        batch = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        kwargs = settings.generate_kwargs()
        tok = self.processor.tokenizer
        if settings.stop_strings:
            kwargs.update(stop_strings=list(settings.stop_strings), tokenizer=tok)
        out = self.model.generate(
            **{k: v for k, v in batch.items() if v is not None},
            pad_token_id=tok.pad_token_id,
            eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id],
            streamer=streamer,
            **kwargs,
        )
        new = out[:, batch["input_ids"].shape[1] :].tolist()
        cleaned = [_strip_after_eos(ids, {tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id}) for ids in new]
        texts = [tok.decode(ids, skip_special_tokens=True) for ids in cleaned]
        visual = [s.num_visual_tokens for s in samples]
        return GenerationResult(
            texts=texts,
            token_ids=cleaned,
            visual_tokens=visual,
            prompt_tokens=[len(s) for s in samples],
            seconds=time.perf_counter() - start,
            first_token_seconds=getattr(streamer, "first_token_seconds", None),
        )

    def generate(
        self,
        conversations: Sequence[Sequence[dict]],
        settings: GenerationSettings | None = None,
        mode: str | None = None,
    ) -> list[str]:
        """Answers for a batch of chat-format conversations (the interface the eval harness and RL use)."""
        settings = settings or GenerationSettings()
        return self.generate_encoded(self.encode(conversations, mode), settings).texts


def _strip_after_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


class TimedTextStreamer:
    """Streams decoded text to a callback and records the time to the first generated token."""

    def __init__(self, tokenizer, on_text: Callable[[str], None], skip_prompt: bool = True) -> None:
        from transformers import TextStreamer

        outer = self

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    on_text(text)

            def put(self, value):
                if outer.first_token_seconds is None and not self.next_tokens_are_prompt:
                    outer.first_token_seconds = time.perf_counter() - outer.started
                super().put(value)

        self.started = time.perf_counter()
        self.first_token_seconds: float | None = None
        self._inner = _Streamer(tokenizer, skip_prompt=skip_prompt, skip_special_tokens=True)

    def put(self, value) -> None:
        self._inner.put(value)

    def end(self) -> None:
        self._inner.end()
