"""The schema of one training run (pretraining stage or SFT): dataclasses filled from YAML + ``key=value`` overrides.

One ``RunConfig`` per run; it is saved as ``config.yaml`` in the output directory and beside every exported
checkpoint, so a run can be reproduced from its artefacts. Unknown keys and wrong types are errors that name the
key and the file (``keye.typed_config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from keye.typed_config import ConfigError, load_config

PARTS = ("vision", "projector", "llm")
PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class SourceConfig:
    """One shard source to mix (``shards``: directory, brace pattern, glob or ``manifest.json``)."""

    name: str = "default"
    shards: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    """Shards → decode → chat template → packed rows of ``seq_len`` tokens."""

    sources: list[SourceConfig] = field(default_factory=list)
    seq_len: int = 8192
    truncate: bool = True  # cut over-long samples before a visual block (else skip them)
    lookahead: int = 16  # packer's best-fit buffer
    shuffle_buffer: int = 1000
    num_workers: int = 4  # dataloader worker processes per rank
    prefetch_factor: int = 2
    mode: str | None = None  # reasoning mode for records without one (think, no_think, auto)
    # processor budgets (None keeps the checkpoint processor's value)
    image_min_pixels: int | None = None
    image_max_pixels: int | None = None
    video_fps: float | None = None
    video_max_frames: int | None = None
    video_max_pixels: int | None = None
    video_total_pixels: int | None = None


@dataclass
class ModelConfig:
    """Where the weights come from and what trains.

    ``init``: an HF-format checkpoint directory (``keye init`` writes one); ``config``: a model YAML for a random
    model (tests, smoke runs). ``trainable`` lists parts among vision, projector, llm (stage 1: projector only).
    """

    init: str | None = None
    config: str | None = None
    config_overrides: list[str] = field(default_factory=list)
    trainable: list[str] = field(default_factory=lambda: list(PARTS))
    rope_theta: float | None = None  # stage 3 anneals 1M → 8M
    max_position_embeddings: int | None = None
    attn_backend: str | None = None  # auto, flash_attn, torch_varlen, sdpa
    gradient_checkpointing: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-5
    vision_lr_scale: float = 1.0  # per-part learning-rate multipliers
    projector_lr_scale: float = 1.0
    llm_lr_scale: float = 1.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine/linear decay ends at lr × min_lr_ratio
    grad_clip: float = 1.0


@dataclass
class LogConfig:
    every: int = 10  # optimizer steps between metric lines (the only host syncs of the step loop)
    wandb: str = "offline"  # online, offline or disabled; the WANDB_MODE environment variable wins
    project: str = "keye"
    run_name: str | None = None
    progress: bool = True  # tqdm bar on rank 0


@dataclass
class RunConfig:
    """One training run. ``steps`` counts optimizer steps; each is ``grad_accum`` packed rows per rank."""

    stage: str = "sft"  # a name for logs and checkpoints (pretrain_stage1 … sft)
    out_dir: str = "runs/keye"
    steps: int = 1000
    grad_accum: int = 1
    seed: int = 0
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    zero_stage: int = 2
    deepspeed: dict = field(default_factory=dict)  # extra DeepSpeed config keys, merged over the generated ones
    save_every: int = 500
    keep_last: int = 2  # DeepSpeed checkpoints kept (each holds optimizer states; exports are kept)
    resume: str | None = "auto"  # auto: latest checkpoint in out_dir if any; a path; or null
    export_hf: bool = True  # write an HF-format model + processor at the end
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)


def validate(cfg: RunConfig, source: str = "config") -> RunConfig:
    """Value checks OmegaConf's type checks cannot express; errors name the key."""

    def bad(key: str, expected: str, found) -> ConfigError:
        return ConfigError(f"{source}: key '{key}': expected {expected}, found {found!r}")

    unknown = [p for p in cfg.model.trainable if p not in PARTS]
    if unknown or not cfg.model.trainable:
        raise bad("model.trainable", f"a non-empty subset of {list(PARTS)}", cfg.model.trainable)
    if (cfg.model.init is None) == (cfg.model.config is None):
        raise bad("model.init / model.config", "exactly one of them set", (cfg.model.init, cfg.model.config))
    if cfg.precision not in PRECISIONS:
        raise bad("precision", f"one of {PRECISIONS}", cfg.precision)
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise bad("zero_stage", "0, 1, 2 or 3", cfg.zero_stage)
    if cfg.optim.schedule not in SCHEDULES:
        raise bad("optim.schedule", f"one of {SCHEDULES}", cfg.optim.schedule)
    if len(cfg.optim.betas) != 2:
        raise bad("optim.betas", "two numbers", cfg.optim.betas)
    for key in ("steps", "grad_accum", "save_every", "log.every", "data.seq_len", "keep_last"):
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        if obj < 1:
            raise bad(key, "an integer >= 1", obj)
    if not cfg.data.sources:
        raise bad("data.sources", "at least one {name, shards, weight} source", cfg.data.sources)
    names = [s.name for s in cfg.data.sources]
    if len(set(names)) != len(names):
        raise bad("data.sources[].name", "unique names", names)
    for i, s in enumerate(cfg.data.sources):
        if not s.shards:
            raise bad(f"data.sources[{i}].shards", "a shard path, pattern or manifest", s.shards)
        if not s.weight > 0:
            raise bad(f"data.sources[{i}].weight", "a number > 0", s.weight)
    if cfg.data.mode not in (None, "think", "no_think", "auto"):
        raise bad("data.mode", "think, no_think, auto or null", cfg.data.mode)
    if cfg.log.wandb not in ("online", "offline", "disabled"):
        raise bad("log.wandb", "online, offline or disabled", cfg.log.wandb)
    return cfg


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """``RunConfig`` from a YAML file (``_base_`` allowed) plus ``key.sub=value`` overrides, validated."""
    cfg = load_config(RunConfig, path, overrides)
    source = f"{path}{' + overrides' if overrides else ''}" if path else "overrides"
    return validate(cfg, source)
