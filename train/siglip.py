"""Stage 0: continued training of the ViT with the SigLIP sigmoid loss (KEYE_FACTS A §1, §4; Zhai et al. 2023).

Pairs are the image and the caption (the assistant reply) of each single-image record of the pretraining
shards; images keep their native resolution and go through Keye's own ViT (2D RoPE, interpolated position
table), so what is trained is exactly the tower the later stages use.

- **Image embedding**: the ViT output (after ``post_layernorm``) mean-pooled over each image's patches, then a
  learned linear head to the text embedding width. Mean pooling works for any grid and needs no new attention
  block; SigLIP's attention-pooling ("MAP") head is not used (Keye's checkpoints drop it too).
- **Text embedding**: the pooled output of a transformers ``SiglipTextModel`` (last position, SigLIP's own
  head), from a local SigLIP checkpoint or built at random for tiny runs. Captions are padded to a fixed
  length without an attention mask, as SigLIP was trained.
- **Loss**: ``-(1/|B|) Σ_i Σ_j log σ(z_ij (t·x_i·y_j + b))`` over L2-normalised embeddings, ``z_ij = +1`` for a
  matching pair and ``-1`` otherwise, ``t = exp(logit_scale)`` (init 10) and ``b`` (init −10) learned. This is
  the paper's and transformers' ``SiglipModel`` normalisation: a sum over texts, a mean over images.
- **Across ranks**: each data-parallel rank all-gathers the text embeddings of every rank's micro-batch
  (autograd-aware: the backward sums the text gradients of all ranks and hands each rank its own rows), so its
  images meet the whole global batch; each rank's loss is the sum over its images divided by the global image
  count / world, and DeepSpeed's gradient average then gives exactly the gradient of the global-batch loss.

Only the ViT, the image head, the logit scale/bias and (unless ``siglip.freeze_text``) the text tower train. The
LLM and the projector stay on the host, outside the DeepSpeed engine, and are written back unchanged: the export
is the full Keye HF checkpoint with the new ViT, plus ``siglip/`` (text tower, tokenizer, image head and logit
parameters) so that a later stage-0 run can continue from it (``siglip.text_path=OUT/hf/siglip``).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import IterableDataset

from data_pipelines.reader import MappedStream
from train.config import DataConfig, OptimConfig, SiglipConfig, resolve_path
from train.data import (
    ProgressGuard,
    RecordFilter,
    StreamData,
    guarded,
    reader_of,
    record_stream,
    with_media_bytes,
)
from train.optim import grouped_by_part

log = logging.getLogger(__name__)

HEAD_FILE = "siglip_head.safetensors"
LOGIT_SCALE_INIT = math.log(10.0)
LOGIT_BIAS_INIT = -10.0


# --- loss ----------------------------------------------------------------------------------------------------
def sigmoid_loss_sum(
    images: torch.Tensor, texts: torch.Tensor, offset: int, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """``-Σ_i Σ_j log σ(z_ij (t·x_i·y_j + b))`` for normalised ``images`` ``[n, d]`` against all ``texts`` ``[M, d]``;
    image ``i`` matches text ``offset + i`` (its own caption in the gathered batch)."""
    logits = images @ texts.T * logit_scale.exp() + logit_bias
    signs = torch.full_like(logits, -1.0)
    rows = torch.arange(images.shape[0], device=logits.device)
    signs[rows, rows + offset] = 1.0
    return -F.logsigmoid(signs * logits).sum()


class _GatherRows(torch.autograd.Function):
    """All-gather of ``[n_r, d]`` rows of different lengths; backward sums every rank's gradient of the gathered
    tensor and returns this rank's rows (an all-reduce: it works on gloo, which has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, sizes: list[int], rank: int, group: Any) -> torch.Tensor:
        ctx.span, ctx.group = (sum(sizes[:rank]), sizes[rank]), group
        longest = max(sizes)
        padded = F.pad(rows, (0, 0, 0, longest - rows.shape[0])).contiguous()
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start, n = ctx.span
        return grad[start : start + n], None, None, None


