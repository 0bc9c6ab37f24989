"""The typed run config of ``keye train``: one dataclass tree, filled from a YAML file plus ``key=value`` overrides.

Loaded with ``keye.typed_config`` so an unknown or mistyped key names itself and the file; saved next to every
checkpoint so a run can be reproduced (and resumed) from its output directory alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipelines.media import VideoOptions
from keye.typed_config import ConfigError, config_layers, load_config

MODULES = ("vit", "projector", "llm")
SCHEDULES = ("cosine", "wsd", "constant")
OBJECTIVES = ("lm", "siglip")  # lm: next-token CE (stages 1-3, SFT); siglip: stage-0 contrastive ViT training


@dataclass
class ModelInit:
    """Where the weights come from: an HF-format checkpoint (``path``) or a model YAML for a fresh model."""

    path: str | None = None
    config: str | None = None
    overrides: list[str] = field(default_factory=list)  # model-config overrides, e.g. rope theta for annealing
    attn_backend: str | None = None  # None keeps the checkpoint's choice (auto = flash-attn when installed)


@dataclass
class SourceConfig:
    name: str = "default"
    shards: list[str] = field(default_factory=list)  # brace patterns, globs, directories or manifest.json
    weight: float = 1.0


# Data-loader workers one GPU needs (tools/bench_loader.py, README "Frame shards"): the reasoning is DataConfig's.
LOADER_WORKERS_PER_GPU = 5


@dataclass
class DataConfig:
    """What a run reads and how (sources, row length, media options, loader processes).

    ``num_workers`` dataloader processes decode media, each limited to one thread per library
    (``train.data.limit_worker_threads``) so that workers never oversubscribe cores. The default (``None``) is
    ``LOADER_WORKERS_PER_GPU`` = 5, capped at this rank's share of the CPUs less one for the rank itself. Why 5:
    a 1.7B config (configs/model/keye_1_7b.yaml) at 45-50% MFU on one H100 consumes ~47.5K tokens/s (issue 17's
    estimate, not yet measured on a GPU), and tools/bench_loader.py measured 10.0-10.6K tokens per CPU-second
    from mp4 shards of real clips into 8K rows (~2 samples/s; 49-54K from lossless frame shards) on a busy 2-core
    VM: 4.5-4.8 cores, so 5 workers, for mp4 shards; frame shards need one. ``prefetch_factor`` = 2 rows per
    worker: the GPU takes an 8K row every ~0.17 s and the slowest real clip took up to 1.1 s to load, so the 10
    rows that 5 workers hold ready cover it; a row of mostly video holds ~47 MB of float32 patches, ~0.5 GB per
    rank at 10 rows.
    """

    sources: list[SourceConfig] = field(default_factory=list)
    max_seq_len: int = 8192
    truncate: bool = True
    lookahead: int = 16
    pad_to_multiple_of: int | None = None
    shuffle: bool = True
    shuffle_buffer: int = 1000
    epochs: int | None = None  # None cycles the sources forever (max_steps ends the run)
    mode: str | None = None  # reasoning mode passed to the processor (think / no_think / auto)
    image_min_pixels: int | None = None
    image_max_pixels: int | None = None
    video: dict[str, Any] = field(default_factory=dict)  # VideoOptions overrides (fps, max_frames, …), checked at load
    # dataloader processes decoding media (None: LOADER_WORKERS_PER_GPU within this rank's CPUs less one, see the
    # docstring); their states are checkpointed per worker, so a resume needs the same number
    num_workers: int | None = None
    prefetch_factor: int = 2  # packed rows each worker holds ready (see the docstring)
    # Stop with the top skip reasons when this many records in a row give no usable sample (0: never stop).
    max_rejected_in_a_row: int = 10000
    # Drop records whose response breaks the grammar of their SFT mode (train.sft_mix.filter_by_mode, mode from
    # the record's ``source``), counted per reason. SFT run configs set it; pretraining data has no SFT modes.
    check_modes: bool = False
    # An SFT mix YAML (configs/sft/*.yaml, train.sft_mix): its weighted sources become data.sources and
    # check_modes turns on. Give either mix or sources.
    mix: str | None = None

    def __post_init__(self) -> None:
        # data.video.fsp=2 or data.video.max_frames=two fail here, at load, not after distributed start-up
        VideoOptions().with_changes(self.video, "data.video")


@dataclass
class PathsConfig:
    """``root``: the directory that relative shard patterns, ``model.path``, ``output_dir`` and
    ``siglip.text_path`` are read against (``paths.root=DIR`` on the command line moves a whole run config to
    another data/run tree). ``None``: the working directory, then the repository root."""

    root: str | None = None


@dataclass
class SiglipConfig:
    """Stage 0 (``objective: siglip``): the ViT trained with the SigLIP sigmoid loss against a SigLIP text tower.

    The text tower comes from ``text_path`` (a ``SiglipTextModel`` or dual-tower ``SiglipModel`` checkpoint
    directory with its tokenizer, or the ``siglip/`` folder of a previous stage-0 export, which also restores
    the image head and the logit scale/bias) or, for a fresh run, is built at random from ``text_config``
    (``SiglipTextConfig`` fields; the vocabulary defaults to the Keye tokenizer's, which then tokenises)."""

    text_path: str | None = None
    text_config: dict[str, Any] = field(default_factory=dict)
    freeze_text: bool = False
    text_lr: float | None = None  # None: optim.lr
    batch_size: int = 32  # image-caption pairs per micro-batch per data-parallel rank
    max_text_len: int = 64  # captions are cut/padded to this many tokens (SigLIP pads to a fixed length)


@dataclass
class OptimConfig:
    """AdamW with one learning rate per module; ``None`` means ``lr``. Which rate a module trains at when files
    build on each other: :func:`apply_rate_rule`."""

    lr: float = 1e-4
    vit_lr: float | None = None
    projector_lr: float | None = None
    llm_lr: float | None = None
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class ScheduleConfig:
    """``cosine``: warmup then cosine to ``min_lr_ratio``; ``wsd``: warmup, stable, then a linear decay over the
    last ``decay_ratio`` of the steps; ``constant``: warmup then flat."""

    kind: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    decay_ratio: float = 0.1


@dataclass
class ActivationCheckpointing:
    vit: bool = False
    llm: bool = False


@dataclass
class DistributedConfig:
    deepspeed_config: str = "configs/deepspeed/zero2.json"  # relative paths resolve against the repository root
    zero_stage: int | None = None  # overrides the file's zero_optimization.stage
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    backend: str = "auto"  # auto: nccl on GPU, gloo on CPU
    sequence_parallel_size: int = 1
    timeout_minutes: int = 30
    # Bit-reproducible GPU kernels (torch.use_deterministic_algorithms): slower; an op without a deterministic
    # kernel then raises and names itself. CPU runs are deterministic either way.
    deterministic: bool = False


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    export_hf: bool = True  # also write an HF-format model + processor beside each checkpoint
    resume: bool = True  # continue from the newest complete checkpoint in output_dir


@dataclass
class LoggingConfig:
    every_steps: int = 10
    progress: bool = True
    peak_tflops: float | None = None  # per-GPU peak for mfu_llm/mfu_llm_vit; None: known GPUs by name (bf16 dense)


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled | none
    project: str = "keye"
    name: str | None = None


@dataclass
class RunConfig:
    """What every run shares (pretraining, SFT, RL): where it writes, what it loads, how it optimises and saves.

    ``TrainConfig`` and ``train.rl.run.RLRunConfig`` extend it, so both accept the same sections and are checked
    by the same :func:`check_run`.
    """

    stage: str = "train"  # a name for logs and the export (stage0, stage1, sft, rl, …)
    output_dir: str = "runs/train"
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelInit = field(default_factory=ModelInit)
    max_steps: int = 1000
    seed: int = 0
    freeze: list[str] = field(default_factory=list)  # any of vit, projector, llm
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    activation_checkpointing: ActivationCheckpointing = field(default_factory=ActivationCheckpointing)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainConfig(RunConfig):
    objective: str = "lm"  # lm: next-token CE on label tokens; siglip: stage-0 ViT contrastive training
    data: DataConfig = field(default_factory=DataConfig)
    micro_batch_rows: int = 1  # packed rows per micro-batch (concatenated into one varlen row)
    grad_accum_steps: int = 1
    max_nonfinite_steps: int = 3  # abort after this many non-finite steps in a row
    siglip: SiglipConfig = field(default_factory=SiglipConfig)


def config_error(source: str, key: str, expected: str, found: Any) -> ConfigError:
    return ConfigError(f"{source}: key '{key}': expected {expected}, found {found!r}")


def check_run(cfg: RunConfig, source: str, positive: tuple[str, ...] = ()) -> None:
    """Checks of the shared sections the schema cannot type; ``positive`` names further integer keys (>= 1)."""
    unknown = [m for m in cfg.freeze if m not in MODULES]
    if unknown:
        raise config_error(source, "freeze", f"a list of {MODULES}", cfg.freeze)
    if len(set(cfg.freeze)) == len(MODULES):
        raise config_error(source, "freeze", "at least one trainable module", cfg.freeze)
    if cfg.schedule.kind not in SCHEDULES:
        raise config_error(source, "schedule.kind", f"one of {SCHEDULES}", cfg.schedule.kind)
    if cfg.distributed.precision not in ("auto", "bf16", "fp32"):
        raise config_error(source, "distributed.precision", "auto, bf16 or fp32", cfg.distributed.precision)
    if cfg.distributed.zero_stage not in (None, 0, 1, 2, 3):
        raise config_error(source, "distributed.zero_stage", "0, 1, 2 or 3", cfg.distributed.zero_stage)
    if cfg.wandb.mode not in ("offline", "online", "disabled", "none"):
        raise config_error(source, "wandb.mode", "offline, online, disabled or none", cfg.wandb.mode)
    for key in ("max_steps", "checkpoint.every_steps", "logging.every_steps", *positive):
        obj: Any = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        if obj < 1:
            raise config_error(source, key, "an integer >= 1", obj)


def _check(cfg: TrainConfig, source: str) -> None:
    def bad(key: str, expected: str, found: Any) -> ConfigError:
        return config_error(source, key, expected, found)

    if cfg.objective not in OBJECTIVES:
        raise bad("objective", f"one of {OBJECTIVES}", cfg.objective)
    if bool(cfg.model.path) == bool(cfg.model.config):
        raise bad("model", "exactly one of model.path (HF checkpoint) or model.config (model YAML)", cfg.model)
    check_run(cfg, source, positive=("grad_accum_steps", "micro_batch_rows"))
    if not cfg.data.sources:
        raise bad("data.sources", "at least one source with shards", cfg.data.sources)
    for i, src in enumerate(cfg.data.sources):
        if not src.shards:
            raise bad(f"data.sources[{i}].shards", "a non-empty list of shard patterns", src.shards)
    if cfg.distributed.sequence_parallel_size < 1:
        raise bad("distributed.sequence_parallel_size", "an integer >= 1", cfg.distributed.sequence_parallel_size)
    if cfg.objective == "siglip":
        sig = cfg.siglip
        if bool(sig.text_path) == bool(sig.text_config):
            raise bad("siglip", "exactly one of siglip.text_path (checkpoint) or siglip.text_config (fresh tower)", sig)
        if "vit" in cfg.freeze:
            raise bad(
                "freeze", "a list without vit (objective siglip trains the ViT; LLM/projector never train)", cfg.freeze
            )
        if sig.batch_size < 1 or sig.max_text_len < 2:
            raise bad("siglip.batch_size/max_text_len", ">= 1 and >= 2", (sig.batch_size, sig.max_text_len))
        if cfg.distributed.sequence_parallel_size > 1:
            raise bad(
                "distributed.sequence_parallel_size",
                "1 for objective siglip (pairs are short)",
                cfg.distributed.sequence_parallel_size,
            )


def _rooted(path: str | None, root: str) -> str | None:
    return path if path is None or Path(path).is_absolute() else str(Path(root) / path)


def apply_root(cfg: TrainConfig) -> TrainConfig:
    """Read relative run paths (shards, model.path, output_dir, siglip.text_path) against ``paths.root``."""
    root = cfg.paths.root
    if not root:
        return cfg
    for src in cfg.data.sources:
        src.shards = [_rooted(p, root) for p in src.shards]
    cfg.model.path = _rooted(cfg.model.path, root)
    cfg.output_dir = _rooted(cfg.output_dir, root)
    cfg.siglip.text_path = _rooted(cfg.siglip.text_path, root)
    return cfg


# --- which learning rate applies ------------------------------------------------------------------------------
# One rule: a part (module) trains at its own rate key (optim.vit_lr, optim.projector_lr, optim.llm_lr; the stage-0
# text tower at siglip.text_lr) when that key is set in the same layer as optim.lr or a later one, and at optim.lr
# otherwise. Layers, in order: the base files (``_base_``), the run's own file, the command line. So a run file (or
# an override) that sets optim.lr sets the rate of every part whose own key it does not set too; a per-part rate
# inherited from a file below that optim.lr does not apply, and the start-up line says so. A value set with no
# effect (the rate of a frozen part, an optim.lr no part trains at) is an error when the run's own file or the
# command line set it, and a warning when a base file did.
PART_RATE_KEYS = {"vit": "optim.vit_lr", "projector": "optim.projector_lr", "llm": "optim.llm_lr"}


@dataclass
class PartRate:
    part: str
    lr: float | None  # None: frozen
    key: str  # the key the rate comes from (optim.lr or the part's own), or "freeze"
    source: str  # the file that set that key, "command line", or "default"
    replaces: str | None = None  # the part's own rate from an earlier layer that the rule set aside


@dataclass
class RatePlan:
    """Which rate each trainable part gets and why, plus what of the config does not apply (printed at start-up)."""

    stage: str
    parts: list[PartRate]
    warnings: list[str] = field(default_factory=list)  # values a base file set that have no effect in this run

    def rates(self) -> dict[str, float]:
        return {p.part: p.lr for p in self.parts if p.lr is not None}

    def line(self) -> str:
        """One line, parts with the same rate and origin together, e.g. ``tiny_sft: learning rates: projector, llm
        2.00e-04 (optim.lr, configs/sft/tiny_run.yaml; replaces optim.projector_lr=0.0001 (…stage2.yaml), …); vit
        frozen``."""
        groups: dict[tuple, list[PartRate]] = {}
        for p in self.parts:
            groups.setdefault((p.lr is None, p.lr, p.key, p.source), []).append(p)
        items = []
        for (frozen, lr, key, source), parts in sorted(groups.items(), key=lambda kv: kv[0][0]):
            names = ", ".join(p.part for p in parts)
            if frozen:
                items.append(f"{names} frozen")
                continue
            replaced = [p.replaces for p in parts if p.replaces]
            extra = f"; replaces {', '.join(replaced)}" if replaced else ""
            items.append(f"{names} {lr:.2e} ({key}, {_display(source)}{extra})")
        return f"{self.stage}: learning rates: " + "; ".join(items)


def _display(source: str) -> str:
    if source in ("command line", "default"):
        return source
    try:
        return str(Path(source).resolve().relative_to(repo_root()))
    except (ValueError, OSError):
        return source


def _layer_index(layers: list[tuple[str, dict[str, Any]]], key: str) -> int | None:
    """The last layer that sets ``key`` (dotted), or None."""
    found = None
    for i, (_, data) in enumerate(layers):
        node: Any = data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            found = i
    return found


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _put(cfg: Any, key: str, value: Any) -> None:
    *head, last = key.split(".")
    setattr(_get(cfg, ".".join(head)), last, value)


def apply_rate_rule(cfg: RunConfig, layers: list[tuple[str, dict[str, Any]]]) -> RatePlan:
    """Apply the learning-rate rule above to ``cfg`` (a per-part rate that does not apply becomes ``None``, so the
    saved config trains the same), raise ``ConfigError`` for a value the run's own file or the command line set
    with no effect, and return the plan. ``layers``: :func:`keye.typed_config.config_layers` of the run."""
    files = [i for i, (src, _) in enumerate(layers) if src != "command line"]
    own_from = files[-1] if files else 0

    def src(i: int | None) -> str:
        return layers[i][0] if i is not None else "default"

    def show(key: str, value: Any, at: int | None) -> str:
        return f"{key}={value:g} ({_display(src(at))})"

    lr_at = _layer_index(layers, "optim.lr")
    siglip = getattr(cfg, "objective", "lm") == "siglip"
    freeze_at = _layer_index(layers, "freeze")
    if siglip:  # stage 0 trains the ViT, the SigLIP text tower and the pooling head/logit parameters only
        parts = {
            "vit": ("optim.vit_lr", False),
            "text": ("siglip.text_lr", cfg.siglip.freeze_text),
            "head": (None, False),
        }
        unused = {k: "objective siglip trains no projector or LLM" for k in ("optim.projector_lr", "optim.llm_lr")}
        freeze_at = _layer_index(layers, "siglip.freeze_text")
    else:
        parts = {m: (key, m in cfg.freeze) for m, key in PART_RATE_KEYS.items()}
        unused = {"siglip.text_lr": "only objective siglip trains a text tower"} if hasattr(cfg, "siglip") else {}
    out: list[PartRate] = []
    problems: list[tuple[int, str]] = []
    follows_lr = []
    for part, (key, frozen) in parts.items():
        at = _layer_index(layers, key) if key else None
        value = _get(cfg, key) if key else None
        replaces = None
        if value is not None and at is not None and lr_at is not None and at < lr_at:
            replaces = show(key, value, at)
            _put(cfg, key, None)
            value = None
        if frozen:
            if value is not None:
                problems.append((at, f"{show(key, value, at)} has no effect: {part} is frozen"))
            out.append(PartRate(part, None, "freeze", src(freeze_at)))
        elif value is not None:
            out.append(PartRate(part, float(value), key, src(at)))
        else:
            follows_lr.append(part)
            out.append(PartRate(part, float(cfg.optim.lr), "optim.lr", src(lr_at), replaces))
    for key, why in unused.items():
        if _get(cfg, key) is not None:
            at = _layer_index(layers, key)
            problems.append((at, f"{show(key, _get(cfg, key), at)} has no effect: {why}"))
    if lr_at is not None and not follows_lr:
        own = ", ".join(f"{p.key} ({_display(p.source)})" for p in out if p.lr is not None)
        problems.append(
            (
                lr_at,
                f"{show('optim.lr', cfg.optim.lr, lr_at)} has no effect: every trained part has its own rate ({own}); "
                "drop the own rates that should follow optim.lr",
            )
        )
    errors = [msg for at, msg in problems if at is not None and at >= own_from]
    if errors:
        raise ConfigError("; ".join(errors) + " (which rate applies: README, 'Learning rates')")
    warnings = [msg for at, msg in problems if at is None or at < own_from]
    return RatePlan(cfg.stage, out, warnings)


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """The run config from a YAML file plus ``key=value`` overrides, checked for values the schema cannot type."""
    return load_train_run(path, overrides)[0]


def load_train_run(path: str | Path | None, overrides: list[str] | None = None) -> tuple[TrainConfig, RatePlan]:
    """:func:`load_train_config` and the run's learning-rate plan (:func:`apply_rate_rule`)."""
    cfg = load_config(TrainConfig, path, overrides)
    source = f"{path}{' + overrides' if overrides else ''}"
    if cfg.data.mix:
        from train.sft_mix import load_mix

        if cfg.data.sources:
            raise ConfigError(f"{source}: give data.mix or data.sources, not both")
        mix = load_mix(resolve_path(cfg.data.mix))
        cfg.data.sources = [SourceConfig(**entry) for entry in mix.data_sources()]
        cfg.data.check_modes = True
    _check(cfg, source)
    plan = apply_rate_rule(cfg, config_layers(path, overrides))
    return apply_root(cfg), plan


def repo_root() -> Path:
    from keye.paths import REPO_ROOT

    return REPO_ROOT


def resolve_path(path: str) -> str:
    """A path as given if it exists, else relative to the repository root (for shipped configs)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return str(p)
    alt = repo_root() / p
    return str(alt) if alt.exists() else str(p)
