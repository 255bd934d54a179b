"""Multi-head self-attention on ``scaled_dot_product_attention``, its masks, and a KV cache.

One attention layer serves every model family: causal or bidirectional, rotary or relative
positions, with Transformer-XL memory (keys/values of the previous segment's hidden states put in
front of the current ones) and with a KV cache for token-by-token decoding. Keys are always laid out
as ``[memory or cached past ..., current tokens]`` and the queries are the current tokens, i.e. the
last ``T_q`` of the ``T_k`` key positions; every mask and position scheme relies on that.

The mask of a forward pass is built once (``build_attention_mask``) and shared by all layers. When
nothing but plain causality needs masking, no mask tensor exists and SDPA runs its fused causal
kernels (flash / memory-efficient attention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from musefm.errors import MusefmError
from musefm.modules.positions import RelativePositionEmbedding, apply_rotary


class KVCache:
    """Keys and values of the tokens decoded so far, per layer, for incremental decoding.

    Keys are stored after rotary embedding (their absolute positions are baked in), so each new
    token only computes its own key and value. Storage is a per-layer buffer whose live entries are
    ``[start, start + length)``: appending writes after them, and a buffer that is full doubles, so
    appending a token copies nothing in the common case (``torch.cat`` would copy the whole cache
    at every token).

    ``max_length = W`` makes a sliding window: every token attends to itself and the ``W - 1``
    tokens before it, so a step costs O(W) however long generation runs. Only the last ``W - 1``
    tokens are kept: dropping the oldest moves ``start`` forward, and when the live entries reach
    the end of the buffer (which holds ``2 W``) they are copied to its front, once every ~W tokens.
    This equals a full forward pass in which position ``i`` may attend to positions
    ``i - W + 1 .. i`` (banded causal mask, as in Mistral / Longformer); with one layer that is
    exactly a forward pass over the last W tokens.

    Meant for inference (under ``torch.no_grad()``): the buffers are written in place.
    """

    def __init__(self, n_layers: int, batch_size: int, max_length: int | None = None):
        if max_length is not None and max_length < 1:
            raise MusefmError(f"max_length: a cache window must hold at least 1 token, got {max_length}")
        self.n_layers, self.batch_size, self.max_length = n_layers, batch_size, max_length
        self.keys: list[torch.Tensor | None] = [None] * n_layers  # each (B, H, capacity, Dh)
        self.values: list[torch.Tensor | None] = [None] * n_layers  # each (B, H, capacity, Dh)
        self.key_valid: torch.Tensor | None = None  # (B, capacity) bool; None while every key is real
        self.capacity = 0
        self.start = 0  # buffer index of the oldest live entry
        self.length = 0  # live entries (the same in every layer between forward passes)
        self.position = 0  # absolute position of the next token = tokens seen so far

    def past_length(self) -> int:
        """How many cached tokens the next tokens will attend to (the window permitting)."""
        if self.max_length is None:
            return self.length
        return min(self.length, self.max_length - 1)

    def reserve(self, new_tokens: int) -> int:
        """Make room for ``new_tokens`` appended entries; returns the number of past entries kept.

        Called once per forward pass, before the layers, so every layer's buffer moves together.
        """
        past = self.past_length()
        self.start += self.length - past  # entries that fell out of the window
        self.length = past
        if self.start + past + new_tokens <= self.capacity:
            return past
        if self.max_length is None:
            capacity = max(past + new_tokens, 2 * self.capacity, 16)
        else:
            capacity = max(past + new_tokens, 2 * self.max_length)
        for layer in range(self.n_layers):
            self.keys[layer] = self._moved(self.keys[layer], self.start, past, capacity, dim=2)
            self.values[layer] = self._moved(self.values[layer], self.start, past, capacity, dim=2)
        self.key_valid = self._moved(self.key_valid, self.start, past, capacity, dim=1)
        self.capacity, self.start = capacity, 0
        return past

    @staticmethod
    def _moved(buffer, start: int, kept: int, capacity: int, dim: int):
        """A buffer of ``capacity`` entries along ``dim`` holding the ``kept`` live ones in front."""
        if buffer is None:
            return None
        shape = list(buffer.shape)
        shape[dim] = capacity
        fresh = buffer.new_zeros(shape)
        fresh.narrow(dim, 0, kept).copy_(buffer.narrow(dim, start, kept))
        return fresh

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values (B, H, T, Dh) to ``layer``; all live ones (B, H, past + T, Dh)."""
        batch, heads, new_tokens, head_dim = keys.shape
        if self.keys[layer] is None:
            # Allocated on first use: only now are the heads, head size and dtype (autocast) known.
            self.keys[layer] = keys.new_zeros(batch, heads, self.capacity, head_dim)
            self.values[layer] = values.new_zeros(batch, heads, self.capacity, head_dim)
        end = self.start + self.length + new_tokens
        self.keys[layer][:, :, end - new_tokens : end] = keys
        self.values[layer][:, :, end - new_tokens : end] = values
        return self.keys[layer][:, :, self.start : end], self.values[layer][:, :, self.start : end]

    def past_key_valid(self) -> torch.Tensor | None:
        """(B, live entries) bool: False for cached tokens that were padding; None if all are real."""
        return None if self.key_valid is None else self.key_valid[:, self.start : self.start + self.length]

    def advance(self, new_tokens: int, valid: torch.Tensor | None) -> None:
        """Record that ``new_tokens`` tokens were appended (``valid``: (B, T) bool, False = padding)."""
        if valid is not None and self.key_valid is None:
            self.key_valid = torch.ones(self.batch_size, self.capacity, dtype=torch.bool, device=valid.device)
        if self.key_valid is not None:
            end = self.start + self.length + new_tokens
            self.key_valid[:, end - new_tokens : end] = True if valid is None else valid
        self.length += new_tokens
        self.position += new_tokens


