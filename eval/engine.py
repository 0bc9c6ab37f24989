"""The engine seam: anything with ``generate(conversations, settings) -> list[str]`` can be evaluated.

``engine == "keye"`` loads our own checkpoints through the generation engine ``generation.engine`` names
(``keye.generation``: ``transformers`` or ``vllm``; imported lazily so the harness, its tests and ``keye
eval-filter`` with custom judges never import the model stack); ``module:factory`` names a callable
``factory(cfg) -> engine`` for other models or hosted APIs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from eval.config import EvalConfig, GenerationConfig, MediaConfig
from keye.plugins import load_callable


class Engine(Protocol):
    def generate(self, conversations: list[list[dict]], settings: Any) -> list[str]: ...


def media_dict(media: MediaConfig) -> dict[str, Any]:
    """Video defaults as the plain mapping ``ChatEngine.from_pretrained(media=...)`` takes (image limits and the
    frame-list fps travel on each item instead, see ``benchmarks.base.video_item``)."""
    per_item = {"frame_list_fps"}
    return {k: v for k, v in dataclasses.asdict(media).items() if not k.startswith("image_") and k not in per_item}


def load_engine(cfg: EvalConfig) -> Any:
    """The engine ``cfg`` names; the returned object also carries the settings it expects via :func:`settings_for`."""
    if cfg.tools and cfg.engine != "keye":
        raise ValueError(f"tools=true needs engine 'keye', got engine {cfg.engine!r}")
    if cfg.engine == "keye":
        if not cfg.model:
            raise ValueError("engine 'keye' needs --model DIR (a Keye checkpoint directory)")
        from keye.generation import load_engine as load_generation_engine

        loop_cfg = tool_loop_config(cfg.tool_options) if cfg.tools else None  # a bad option fails before loading
        engine = load_generation_engine(
            cfg.generation.engine, cfg.model, media=media_dict(cfg.media), device=cfg.device, seed=cfg.seed
        )
        if loop_cfg is None:
            return engine
        from keye.thyme import ToolChatEngine

        return ToolChatEngine(engine, loop_cfg[0], thyme_prompt=loop_cfg[1])
    engine = load_callable(cfg.engine, "engine")(cfg)
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
    """Generation settings for any engine (custom engines receive the same ``GenerationSettings``)."""
    from keye.inference import GenerationSettings

    return GenerationSettings.from_config(gen or cfg.generation)
