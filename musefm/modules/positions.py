"""Where a token is: rotary embeddings (RoPE) and Music Transformer relative attention.

Both only ever express the *distance* between a query and a key, so they compose with a KV cache,
Transformer-XL memory and sliding windows: queries are always the last ``T_q`` of the ``T_k`` key
positions (keys = [memory or cached past ..., the current tokens]).

RoPE (Su et al. 2021) rotates pairs of query/key channels by an angle proportional to the token's
absolute position; the dot product of a rotated query and key then depends on the distance only.

Relative attention (Shaw et al. 2018, made memory-efficient by Huang et al. 2018, "Music
Transformer") adds ``q_i · E_r[distance(i, j)]`` to the attention logits. ``E_r`` is learned per
layer and **per head** (shape ``(n_heads, n_distances, head_dim)``, as in the Music Transformer
paper): heads that attend at different ranges can learn different distance profiles. The logits
``q · E_rᵀ`` are computed once per distance, not per (i, j) pair, and moved to their (i, j) cells by
"skewing" (pad, reshape, slice): no (T, T, head_dim) tensor is ever built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotary embeddings for given absolute positions (no learned parameters).

    Channels are rotated in two halves (GPT-NeoX layout: channel c pairs with c + head_dim/2), which
    keeps the rotation a few elementwise ops on contiguous halves.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
        self.head_dim, self.base = head_dim, base

    def forward(self, start: int, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, each (length, head_dim), for positions start .. start + length - 1.

        Computed in float32 whatever the autocast state (angles of far positions lose too much in
        bfloat16), and not stored as a buffer so ``model.to(dtype)`` cannot round them.
        """
        exponents = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim
        inverse_frequency = self.base ** -exponents  # (Dh/2,)
        positions = torch.arange(start, start + length, device=device, dtype=torch.float32)
        angles = torch.outer(positions, inverse_frequency)  # (T, Dh/2)
        angles = torch.cat([angles, angles], dim=-1)  # (T, Dh): both halves of a pair share an angle
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, Dh) by the angles of its T positions (cos, sin: (T, Dh))."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (B, H, T, Dh)
    return x * cos.to(x.dtype) + rotated_half * sin.to(x.dtype)


class RelativePositionEmbedding(nn.Module):
    """Learned relative position embeddings E_r of one attention layer, one table per head.

    Causal attention only looks back, so its table holds distances 0 .. max_relative - 1
    (query position minus key position). Bidirectional attention also looks ahead: its table holds
    distances -(max_relative - 1) .. max_relative - 1. Farther distances share the last embedding
    on their side (clipping, as in Shaw et al.).
    """

    def __init__(self, n_heads: int, head_dim: int, max_relative: int, causal: bool):
        super().__init__()
        self.max_relative, self.causal = max_relative, causal
        n_distances = max_relative if causal else 2 * max_relative - 1
        self.embeddings = nn.Parameter(torch.zeros(n_heads, n_distances, head_dim))  # (H, R, Dh)
        nn.init.normal_(self.embeddings, std=0.02)

    def table_index(self, distances: torch.Tensor) -> torch.Tensor:
        """Row of the table for each (query minus key) distance, clipped to the table."""
        limit = self.max_relative - 1
        if self.causal:
            return distances.clamp(0, limit)
        return distances.clamp(-limit, limit) + limit

    def forward(self, queries: torch.Tensor, key_length: int) -> torch.Tensor:
        """Relative logits (B, H, T_q, T_k) for queries (B, H, T_q, Dh) that are the last T_q of
        ``key_length`` key positions. Scale the queries first if the logits must be scaled."""
        return skewed_relative_logits(queries, self.embeddings, key_length, self.table_index, self.causal)


def skewed_relative_logits(queries, embeddings, key_length: int, table_index, causal: bool) -> torch.Tensor:
    """``S[b, h, i, j] = q[b, h, i] · E[h, table_index(d)]`` with ``d = (T_k - T_q) + i - j``.

    The queries are the last T_q of T_k positions, so query i sits at key position
    ``offset + i`` (offset = T_k - T_q: cached past or memory) and its distance to key j is
    ``offset + i - j``. Along a row of S the distance decreases by one per column, so every row is
    a shifted window onto one vector of per-distance logits ``L[i, c]`` with column c holding
    distance ``T_k - 1 - c``: ``S[i, j] = L[i, j - i + T_q - 1]``. Laying L out with row stride
    one longer than S's rows (pad one column) and reading it back with S's row length moves each
    row by one more column than the one above: that is the skew, a pad, a reshape and a slice.

    Causal attention needs only distances >= 0 (``T_k`` columns). The cells above the diagonal
    (j > offset + i) then read the pad column or the next row: they are masked anyway. Bidirectional
    attention needs all ``T_q + T_k - 1`` distances.
    """
    batch, heads, query_length, _ = queries.shape  # (B, H, T_q, Dh)
    # Column c holds distance T_k - 1 - c: down to 0 (causal) or to 1 - T_q (bidirectional).
    width = key_length if causal else query_length + key_length - 1
    distances = key_length - 1 - torch.arange(width, device=queries.device)
    index = table_index(distances)  # (W,)
    n_distances = embeddings.shape[1]
    if width <= n_distances:
        # Gather the (few) needed embeddings, then one matmul per head.
        logits = queries @ embeddings[:, index].transpose(-1, -2)  # (B, H, T_q, W)
    else:
        # More columns than table rows (clipped distances repeat): multiply by the table once and
        # gather logit columns, cheaper than multiplying repeated embeddings.
        logits = (queries @ embeddings.transpose(-1, -2)).index_select(-1, index)  # (B, H, T_q, W)

    if causal:
        # Pad on the left: row stride T_k + 1; read rows of T_k starting after T_q elements.
        padded = F.pad(logits, (1, 0))  # (B, H, T_q, T_k + 1)
        flat = padded.flatten(-2)  # (B, H, T_q * (T_k + 1))
        return flat[..., query_length:].view(batch, heads, query_length, key_length)  # (B, H, T_q, T_k)
    # Pad on the right: row stride W + 1; read rows of W starting at T_q - 1, keep T_k columns.
    padded = F.pad(logits, (0, 1))  # (B, H, T_q, W + 1)
    flat = padded.flatten(-2)  # (B, H, T_q * (W + 1))
    start = query_length - 1
    rows = flat[..., start : start + query_length * width].view(batch, heads, query_length, width)  # (B, H, T_q, W)
    return rows[..., :key_length]  # (B, H, T_q, T_k)
