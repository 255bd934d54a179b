"""A pre-LayerNorm transformer block and Transformer-XL segment memory.

Transformer-XL (Dai et al. 2019) carries context across segments: the hidden states that *entered*
each layer for the last ``memory_len`` positions are kept (detached: no gradient flows into the
previous segment) and put in front of the next segment's keys and values in that layer. A block
therefore takes an optional ``memory`` (B, M, D) holding earlier inputs of the same layer; the model
collects each layer's input to build the next memory with ``next_memory``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from musefm.modules.attention import AttentionMask, KVCache, MultiHeadSelfAttention
from musefm.modules.dropout import Dropout


class MLP(nn.Module):
    """Position-wise feed-forward: D -> d_ff -> D with GELU (tanh approximation, as GPT-2)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.up_projection = nn.Linear(d_model, d_ff)
        self.activation = nn.GELU(approximate="tanh")
        self.down_projection = nn.Linear(d_ff, d_model)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_projection(self.activation(self.up_projection(hidden)))


class TransformerBlock(nn.Module):
    """x + Attention(LN(x)), then x + MLP(LN(x)); memory rows go through the same LayerNorm."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0, position: str = "rope",
                 max_relative: int = 0, causal: bool = True, attention_dropout: float | None = None):
        super().__init__()
        self.attention_norm = nn.LayerNorm(d_model)
        # Dropout on attention weights defaults to the residual rate; MusicLM turns it off (see there).
        attention_dropout = dropout if attention_dropout is None else attention_dropout
        self.attention = MultiHeadSelfAttention(d_model, n_heads, attention_dropout, position, max_relative, causal)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff)
        self.residual_dropout = Dropout(dropout)

    def residual_projections(self) -> list[nn.Linear]:
        """Layers that write into the residual stream (GPT-2 scales their init by 1/sqrt(2 n_layers))."""
        return [self.attention.output_projection, self.mlp.down_projection]

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
        """hidden (B, T, D) -> (B, T, D); memory (B, M, D) are earlier inputs of this block."""
        normed_memory = self.attention_norm(memory) if memory is not None else None
        attended = self.attention(self.attention_norm(hidden), mask, rotary=rotary, memory=normed_memory,
                                  cache=cache, layer_index=layer_index)
        hidden = hidden + self.residual_dropout(attended)
        return hidden + self.residual_dropout(self.mlp(self.mlp_norm(hidden)))


def init_gpt2_weights(model: nn.Module, blocks, n_layers: int) -> None:
    """GPT-2 init: N(0, 0.02) weights, zero biases; layers adding into the residual stream get
    std 0.02 / sqrt(2 n_layers) so the stream's variance does not grow with depth."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    for block in blocks:
        for projection in block.residual_projections():
            nn.init.normal_(projection.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))


def next_memory(memory: torch.Tensor | None, layer_input: torch.Tensor, memory_len: int) -> torch.Tensor:
    """The last ``memory_len`` rows of [memory, layer_input] (B, M', D), detached."""
    if memory is None or layer_input.shape[1] >= memory_len:
        return layer_input[:, -memory_len:].detach()
    return torch.cat([memory, layer_input], dim=1)[:, -memory_len:].detach()  # (B, M', D)


def next_memory_mask(memory_valid: torch.Tensor, segment_valid: torch.Tensor, memory_len: int) -> torch.Tensor:
    """Validity (B, M') of the rows ``next_memory`` keeps, from that of the memory (B, M) and of
    the segment (B, T; False = padding)."""
    return torch.cat([memory_valid, segment_valid], dim=1)[:, -memory_len:]  # (B, M')
