"""``EvalConfig``: every setting that decides a score, written into ``results.json`` so a number can be reproduced.

Media settings (fps, frame and pixel budgets, Slow-Fast) change what the model sees, generation settings change
what it says, and the judge changes how it is graded; all three live here, none are implicit defaults elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from data_pipelines.media import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, VIDEO_TOTAL_PIXELS, VideoOptions
from data_pipelines.resize import MAX_PIXELS as IMAGE_MAX_PIXELS
from data_pipelines.resize import MIN_PIXELS as IMAGE_MIN_PIXELS


@dataclass
class MediaConfig:
    """Per-video reading options; the keys match a message's ``{"type": "video", ...}`` item and ``VideoOptions``."""

    fps: float = 2.0
    # frame-image lists (KC-MMBench): None = taken whole without timestamps, the original's rule when no fps is set
    frame_list_fps: float | None = None
    max_frames: int = 1024
    # the reader's defaults (one definition each: data_pipelines.media / .resize, i.e. keye-vl-utils'); images are
    # then fitted to the checkpoint's preprocessor_config.json as in the released processor
    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS
    video_total_pixels: int = VIDEO_TOTAL_PIXELS
    slow_fast: bool = True
    min_frame_similarity: float = VideoOptions.min_frame_similarity
    image_min_pixels: int = IMAGE_MIN_PIXELS
    image_max_pixels: int = IMAGE_MAX_PIXELS


@dataclass
class GenerationConfig:
    """Decoding settings; ``temperature == 0`` means greedy (the original eval wrapper decodes greedily).

    ``engine`` (for ``engine: keye``): ``transformers`` (our model's ``generate``) or ``vllm`` (``make vllm-env``);
    both see the same prompt ids and pixels (``keye.generation``).
    """

    engine: str = "transformers"
    max_new_tokens: int = 2048
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 1
    repetition_penalty: float = 1.0
    batch_size: int = 8

    def __post_init__(self) -> None:
        from keye.generation import check_engine

        check_engine(self.engine, "generation.engine")  # at config load: a missing vLLM is one line, not a run


@dataclass
class JudgeConfig:
    """Optional LLM judge for free-form answers (KC-MMBench VQA tasks) and unparseable outputs.

    ``kind``: ``none``; ``engine`` (a local model through the same engine interface: ``model`` is a checkpoint
    directory and ``engine`` is ``keye`` or ``module:factory``); ``openai`` (an OpenAI-compatible chat endpoint at
    ``url``, model name ``model``, API key read from the environment variable ``api_key_env``).
    """

    kind: str = "none"
    model: str = ""
    engine: str = "keye"
    url: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    retries: int = 5
    timeout_s: float = 60.0
    max_new_tokens: int = 64


@dataclass
class VideoMCQConfig:
    """Column names and layout for the generic video multiple-choice loader (``video_mcq``).

    ``preset`` (``videomme``/``mvbench``) fills the fields for those benchmarks' published layouts; explicit
    non-empty values here override the preset. ``file`` is relative to ``--data`` unless absolute (may be a glob).
    """

    preset: str = ""
    file: str = ""
    video_root: str = ""
    id_key: str = ""
    video_key: str = ""
    question_key: str = ""
    options_key: str = ""
    answer_key: str = ""
    category_key: str = ""
    start_key: str = ""
    end_key: str = ""
    video_ext: str = ""
    prompt_prefix: str = ""
    prompt_suffix: str = ""


@dataclass
class EvalConfig:
    """One evaluation run. ``benchmarks`` are registry names (``kc_mmbench``, ``CPV``, ``time``, ``video_mcq``…).

    ``data`` is one path for all benchmarks (a directory holding a sub-directory per benchmark name is also
    accepted); ``data_paths.NAME`` overrides it per benchmark. ``limit`` keeps the first N samples of each
    benchmark (0 = all). ``engine``: ``keye`` loads ``keye.inference.ChatEngine`` from ``model``;
    ``module:factory`` calls ``factory(cfg)`` (``engine_args`` is for such factories).
    """

    model: str = ""
    benchmarks: list[str] = field(default_factory=list)
    data: str = ""
    data_paths: dict[str, str] = field(default_factory=dict)
    out: str = "eval_out"
    limit: int = 0
    # reasoning mode suffix: think | no_think | auto, or "" for each benchmark's own (KC-MMBench: think, as its
    # published runs; the others: auto)
    mode: str = ""
    engine: str = "keye"
    engine_args: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    seed: int = 0
    media: MediaConfig = field(default_factory=MediaConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    video_mcq: VideoMCQConfig = field(default_factory=VideoMCQConfig)
    progress: bool = True
    # Thyme tool use (engine 'keye'): <code> blocks run in the sandbox and their output is fed back. tool_options
    # are keye.thyme.ToolLoopConfig fields over its evaluation() defaults, plus thyme_prompt (default true).
    tools: bool = False
    tool_options: dict[str, Any] = field(default_factory=dict)
