"""Rotary positions: 2D RoPE inside the ViT, and Keye-VL 1.5's multimodal (3-axis) positions for the LLM.

1.5 treats every image and every video frame as its own grid with t = 1: the token at merged cell (i, j) of a
visual block that starts after position p gets (p+1, p+1+i, p+1+j); text resumes at p+1+max(h', w'). Time is
carried by the textual timestamps before each frame, not by the temporal axis (KEYE_FACTS Part A §1).
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (``[..., T, H, D]`` with ``cos``/``sin`` ``[T, D]``) in float32, return in ``x``'s dtype."""
    xf = x.float()
    out = xf * cos.unsqueeze(-2) + rotate_half(xf) * sin.unsqueeze(-2)
    return out.to(x.dtype)


def split_frames(grid_thw: torch.Tensor) -> torch.Tensor:
    """Expand run-length merged rows ``[k, h, w]`` into ``k`` rows ``[1, h, w]`` (one per image or frame)."""
    grid_thw = grid_thw.reshape(-1, 3).long()
    reps = grid_thw[:, 0]
    frames = grid_thw.repeat_interleave(reps, dim=0)
    frames[:, 0] = 1
    return frames


def grid_row_col(grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column index of every patch, in row-major (t, h, w) order per grid, all grids concatenated."""
    device = grid_thw.device
    rows, cols = [], []
    for t, h, w in grid_thw.tolist():
        idx = torch.arange(h * w, device=device)
        rows.append((idx // w).repeat(t))
        cols.append((idx % w).repeat(t))
    return torch.cat(rows), torch.cat(cols)


class VisionRotaryEmbedding(nn.Module):
    """2D RoPE for the ViT: head_dim/4 frequencies per axis, rows then columns, duplicated (rotate-half)."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.inv_freq = nn.Buffer(self.compute_buffers()["inv_freq"], persistent=False)

    def compute_buffers(self) -> dict[str, torch.Tensor]:
        """Values of the non-persistent buffers (re-applied after loading on the meta device)."""
        dim = self.head_dim // 2
        return {"inv_freq": 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))}

    def forward(self, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = grid_row_col(grid_thw.to(self.inv_freq.device))
        inv = self.inv_freq.float()
        freqs = torch.cat([rows[:, None].float() * inv, cols[:, None].float() * inv], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


class MultimodalRotaryEmbedding(nn.Module):
    """Text rotary embedding over 3-axis positions ``[3, B, L]``: frequency k uses the axis its section names.

    Returns ``(cos, sin)`` of shape ``[B, L, head_dim]`` exactly as transformers' Qwen3 rotary module does, so
    the Qwen3 decoder layers are reused unchanged. With equal positions on all axes this equals plain RoPE.
    """

    def __init__(self, head_dim: int, rope_theta: float, mrope_section: list[int]) -> None:
        super().__init__()
        self.head_dim, self.rope_theta, self.mrope_section = head_dim, rope_theta, list(mrope_section)
        buffers = self.compute_buffers()
        self.inv_freq = nn.Buffer(buffers["inv_freq"], persistent=False)
        self.axis_of_freq = nn.Buffer(buffers["axis_of_freq"], persistent=False)

    def compute_buffers(self) -> dict[str, torch.Tensor]:
        """Values of the non-persistent buffers (re-applied after loading on the meta device)."""
        d = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
        axis = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(self.mrope_section)])
        return {"inv_freq": inv_freq, "axis_of_freq": axis}

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.ndim == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        pos = position_ids.float()  # [3, B, L]
        freqs = pos[..., None] * self.inv_freq.float()  # [3, B, L, D/2]
        index = self.axis_of_freq.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])
        freqs = freqs.gather(0, index).squeeze(0)  # [B, L, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def visual_blocks(
    input_ids: torch.Tensor,
    image_token_id: int,
    video_token_id: int,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    merge: int,
) -> list[tuple[int, int, int]]:
    """``(start, h', w')`` of every visual block of one sequence, in order; checks counts against the grids."""
    blocks: list[tuple[int, int, int]] = []
    for token_id, grid, kind in ((image_token_id, image_grid_thw, "image"), (video_token_id, video_grid_thw, "video")):
        positions = (input_ids == token_id).nonzero().flatten()
        n_tokens = int(positions.numel())
        frames = split_frames(grid) if grid is not None else torch.zeros(0, 3, dtype=torch.long)
        sizes = (frames[:, 1] // merge) * (frames[:, 2] // merge)
        expected = int(sizes.sum())
        if n_tokens != expected:
            raise ValueError(
                f"{kind} placeholder tokens ({n_tokens}) do not match the {kind} features ({expected} tokens from "
                f"{frames.shape[0]} {kind} grids)"
            )
        if n_tokens == 0:
            continue
        starts = torch.cumsum(sizes, 0) - sizes
        block_starts = positions[starts].tolist()
        ends = positions[starts + sizes - 1].tolist()
        for (s, e, n), (_, h, w) in zip(zip(block_starts, ends, sizes.tolist()), frames.tolist()):
            if e - s + 1 != n:
                raise ValueError(f"{kind} placeholder block at token {s} is not contiguous ({n} tokens expected)")
            blocks.append((s, h // merge, w // merge))
    blocks.sort()
    return blocks


def multimodal_position_ids(
    input_ids: torch.Tensor,
    image_token_id: int,
    video_token_id: int,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    merge: int = 2,
) -> torch.Tensor:
    """3-axis positions ``[3, L]`` for one unpadded sequence (starting at 0). Loops over visual blocks only."""
    length = int(input_ids.shape[0])
    device = input_ids.device
    blocks = visual_blocks(input_ids, image_token_id, video_token_id, image_grid_thw, video_grid_thw, merge)
    pieces: list[torch.Tensor] = []
    cursor, next_pos = 0, 0
    for start, hh, ww in blocks:
        n_text = start - cursor
        if n_text:
            pieces.append((next_pos + torch.arange(n_text, device=device)).expand(3, -1))
            next_pos += n_text
        i = torch.arange(hh, device=device).repeat_interleave(ww)
        j = torch.arange(ww, device=device).repeat(hh)
        pieces.append(torch.stack([torch.full_like(i, next_pos), next_pos + i, next_pos + j]))
        next_pos += max(hh, ww)
        cursor = start + hh * ww
    if cursor < length:
        pieces.append((next_pos + torch.arange(length - cursor, device=device)).expand(3, -1))
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long, device=device)
