"""Native-resolution SigLIP ViT with 2D RoPE (Keye-VL 1.5's vision tower).

Module and parameter names equal transformers' ``SiglipVisionModel`` (``vision_model.embeddings.*``,
``vision_model.encoder.layers.N.*``, ``vision_model.post_layernorm``), so SigLIP checkpoints and the released
``visual.vision_model.*`` weights load without renaming. Differences from SigLIP: patches of any grid come in
flat (``[N, 3·14·14]``), the learned 27×27 position table is bilinearly resized to each grid, q/k get a 2D
rotary embedding, and attention is confined to each image or frame through ``cu_seqlens``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from keye.attention import varlen_attention
from keye.configuration import KeyeVisionConfig
from keye.rope import VisionRotaryEmbedding, apply_rotary


class KeyeVisionEmbeddings(nn.Module):
    def __init__(self, config: KeyeVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.side = config.image_size // config.patch_size
        self.position_embedding = nn.Embedding(self.side * self.side, config.hidden_size)

    def interpolated_positions(self, h: int, w: int) -> torch.Tensor:
        """The learned table resized (bilinear, align_corners=False) to an ``h × w`` grid, row-major ``[h*w, d]``."""
        table = self.position_embedding.weight
        grid = table.view(self.side, self.side, -1).permute(2, 0, 1).unsqueeze(0)
        if (h, w) != (self.side, self.side):
            grid = F.interpolate(grid.float(), size=(h, w), mode="bilinear", align_corners=False).to(table.dtype)
        return grid.squeeze(0).flatten(1).transpose(0, 1)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.weight
        # patches arrive flat [N, 3·p·p] (ours) or as [N, 3, p, p] (the released processor's layout); same order
        x = F.linear(pixel_values.flatten(1).to(weight.dtype), weight.flatten(1), self.patch_embedding.bias)
        # One interpolation per distinct grid size; repeated for every frame that shares it.
        sizes = [tuple(s) for s in grid_thw[:, 1:].tolist()]
        cache = {hw: self.interpolated_positions(*hw) for hw in dict.fromkeys(sizes)}
        pos = torch.cat([cache[hw].repeat(t, 1) for hw, t in zip(sizes, grid_thw[:, 0].tolist())])
        return x + pos


class KeyeVisionAttention(nn.Module):
    def __init__(self, config: KeyeVisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, seq_lens, backend) -> torch.Tensor:
        n = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(n, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(n, self.num_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(n, self.num_heads, self.head_dim)
        out = varlen_attention(
            q, k, v, cu_seqlens, max_seqlen, causal=False, scale=self.scale, backend=backend, seq_lens=seq_lens
        )
        return self.out_proj(out.reshape(n, -1))


class KeyeVisionMLP(nn.Module):
    def __init__(self, config: KeyeVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class KeyeVisionLayer(GradientCheckpointingLayer):
    def __init__(self, config: KeyeVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = KeyeVisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = KeyeVisionMLP(config)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, seq_lens, backend) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), cos, sin, cu_seqlens, max_seqlen, seq_lens, backend)
        return x + self.mlp(self.layer_norm2(x))


class KeyeVisionEncoder(nn.Module):
    def __init__(self, config: KeyeVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([KeyeVisionLayer(config) for _ in range(config.num_hidden_layers)])
        self.rotary = VisionRotaryEmbedding(config.hidden_size // config.num_attention_heads, config.rope_theta)

    def forward(self, x: torch.Tensor, grid_thw: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        cos, sin = self.rotary(grid_thw)
        seq_lens_t = (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0])
        cu_seqlens = F.pad(torch.cumsum(seq_lens_t, 0), (1, 0)).to(device=x.device, dtype=torch.int32)
        seq_lens = seq_lens_t.tolist()  # one host sync per forward, shared by every layer
        max_seqlen = max(seq_lens)
        for layer in self.layers:  # GradientCheckpointingLayer: checkpointed when enabled on the model
            x = layer(x, cos, sin, cu_seqlens, max_seqlen, seq_lens, backend)
        return x


class KeyeVisionTransformer(nn.Module):
    def __init__(self, config: KeyeVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = KeyeVisionEmbeddings(config)
        self.encoder = KeyeVisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """``pixel_values`` ``[N, 3·p·p]`` in row-major patch order per grid; returns ``[N, hidden]``."""
        grid_thw = grid_thw.reshape(-1, 3).long()
        expected = int((grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).sum())
        if pixel_values.shape[0] != expected:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but grid_thw describes {expected}")
        x = self.embeddings(pixel_values, grid_thw)
        return self.post_layernorm(self.encoder(x, grid_thw, backend))


class KeyeVisionModel(nn.Module):
    """Wrapper whose single child ``vision_model`` gives the released ``visual.vision_model.*`` key names."""

    def __init__(self, config: KeyeVisionConfig) -> None:
        super().__init__()
        self.vision_model = KeyeVisionTransformer(config)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        return self.vision_model(pixel_values, grid_thw, backend)


class KeyeProjector(nn.Module):
    """Keye-VL 1.5 projector: 2×2 merge → LayerNorm(4d) → Linear → GELU → Linear to the LLM width."""

    def __init__(self, vision_hidden: int, text_hidden: int, merge: int = 2, eps: float = 1e-5) -> None:
        super().__init__()
        self.merge = merge
        wide = vision_hidden * merge * merge
        self.pre_norm = nn.LayerNorm(wide, eps=eps)
        self.linear_1 = nn.Linear(wide, wide)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(wide, text_hidden)

    def merge_index(self, grid_thw: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Gather index that orders patches as (t, h/2, w/2, 2, 2): each 4 consecutive rows form one token."""
        m = self.merge
        out, offset = [], 0
        for t, h, w in grid_thw.tolist():
            if h % m or w % m:
                raise ValueError(f"grid {h}x{w} is not divisible by the merge size {m}")
            idx = torch.arange(t * h * w, device=device).view(t, h // m, m, w // m, m)
            out.append(idx.permute(0, 1, 3, 2, 4).reshape(-1) + offset)
            offset += t * h * w
        return torch.cat(out)

    def forward(self, features: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        index = self.merge_index(grid_thw.reshape(-1, 3), features.device)
        merged = features.index_select(0, index).reshape(-1, features.shape[-1] * self.merge * self.merge)
        return self.linear_2(self.act(self.linear_1(self.pre_norm(merged))))