def gather_rows(rows: torch.Tensor, group: Any = None) -> tuple[torch.Tensor, int]:
    """Every data-parallel rank's rows, concatenated in rank order, and where this rank's rows start."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return rows, 0
    size = torch.tensor([rows.shape[0]], device=rows.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s) for s in sizes]
    rank = dist.get_rank(group)
    return _GatherRows.apply(rows, counts, rank, group), sum(counts[:rank])


# --- model ---------------------------------------------------------------------------------------------------
class SiglipTower(nn.Module):
    """What DeepSpeed trains in stage 0: Keye's ViT (``visual``, shared with the host model, so its parameter
    names stay ``visual.vision_model.*``), the image head, the text tower and the logit scale/bias."""

    def __init__(self, keye_model: nn.Module, text: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.visual = keye_model.visual
        self.text = text
        self.head = nn.Linear(keye_model.config.vision_config.hidden_size, text.config.projection_size)
        self.logit_scale = nn.Parameter(torch.full((1,), LOGIT_SCALE_INIT))
        self.logit_bias = nn.Parameter(torch.full((1,), LOGIT_BIAS_INIT))
        self.backend = keye_model.config.attn_backend
        self._host = (keye_model,)  # a tuple, so the LLM is not a submodule: it never enters the engine
        self.tokenizer = tokenizer

    def embed_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings ``[n, d_text]``: ViT → mean over each image's patches → head."""
        weight = self.visual.vision_model.embeddings.patch_embedding.weight
        feats = self.visual(pixel_values.to(weight.dtype), grid_thw, self.backend)
        sizes = grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]
        segment = torch.repeat_interleave(
            torch.arange(grid_thw.shape[0], device=feats.device), sizes, output_size=feats.shape[0]
        )
        pooled = feats.new_zeros(grid_thw.shape[0], feats.shape[-1]).index_add_(0, segment, feats)
        pooled = pooled / sizes.unsqueeze(-1).to(pooled.dtype)
        return F.normalize(self.head(pooled).float(), dim=-1)

    def embed_texts(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(input_ids=input_ids).pooler_output.float(), dim=-1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor,
        input_ids: torch.Tensor,
        num_items_in_batch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The sigmoid loss of this rank's pairs against the global batch, divided by ``num_items_in_batch``
        (global pairs / world, from the trainer) or by the local pair count."""
        images = self.embed_images(pixel_values, grid_thw)
        texts, offset = gather_rows(self.embed_texts(input_ids))
        total = sigmoid_loss_sum(images, texts, offset, self.logit_scale.float(), self.logit_bias.float())
        return total / (num_items_in_batch if num_items_in_batch is not None else images.shape[0])

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The full Keye checkpoint (host LLM/projector + this ViT) in ``directory`` and the text tower, tokenizer
        and head in ``directory/siglip``. ``state_dict`` is this module's (e.g. gathered from ZeRO-3)."""
        from safetensors.torch import save_file

        state = {k: v.detach().cpu() for k, v in (state_dict if state_dict is not None else self.state_dict()).items()}
        keye = self._host[0]
        full = {k: v.detach().cpu() for k, v in keye.state_dict().items() if not k.startswith("visual.")}
        full.update({k: v for k, v in state.items() if k.startswith("visual.")})
        keye.save_pretrained(str(directory), state_dict=full)
        side = Path(directory) / "siglip"
        self.text.save_pretrained(str(side), state_dict={k[5:]: v for k, v in state.items() if k.startswith("text.")})
        self.tokenizer.save_pretrained(str(side))
        extra = {k: state[k].contiguous() for k in ("head.weight", "head.bias", "logit_scale", "logit_bias")}
        save_file(extra, str(side / HEAD_FILE), metadata={"format": "pt"})


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(p for p in directory.glob("*.safetensors") if p.name != HEAD_FILE)
    if not files:
        raise ValueError(f"siglip.text_path {str(directory)!r}: expected *.safetensors weights, found none")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_text_tower(cfg: SiglipConfig, default_tokenizer: Any, seed: int) -> tuple[nn.Module, Any, dict]:
    """``(SiglipTextModel, tokenizer, extra)``: from ``cfg.text_path`` (text-only or dual-tower checkpoint, or a
    stage-0 export's ``siglip/``; ``extra`` holds the saved head / logit scale and bias found there) or fresh from
    ``cfg.text_config`` with ``default_tokenizer``."""
    from transformers import AutoTokenizer, SiglipTextConfig, SiglipTextModel
    from transformers import SiglipConfig as HFSiglipConfig

    if not cfg.text_path:
        tok = default_tokenizer
        values = {
            "vocab_size": len(tok),
            "max_position_embeddings": cfg.max_text_len,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        }
        config = SiglipTextConfig(**{**values, **cfg.text_config})
        if config.vocab_size < len(default_tokenizer):
            raise ValueError(
                f"siglip.text_config.vocab_size: expected >= {len(default_tokenizer)} (the Keye tokenizer), "
                f"found {config.vocab_size}"
            )
        torch.manual_seed(seed)
        text = SiglipTextModel(config)
        tokenizer, extra = default_tokenizer, {}
    else:
        directory = Path(resolve_path(cfg.text_path))
        where = f"siglip.text_path {str(directory)!r}"
        try:
            kind = json.loads((directory / "config.json").read_text()).get("model_type")
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{where}: expected a SigLIP checkpoint directory with config.json ({exc})") from None
        if kind == "siglip":
            config = HFSiglipConfig.from_pretrained(str(directory)).text_config
        elif kind == "siglip_text_model":
            config = SiglipTextConfig.from_pretrained(str(directory))
        else:
            raise ValueError(f"{where}: expected model_type 'siglip' or 'siglip_text_model', found {kind!r}")
        weights = _read_safetensors(directory)
        text = SiglipTextModel(config)
        wanted = {k.removeprefix("text_model."): v for k, v in weights.items() if not k.startswith("vision_model.")}
        extra = {k: wanted.pop(k) for k in ("logit_scale", "logit_bias") if k in wanted}
        missing, unexpected = text.load_state_dict(wanted, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{where}: text-tower weights do not fit (missing {missing[:4]}, unexpected {unexpected[:4]})"
            )
        if (directory / HEAD_FILE).is_file():
            from safetensors.torch import load_file

            extra.update(load_file(str(directory / HEAD_FILE)))
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError, ImportError) as exc:
            raise ValueError(f"{where}: cannot load its tokenizer ({exc})") from None
    if text.config.max_position_embeddings < cfg.max_text_len:
        raise ValueError(
            f"siglip.max_text_len: expected <= the text tower's {text.config.max_position_embeddings} positions, "
            f"found {cfg.max_text_len}"
        )
    if tokenizer.pad_token_id is None:
        raise ValueError(f"siglip: the text tokenizer has no pad token ({type(tokenizer).__name__})")
    return text, tokenizer, extra