@dataclass
class AttentionMask:
    """Which keys each query may see, shared by all layers of one forward pass.

    ``allowed`` is bool (B or 1, 1, T_q, T_k) or (B, 1, 1, T_k), True = may attend; None means
    nothing is masked beyond ``is_causal`` (square causal attention, left to SDPA's fused kernels).
    """

    query_length: int
    key_length: int
    allowed: torch.Tensor | None = None
    is_causal: bool = False
    _additive: dict = field(default_factory=dict, repr=False)

    def additive(self, dtype: torch.dtype, device) -> torch.Tensor | None:
        """The mask as a float bias (0 / -inf) to add to other logits; built once per dtype."""
        if dtype not in self._additive:
            allowed = self.allowed
            if allowed is None and self.is_causal:
                allowed = causal_allowed(self.query_length, self.key_length, device)
            if allowed is None:
                self._additive[dtype] = None
            else:
                bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
                self._additive[dtype] = bias.masked_fill(~allowed, float("-inf"))
        return self._additive[dtype]


def causal_allowed(query_length: int, key_length: int, device, window: int | None = None) -> torch.Tensor:
    """(1, 1, T_q, T_k) bool: query i (key position T_k - T_q + i) sees keys at or before it,
    and with a window W only the last W of them (itself included)."""
    query_positions = torch.arange(key_length - query_length, key_length, device=device)[:, None]  # (T_q, 1)
    key_positions = torch.arange(key_length, device=device)[None, :]  # (1, T_k)
    distance = query_positions - key_positions  # (T_q, T_k)
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    return allowed[None, None]  # (1, 1, T_q, T_k)


def build_attention_mask(
    query_length: int,
    key_length: int,
    *,
    causal: bool,
    key_valid: torch.Tensor | None = None,
    window: int | None = None,
    device=None,
) -> AttentionMask:
    """The mask for queries that are the last ``query_length`` of ``key_length`` key positions.

    ``key_valid`` (B, T_k) bool marks real keys (False: padding, or memory rows of another piece).
    A query always keeps itself visible: a padded query whose other keys are all masked would
    otherwise get a softmax over nothing (NaN), and NaN values leak into real outputs through
    ``0 * NaN`` in the next layer. Real queries are unaffected (their own key is real).
    """
    square = query_length == key_length
    if causal and key_valid is None and (window is None or window >= key_length):
        if square:
            return AttentionMask(query_length, key_length, None, is_causal=True)
        if query_length == 1:
            return AttentionMask(query_length, key_length, None)  # one new token sees every key
    if not causal:
        if key_valid is None:
            return AttentionMask(query_length, key_length, None)
        if not square:
            raise ValueError("bidirectional attention expects as many queries as keys")
        # A sequence of padding only sees everything (its outputs are unused; this avoids NaN).
        key_valid = key_valid | ~key_valid.any(dim=-1, keepdim=True)  # (B, T_k)
        return AttentionMask(query_length, key_length, key_valid[:, None, None, :])  # (B, 1, 1, T_k)
    allowed = causal_allowed(query_length, key_length, device, window)  # (1, 1, T_q, T_k)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]  # (B, 1, T_q, T_k)
        itself = torch.eye(query_length, dtype=torch.bool, device=device)  # (T_q, T_q)
        itself = F.pad(itself, (key_length - query_length, 0))  # (T_q, T_k): key position of query i
        allowed = allowed | itself
    return AttentionMask(query_length, key_length, allowed)


# Longest key length for which bf16 attention on a CPU is computed with explicit matrix products.
EXPLICIT_ATTENTION_MAX_KEYS = 512


def uses_explicit_attention(queries: torch.Tensor, keys: torch.Tensor, dropout: float) -> bool:
    """Whether ``explicit_attention`` beats SDPA here: bf16 on a CPU, windows of up to 512 keys.

    PyTorch 2.13's CPU flash-attention kernel gains nothing from bf16, while bf16 matrix products
    run ~4x faster than fp32 on CPUs with avx512_bf16: for a (8, 4, 256, 64) causal window forward +
    backward takes ~8 ms explicitly against ~17 ms in the fused kernel. The (T_q, T_k) score matrix
    it materialises is why long windows keep the fused kernel.
    """
    return (queries.device.type == "cpu" and queries.dtype == torch.bfloat16 and dropout == 0.0
            and queries.shape[2] > 1 and keys.shape[2] <= EXPLICIT_ATTENTION_MAX_KEYS)


