"""``KeyeVLForConditionalGeneration``: ViT → 1.5 projector → Qwen3 LLM, transformers-compatible.

Attribute names match the released checkpoint (``visual.vision_model.*``, ``mlp_AR.*``, ``model.*``,
``lm_head.*``), so a released state dict loads with no renaming. The LLM is transformers' Qwen3 model; only
its forward is re-composed here to give the rotary module 3-axis positions and to pass ``cu_seqlens`` to the
attention function for packed rows (its layers, cache and masks are reused unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, Qwen3Config, Qwen3Model
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from data_pipelines.encoded import VisualInputs
from keye.attention import ATTN_IMPLEMENTATION, register_with_transformers
from keye.checkpoint import PACKING_TABLE_KEY, PACKING_TABLE_ROWS
from keye.compat import cache_kwarg, output_cache, take_cache
from keye.configuration import KeyeVLConfig
from keye.loss import chunked_cross_entropy
from keye.remote_code import write_remote_code
from keye.rope import MultimodalRotaryEmbedding, VisionRotaryEmbedding, multimodal_position_ids, split_frames
from keye.sequence_parallel import SequenceShard, shifted_cross_entropy
from keye.vision import KeyeProjector, KeyeVisionModel

register_with_transformers()

PATCH_WEIGHT_KEY = "visual.vision_model.embeddings.patch_embedding.weight"


def _init_rotary_buffers(module: nn.Module) -> None:
    """Recompute non-persistent rotary buffers (they are not in checkpoints and start empty on the meta device)."""
    if isinstance(module, (VisionRotaryEmbedding, MultimodalRotaryEmbedding)):
        for name, value in module.compute_buffers().items():
            init.copy_(getattr(module, name), value)


class KeyeTextModel(Qwen3Model):
    """Qwen3 decoder stack with multimodal rotary positions and varlen (packed) attention."""

    def __init__(self, config: Qwen3Config, mrope_section: list[int]) -> None:
        super().__init__(config)
        self.rotary_emb = MultimodalRotaryEmbedding(
            config.head_dim, config.rope_parameters["rope_theta"], mrope_section
        )

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        _init_rotary_buffers(module)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        attn_backend: str = "auto",
        sp_group: torch.distributed.ProcessGroup | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """``position_ids``: ``[3, B, L]`` (or ``[B, L]`` for text). ``cu_seqlens``: segment offsets of packed rows.

        ``sp_group``: the inputs are this rank's slice of one packed row (``cu_seqlens`` is the whole row's) and
        attention runs Ulysses-style over the group (``keye.sequence_parallel``).
        """
        cache = take_cache(cache, kwargs)
        if sp_group is not None:  # --- Ulysses sequence parallelism ---
            if cu_seqlens is None or position_ids is None:
                raise ValueError("sequence-parallel inputs need the row's cu_seqlens and the slice's position_ids")
            kwargs["keye_sp_group"] = sp_group
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        bsz, length = inputs_embeds.shape[:2]
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + length, device=inputs_embeds.device).expand(bsz, -1)
        if position_ids.ndim == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)

        if cu_seqlens is not None:
            # Packed rows: attention stays inside each segment; no dense mask is built.
            seq_lens = torch.diff(cu_seqlens).tolist()
            kwargs.update(
                cu_seq_lens_q=cu_seqlens.to(torch.int32),
                cu_seq_lens_k=cu_seqlens.to(torch.int32),
                max_length_q=max(seq_lens),
                max_length_k=max(seq_lens),
                keye_seq_lens=seq_lens,
            )
            mask = None
        else:
            mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                **cache_kwarg(cache),
            )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden = inputs_embeds
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids[0],
                **cache_kwarg(cache),
                use_cache=use_cache,
                keye_attn_backend=attn_backend,
                **kwargs,
            )
        hidden = self.norm(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden, **cache_kwarg(cache if use_cache else None))


@dataclass
class KeyeVLOutput(CausalLMOutputWithPast):
    """Loss (mean over label tokens, or sum / ``num_items_in_batch``), logits, KV cache and rope deltas.

    The cache field is transformers' own (``cache``, or ``past_key_values`` before 5.24; see ``keye.compat``).
    """

    rope_deltas: torch.LongTensor | None = None
    num_label_tokens: torch.LongTensor | None = None


class KeyeVLPreTrainedModel(PreTrainedModel):
    config: KeyeVLConfig
    config_class = KeyeVLConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen3DecoderLayer", "KeyeVisionLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        _init_rotary_buffers(module)


class KeyeVLForConditionalGeneration(KeyeVLPreTrainedModel, GenerationMixin):
    """The whole model. Inputs come from ``KeyeVLProcessor``; see ``forward`` for shapes."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # written for the released layout's readers (see save_pretrained), never used by the model
    _keys_to_ignore_on_load_unexpected = [r"packing_position_embedding", r"vision_model\.head\."]

    def __init__(self, config: KeyeVLConfig) -> None:
        super().__init__(config)
        config.text_config._attn_implementation = ATTN_IMPLEMENTATION
        vc, tc = config.vision_config, config.text_config
        self.visual = KeyeVisionModel(vc)
        self.mlp_AR = KeyeProjector(
            vc.hidden_size, tc.hidden_size, vc.spatial_merge_size, config.projector_layer_norm_eps
        )
        self.model = KeyeTextModel(tc, config.mrope_section)
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        self.rope_deltas: torch.Tensor | None = None
        self.post_init()

    @classmethod
    def from_components(cls, llm_dir: str, vit_dir: str, **config_overrides) -> KeyeVLForConditionalGeneration:
        """Fresh model from a local Qwen3 checkpoint and a local SigLIP checkpoint (random projector)."""
        from keye.checkpoint import build_from_components

        return build_from_components(cls, llm_dir, vit_dir, **config_overrides)

    # --- transformers plumbing -------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, state_dict=None, **kwargs):
        """The released Keye-VL 1.5 layout: weights + config.json (``keye.configuration``) + remote code.

        The released checkpoints carry an unused 32768-row ``packing_position_embedding`` table that vLLM's strict
        loader expects; it is written as zeros (ignored when loading here).
        """
        if is_main_process:
            state = dict(state_dict) if state_dict is not None else dict(self.state_dict())
            if PACKING_TABLE_KEY not in state:
                like = state.get(PATCH_WEIGHT_KEY)
                rows = (PACKING_TABLE_ROWS, self.config.vision_config.hidden_size)
                state[PACKING_TABLE_KEY] = torch.zeros(rows, dtype=like.dtype if like is not None else self.dtype)
            state_dict = state
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, state_dict=state_dict, **kwargs)
        if is_main_process:
            write_remote_code(save_directory)

    # --- vision ----------------------------------------------------------------------------------------------
    def encode_visual(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """ViT + projector for flat patches; one LLM-width row per merged token, in placeholder order."""
        frames = split_frames(grid_thw.to(pixel_values.device))
        feats = self.visual(
            pixel_values.to(self.visual.vision_model.embeddings.patch_embedding.weight.dtype),
            frames,
            self.config.attn_backend,
        )
        return self.mlp_AR(feats, frames)

    def _dummy_visual(self, like: torch.Tensor) -> torch.Tensor:
        """A 2×2-patch ViT pass whose output is multiplied by 0: keeps ZeRO-3 gathers in step on text-only ranks."""
        p = self.config.vision_config.patch_size
        pixels = torch.zeros(4, 3 * p * p, device=like.device, dtype=like.dtype)
        grid = torch.tensor([[1, 2, 2]], device=like.device)
        return self.encode_visual(pixels, grid).sum() * 0.0

    def encode_visual_parts(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Features of several (pixels, grid) groups from ONE ViT call (images and videos together).

        Exactly one ViT forward per model forward keeps ZeRO-3's parameter gathers in step across ranks whatever
        mix of images, videos or text each rank's micro-batch holds.
        """
        frames = [split_frames(grid.to(pixels.device)) for pixels, grid in parts]
        merge = self.config.vision_config.spatial_merge_size
        features = self.encode_visual(torch.cat([p for p, _ in parts]), torch.cat(frames))
        sizes = [int((f[:, 1] * f[:, 2]).sum()) // (merge * merge) for f in frames]
        return list(features.split(sizes))

    def embed_inputs(
        self, input_ids: torch.LongTensor, visual: VisualInputs, always_run_vision: bool = False
    ) -> torch.Tensor:
        """Token embeddings with image and video features placed at their placeholder tokens."""
        embeds = self.model.embed_tokens(input_ids)
        kinds = [
            (kind, pixels, grid, token_id)
            for (kind, pixels, grid), token_id in zip(
                visual.kinds(), (self.config.image_token_id, self.config.video_token_id)
            )
            if pixels is not None and pixels.numel()
        ]
        if not kinds:
            return embeds + self._dummy_visual(embeds) if always_run_vision else embeds
        features = self.encode_visual_parts([(pixels, grid) for _, pixels, grid, _ in kinds])
        for (kind, _, _, token_id), feats in zip(kinds, features):
            mask = input_ids == token_id
            n_tokens = int(mask.sum())
            if n_tokens != feats.shape[0]:
                raise ValueError(
                    f"{kind} placeholder tokens ({n_tokens}) do not match the {kind} features ({feats.shape[0]})"
                )
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats.to(embeds.dtype))
        return embeds

    # --- positions -------------------------------------------------------------------------------------------
    def get_rope_index(
        self,
        input_ids: torch.LongTensor,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``[3, B, L]`` for (left-)padded rows and ``rope_deltas`` ``[B, 1]`` for decoding."""
        cfg = self.config
        merge = cfg.vision_config.spatial_merge_size
        bsz, length = input_ids.shape
        positions = torch.zeros(3, bsz, length, dtype=torch.long, device=input_ids.device)
        deltas = torch.zeros(bsz, 1, dtype=torch.long, device=input_ids.device)
        img_frames = split_frames(image_grid_thw) if image_grid_thw is not None else None
        vid_frames = split_frames(video_grid_thw) if video_grid_thw is not None else None
        img_i = vid_i = 0
        for b in range(bsz):
            keep = (
                attention_mask[b].bool()
                if attention_mask is not None
                else torch.ones_like(input_ids[b], dtype=torch.bool)
            )
            ids = input_ids[b][keep]
            n_img = int((ids == cfg.image_token_id).sum())
            n_vid = int((ids == cfg.video_token_id).sum())
            img, img_i = _take_grids(img_frames, img_i, n_img, merge)
            vid, vid_i = _take_grids(vid_frames, vid_i, n_vid, merge)
            pos = multimodal_position_ids(ids, cfg.image_token_id, cfg.video_token_id, img, vid, merge)
            positions[:, b, keep] = pos
            deltas[b] = (pos.max() + 1 - length) if pos.numel() else -length
        return positions, deltas

    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        """3-axis M-RoPE positions of the prompt for ``generate`` (which then advances every axis by one per token).

        transformers' default builds 1-D positions from the attention mask, which is wrong once images or videos
        are present; the last prompt token is text, so "+1 on every axis" is exactly the 1.5 rule for what follows.
        """
        if inputs_tensor.ndim != 2 or inputs_tensor.dtype != torch.long:
            return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        positions, self.rope_deltas = self.get_rope_index(
            inputs_tensor,
            model_kwargs.get("image_grid_thw"),
            model_kwargs.get("video_grid_thw"),
            model_kwargs.get("attention_mask"),
        )
        return positions

    def _positions(self, input_ids, inputs_embeds, attention_mask, cache, image_grid_thw, video_grid_thw):
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0 and input_ids is not None:
            positions, self.rope_deltas = self.get_rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask)
            return positions
        bsz, length = inputs_embeds.shape[:2]
        pos = torch.arange(past, past + length, device=inputs_embeds.device).expand(bsz, -1)
        if self.rope_deltas is not None:
            pos = pos + self.rope_deltas.to(pos.device)
        return pos.unsqueeze(0).expand(3, -1, -1)

    # --- forward ---------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: torch.Tensor | int | None = None,
        always_run_vision: bool = False,
        return_logits: bool | None = None,
        shift_labels: torch.LongTensor | None = None,
        sequence_parallel: SequenceShard | None = None,
        **kwargs,
    ) -> KeyeVLOutput:
        """Shapes: ``input_ids`` ``[B, L]``; ``pixel_values`` ``[N, 3·14·14]`` with ``image_grid_thw`` ``[n, 3]``
        (likewise for videos, one row per frame or run-length merged); ``position_ids`` ``[3, B, L]`` (computed
        when absent); ``cu_seqlens`` marks packed samples (``B`` = 1).

        With ``labels`` the loss is a chunked cross-entropy over label tokens (logits of a long row are never
        materialised in full); it is a mean, or a sum divided by ``num_items_in_batch`` when given (the
        trainer's global label-token count). Logits are returned unless ``return_logits=False`` (the default
        when labels are given). ``shift_labels`` are next-token targets already shifted (instead of ``labels``).

        ``sequence_parallel`` (from ``keye.sequence_parallel.ShardedBatch.model_inputs``): ``input_ids``,
        ``position_ids`` and ``shift_labels`` are this rank's slice of one packed row; visual inputs and
        ``cu_seqlens`` are the whole row's. The loss is the row's (summed over the SP group).
        """
        cache = take_cache(cache, kwargs)
        sp = sequence_parallel
        if sp is not None and labels is not None:
            raise ValueError("sequence-parallel inputs carry shift_labels (shifted on the full row), not labels")
        visual = VisualInputs(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        if inputs_embeds is None and sp is not None:  # --- Ulysses sequence parallelism ---
            inputs_embeds = sp.embed(self, input_ids, visual, always_run_vision)
        elif inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, visual, always_run_vision)
        if position_ids is None:
            if cu_seqlens is not None:
                raise ValueError("packed inputs (cu_seqlens) need position_ids from the packer")
            position_ids = self._positions(
                input_ids, inputs_embeds, attention_mask, cache, image_grid_thw, video_grid_thw
            )
        out = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            cu_seqlens=cu_seqlens,
            attn_backend=self.config.attn_backend,
            sp_group=sp.group if sp is not None else None,
            **kwargs,
        )
        hidden = out.last_hidden_state
        loss = n_label = None
        if labels is not None or shift_labels is not None:
            if labels is not None:
                loss_sum, n_label = chunked_cross_entropy(hidden, self.lm_head.weight, labels, cu_seqlens=cu_seqlens)
            else:
                group = sp.group if sp is not None else None
                loss_sum, n_label = shifted_cross_entropy(hidden, self.lm_head.weight, shift_labels, group)
            denom = num_items_in_batch if num_items_in_batch is not None else n_label.clamp(min=1)
            loss = loss_sum / denom
        if return_logits is None:
            return_logits = labels is None and shift_labels is None
        logits = None
        if return_logits:
            keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
            logits = self.lm_head(hidden[:, keep, :])
        return KeyeVLOutput(
            loss=loss,
            logits=logits,
            **cache_kwarg(output_cache(out)),
            rope_deltas=self.rope_deltas,
            num_label_tokens=n_label,
        )


def _take_grids(frames: torch.Tensor | None, start: int, n_tokens: int, merge: int):
    """The next grids of ``frames`` that account for ``n_tokens`` placeholder tokens (rows of a batch share grids)."""
    if n_tokens == 0:
        return None, start
    if frames is None:
        raise ValueError(f"{n_tokens} visual placeholder tokens but no grid_thw was given")
    taken, end = 0, start
    while taken < n_tokens and end < frames.shape[0]:
        taken += int(frames[end, 1] * frames[end, 2]) // (merge * merge)
        end += 1
    if taken != n_tokens:
        raise ValueError(f"visual placeholder tokens ({n_tokens}) do not match the remaining grids ({taken} tokens)")
    return frames[start:end], end
