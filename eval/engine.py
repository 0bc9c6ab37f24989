"""The engine seam: anything with ``generate(conversations, settings) -> list[str]`` can be evaluated.

``engine == "keye"`` loads our own checkpoints through ``keye.inference.ChatEngine`` (imported lazily so the
harness, its tests and ``keye eval-filter`` with custom judges never import the model stack); ``module:factory``
names a callable ``factory(cfg) -> engine`` for other models or hosted APIs.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Protocol

from eval.config import EvalConfig, GenerationConfig, MediaConfig


class Engine(Protocol):
    def generate(self, conversations: list[list[dict]], settings: Any) -> list[str]: ...


@dataclass
class SamplingSettings:
    """Decoding settings handed to custom engines (the ``keye`` engine gets ``keye.inference.GenerationSettings``)."""

    max_new_tokens: int = 2048
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 1
    repetition_penalty: float = 1.0


def sampling_settings(gen: GenerationConfig) -> SamplingSettings:
    return SamplingSettings(
        max_new_tokens=gen.max_new_tokens,
        temperature=gen.temperature,
        top_p=gen.top_p,
        top_k=gen.top_k,
        repetition_penalty=gen.repetition_penalty,
    )


def media_dict(media: MediaConfig) -> dict[str, Any]:
    """Video defaults as the plain mapping ``ChatEngine.from_pretrained(media=...)`` takes (image limits travel
    on each image item instead)."""
    return {k: v for k, v in dataclasses.asdict(media).items() if not k.startswith("image_")}


def resolve_factory(spec: str) -> Any:
    """``"package.module:callable"`` -> the callable; the error names what was expected and found."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"engine must be 'keye' or 'module:factory', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"engine {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"engine {spec!r}: module {module_name!r} has no callable {attr!r}")
    return factory


def load_engine(cfg: EvalConfig) -> Any:
    """The engine ``cfg`` names; the returned object also carries the settings it expects via :func:`settings_for`."""
    if cfg.tools and cfg.engine != "keye":
        raise ValueError(f"tools=true needs engine 'keye', got engine {cfg.engine!r}")
    if cfg.engine == "keye":
        if not cfg.model:
            raise ValueError("engine 'keye' needs --model DIR (a Keye checkpoint directory)")
        from keye.inference import ChatEngine

        loop_cfg = tool_loop_config(cfg.tool_options) if cfg.tools else None  # a bad option fails before loading
        engine = ChatEngine.from_pretrained(cfg.model, media=media_dict(cfg.media), device=cfg.device)
        if loop_cfg is None:
            return engine
        from keye.thyme import ToolChatEngine

        return ToolChatEngine(engine, loop_cfg[0], thyme_prompt=loop_cfg[1])
    engine = resolve_factory(cfg.engine)(cfg)
    if not callable(getattr(engine, "generate", None)):
        raise ValueError(f"engine factory {cfg.engine!r} returned {type(engine).__name__}, which has no generate()")
    return engine


def tool_loop_config(options: dict[str, Any]) -> tuple[Any, bool]:
    """(``ToolLoopConfig`` = evaluation defaults + ``options``, whether to use Thyme's prompt format)."""
    from keye.thyme import ToolLoopConfig
    from keye.typed_config import from_dict, to_dict

    opts = dict(options)
    thyme_prompt = opts.pop("thyme_prompt", True)
    if not isinstance(thyme_prompt, bool):
        raise ValueError(f"tool_options.thyme_prompt must be true or false, got {thyme_prompt!r}")
    base = to_dict(ToolLoopConfig.evaluation())
    for key, value in opts.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return from_dict(ToolLoopConfig, base, "tool_options"), thyme_prompt


def settings_for(cfg: EvalConfig, gen: GenerationConfig | None = None) -> Any:
    """Generation settings in the type the configured engine expects."""
    settings = sampling_settings(gen or cfg.generation)
    if cfg.engine != "keye":
        return settings
    from keye.inference import GenerationSettings

    accepted = {f.name for f in dataclasses.fields(GenerationSettings)}
    return GenerationSettings(**{k: v for k, v in dataclasses.asdict(settings).items() if k in accepted})