def build_tower(keye_model: nn.Module, cfg: SiglipConfig, default_tokenizer: Any, seed: int) -> SiglipTower:
    """The stage-0 module, with saved head/logit parameters restored and the text tower frozen if asked."""
    text, tokenizer, extra = load_text_tower(cfg, default_tokenizer, seed)
    text = text.to(next(keye_model.visual.parameters()).dtype)
    tower = SiglipTower(keye_model, text, tokenizer)
    if extra:
        with torch.no_grad():
            params = dict(tower.named_parameters())
            for name, value in extra.items():
                if name not in params or params[name].shape != value.shape:
                    raise ValueError(f"siglip.text_path: saved {name!r} {tuple(value.shape)} does not fit this tower")
                params[name].copy_(value)
    tower.text.requires_grad_(not cfg.freeze_text)
    return tower


def tower_param_groups(tower: SiglipTower, optim: OptimConfig, text_lr: float | None) -> list[dict]:
    """AdamW groups: ViT at ``optim.vit_lr``, text tower at ``siglip.text_lr``, head and logit parameters at
    ``optim.lr``; no weight decay on norms, biases and the logit scale/bias."""
    lrs = {
        "vit": optim.vit_lr if optim.vit_lr is not None else optim.lr,
        "text": text_lr if text_lr is not None else optim.lr,
        "head": optim.lr,
    }
    return grouped_by_part(tower, _tower_part, lrs, optim.weight_decay)


def _tower_part(name: str) -> str:
    return "vit" if name.startswith("visual.") else "text" if name.startswith("text.") else "head"


# --- data ----------------------------------------------------------------------------------------------------
@dataclass
class PairBatch:
    """A micro-batch of image–caption pairs: flat patches of all images, their grids, padded caption ids."""

    pixel_values: torch.Tensor  # [N_patches, 3·14·14]
    grid_thw: torch.Tensor  # [n, 3]
    input_ids: torch.Tensor  # [n, max_text_len]
    sample_ids: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(
            self.pixel_values.to(device), self.grid_thw.to(device), self.input_ids.to(device), self.sample_ids
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values, "grid_thw": self.grid_thw, "input_ids": self.input_ids}