def explicit_attention(queries, keys, values, mask: AttentionMask) -> torch.Tensor:
    """softmax(Q Kᵀ / sqrt(Dh) + mask) V for (B, H, T, Dh) inputs, in their dtype.

    In bf16 the scores are rounded to bf16 (PyTorch's softmax kernel still sums in float32), as in
    Hugging Face's eager attention: the outputs differ from an fp32 reference by about as much as the
    fused kernel's do, and upcasting the (T_q, T_k) scores would cost more than the fused kernel.
    """
    scores = torch.matmul(queries * queries.shape[-1] ** -0.5, keys.transpose(-1, -2))  # (B, H, T_q, T_k)
    additive = mask.additive(scores.dtype, queries.device)
    if additive is not None:
        scores = scores + additive
    return torch.matmul(scores.softmax(dim=-1), values)  # (B, H, T_q, Dh)


class MultiHeadSelfAttention(nn.Module):
    """Self-attention with a fused q/k/v projection, on ``F.scaled_dot_product_attention``.

    ``position="rope"`` expects (cos, sin) tables for the keys computed in this call (memory and
    current tokens; queries use the last T_q rows). ``position="relative"`` owns a
    ``RelativePositionEmbedding``; its logits use queries scaled by 1/sqrt(head_dim), matching the
    Music Transformer's ``softmax((Q Kᵀ + S_rel) / sqrt(Dh))`` since SDPA adds the bias unscaled.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, position: str = "rope",
                 max_relative: int = 0, causal: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.causal, self.position, self.dropout = causal, position, dropout
        self.qkv_projection = nn.Linear(d_model, 3 * d_model)
        self.output_projection = nn.Linear(d_model, d_model)
        self.relative = (RelativePositionEmbedding(n_heads, self.head_dim, max_relative, causal)
                         if position == "relative" else None)

    def _split_heads(self, projected: torch.Tensor, parts: int) -> list[torch.Tensor]:
        batch, length, _ = projected.shape  # (B, T, parts * D)
        heads = projected.view(batch, length, parts, self.n_heads, self.head_dim)  # (B, T, parts, H, Dh)
        return list(heads.permute(2, 0, 3, 1, 4).unbind(0))  # parts x (B, H, T, Dh)

    def forward(
        self,
        hidden: torch.Tensor,
        mask: AttentionMask,
        *,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        memory: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer_index: int = 0,
    ) -> torch.Tensor:
        """hidden (B, T, D) normalized current tokens; memory (B, M, D) normalized memory rows."""
        batch, length, _ = hidden.shape
        queries, keys, values = self._split_heads(self.qkv_projection(hidden), 3)  # each (B, H, T, Dh)
        if memory is not None:
            # Memory rows only need keys and values: project with the k/v part of the fused weight.
            kv_weight = self.qkv_projection.weight[self.d_model :]
            kv_bias = self.qkv_projection.bias[self.d_model :]
            memory_keys, memory_values = self._split_heads(F.linear(memory, kv_weight, kv_bias), 2)  # (B, H, M, Dh)
            keys = torch.cat([memory_keys, keys], dim=2)  # (B, H, M + T, Dh)
            values = torch.cat([memory_values, values], dim=2)  # (B, H, M + T, Dh)
        if rotary is not None:
            cos, sin = rotary  # (M + T, Dh) for the keys computed here
            queries = apply_rotary(queries, cos[-length:], sin[-length:])
            keys = apply_rotary(keys, cos, sin)
        if cache is not None:
            keys, values = cache.update(layer_index, keys, values)  # (B, H, past + T, Dh)

        dropout = self.dropout if self.training else 0.0
        if self.relative is not None:
            scaled_queries = queries * self.head_dim**-0.5
            bias = self.relative(scaled_queries, keys.shape[2])  # (B, H, T_q, T_k), a skewed view
            additive = mask.additive(bias.dtype, hidden.device)
            # Either way a fresh contiguous tensor: fused kernels (cuDNN attention) reject the skewed
            # view's unaligned rows and storage offset.
            if additive is not None:
                bias = bias + additive
            else:
                bias = bias.clone(memory_format=torch.contiguous_format)
            attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=bias.to(queries.dtype),
                                                      dropout_p=dropout)
        elif uses_explicit_attention(queries, keys, dropout):
            attended = explicit_attention(queries, keys, values, mask)
        else:
            attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask.allowed,
                                                      dropout_p=dropout, is_causal=mask.is_causal)
        attended = attended.transpose(1, 2).reshape(batch, length, self.d_model)  # (B, T, D)
        return self.output_projection(attended)