def _content_items(record: dict, role: str) -> list[dict]:
    items = []
    for msg in record.get("messages") or []:
        if msg.get("role") != role:
            continue
        content = msg.get("content")
        items.extend([{"type": "text", "text": content}] if isinstance(content, str) else list(content or []))
    return items


def caption_of(record: dict) -> str:
    """The text of the record's last assistant turn (the caption)."""
    for msg in reversed(record.get("messages") or []):
        if msg.get("role") == "assistant":
            content = msg.get("content")
            if isinstance(content, str):
                return content.strip()
            return " ".join(str(i.get("text", "")) for i in content or [] if i.get("type") == "text").strip()
    return ""


def pair_rejection(record: dict) -> str | None:
    """Why a record is no image–caption pair (checked before any media is decoded), or ``None``."""
    user = _content_items(record, "user")
    images = sum(i.get("type") == "image" for i in user)
    if any(i.get("type") == "video" for i in user):
        return "has a video"
    if images != 1:
        return f"{images} images (a pair needs exactly one)"
    if not caption_of(record):
        return "no caption (empty assistant reply)"
    return None


class PairEncoder:
    """``(record, media) -> (patches, grid, caption ids)`` at native resolution within the processor's pixel
    budget; raises ValueError (counted, skipped) for an unreadable image."""

    def __init__(self, processor: Any, tokenizer: Any, max_text_len: int) -> None:
        self.processor, self.tokenizer, self.max_text_len = processor, tokenizer, max_text_len

    def __call__(self, sample: tuple[dict, dict]) -> tuple[torch.Tensor, list[int], torch.Tensor, str]:
        record, media = sample
        messages = with_media_bytes(record, media, self.processor.video_options)
        item = next(i for m in messages if m["role"] == "user" for i in m["content"] if i.get("type") == "image")
        patches, grid = self.processor.encode_image(item)
        ids = self.tokenizer(caption_of(record), max_length=self.max_text_len, truncation=True, padding="max_length")[
            "input_ids"
        ]
        return patches, grid, torch.tensor(ids, dtype=torch.long), str(record.get("id", ""))


def collate_pairs(pairs: list[tuple[torch.Tensor, list[int], torch.Tensor, str]]) -> PairBatch:
    return PairBatch(
        pixel_values=torch.cat([p[0] for p in pairs]),
        grid_thw=torch.tensor([p[1] for p in pairs], dtype=torch.long),
        input_ids=torch.stack([p[2] for p in pairs]),
        sample_ids=[p[3] for p in pairs],
    )


class PairBatches(IterableDataset):
    """``batch_size`` encoded pairs per ``PairBatch``. Nothing is buffered between batches, so the state is the
    upstream state taken between two batches (exact resume)."""

    def __init__(self, pairs: Iterable, batch_size: int) -> None:
        self.pairs, self.batch_size = pairs, batch_size
        self.stats: Counter = Counter()
        self._pending: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[PairBatch]:
        state, self._pending = self._pending, None
        if state is not None:
            self.pairs.load_state_dict(state["pairs"])  # type: ignore[attr-defined]
            self.stats = Counter(state["stats"])
        it = iter(self.pairs)
        while chunk := list(islice(it, self.batch_size)):
            self.stats["pairs"] += len(chunk)
            yield collate_pairs(chunk)

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:
            return self._pending
        return {"pairs": self.pairs.state_dict(), "stats": dict(self.stats)}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Takes effect at the next ``iter()``."""
        self._pending = state


def pair_data(
    cfg: DataConfig, sig: SiglipConfig, processor: Any, tokenizer: Any, seed: int, rank: int, world: int
) -> StreamData:
    """This data-parallel rank's stage-0 micro-batches: single-image records → (image, caption) → ``PairBatch``."""
    guard = ProgressGuard(cfg.max_rejected_in_a_row)
    records = RecordFilter(record_stream(cfg, seed, rank, world, guard), pair_rejection, "pair")
    pairs = MappedStream(records, PairEncoder(processor, tokenizer, sig.max_text_len), errors=(ValueError, OSError))
    batches = PairBatches(guarded(pairs, guard), sig.batch_size)
    return StreamData(batches, cfg.num_workers, reader=reader_of(records), prefetch_factor=cfg.prefetch_factor)
