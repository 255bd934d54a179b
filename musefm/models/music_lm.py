"""MusicLM: a causal music transformer (Music Transformer / Transformer-XL) over REMI or TSD tokens.

GPT-2-shaped (pre-LayerNorm blocks, GELU MLP, final LayerNorm, tied input/output embeddings, GPT-2
init) with the positions music models use: rotary embeddings (``position="rope"``) or Music
Transformer relative attention (``position="relative"``), optional Transformer-XL memory of the
previous segment (``memory_len > 0``) and a KV cache (optionally a sliding window) for generation.

Reading order: config and presets, output type, the model (construction, forward, loss, cache).

vocab_size comes from the tokenizer, so presets leave it at 0 ("not known yet"): a config with
vocab_size 0 is valid as a config (files, presets, overrides), and building a model requires it to
be set: ``config_from_preset("small", vocab_size=len(tokenizer))``.

Padding is at the end of each row (the dataset's convention). A causal query then never sees a
padded key within its segment, so ``attention_mask`` does not mask attention in a plain forward
(keeping SDPA's fused causal kernels); it selects the tokens that count in the loss, marks which
new memory rows are real, and marks padded keys in a cache (a left-padded prompt works there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from musefm.errors import MusefmError
from musefm.models.base import TRANSFORMER_SIZES, PretrainedModel, config_from_presets, validate_transformer
from musefm.modules.attention import KVCache, build_attention_mask
from musefm.modules.dropout import Dropout
from musefm.modules.positions import RotaryEmbedding
from musefm.modules.transformer import TransformerBlock, init_gpt2_weights, next_memory, next_memory_mask

IGNORE_INDEX = -100  # targets that do not count in the loss (F.cross_entropy's convention)


@dataclass
class MusicLMConfig:
    vocab_size: int = 0  # 0 = taken from the tokenizer before the model is built
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 1024
    dropout: float = 0.1  # on embeddings and residual branches
    # Dropout on attention weights: off by default. It forces scaled_dot_product_attention onto its
    # slow math path (a (B, H, T, T) mask; no flash kernel) for little regularisation benefit.
    attention_dropout: float = 0.0
    max_seq_len: int = 512  # training context (segment length); positions themselves are unbounded
    position: Literal["rope", "relative"] = "rope"
    memory_len: int = 0  # Transformer-XL memory rows per layer; 0 = no memory
    max_relative: int = 512  # relative attention: distances >= max_relative share the last embedding
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    pad_id: int = 0

    def validate(self, require_vocab: bool = False) -> None:
        """Raise MusefmError naming the first bad field; ``require_vocab`` when building a model."""
        if self.vocab_size < 0 or (require_vocab and self.vocab_size == 0):
            raise MusefmError(f"vocab_size: must be set from the tokenizer (> 0) before building a model, "
                              f"got {self.vocab_size}")
        validate_transformer(self)
        if not 0.0 <= self.attention_dropout < 1.0:
            raise MusefmError(f"attention_dropout: must be in [0, 1), got {self.attention_dropout}")
        if self.memory_len < 0:
            raise MusefmError(f"memory_len: must be 0 (no memory) or more, got {self.memory_len}")
        if self.pad_id < 0 or (self.vocab_size and self.pad_id >= self.vocab_size):
            raise MusefmError(f"pad_id: {self.pad_id} is not a token id of a {self.vocab_size}-token vocabulary")


PRESETS = {name: MusicLMConfig(**sizes) for name, sizes in TRANSFORMER_SIZES.items()}


def config_from_preset(name: str, **overrides) -> MusicLMConfig:
    """A preset's config with ``overrides`` applied and validated (unknown keys are named)."""
    return config_from_presets(PRESETS, name, "music-lm", **overrides)


@dataclass
class MusicLMOutput:
    logits: torch.Tensor  # (B, T, V)
    memory: list[torch.Tensor] | None = None  # per layer (B, M', D), detached; None when memory_len == 0
    cache: KVCache | None = None  # the cache passed in, now holding this call's tokens too
    memory_mask: torch.Tensor | None = None  # (B, M') bool: False for memory rows that were padding


class MusicLM(PretrainedModel):
    family = "music-lm"
    config_class = MusicLMConfig

    def __init__(self, config: MusicLMConfig):
        super().__init__()
        config.validate(require_vocab=True)
        self.config = config
        head_dim = config.d_model // config.n_heads
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.embedding_dropout = Dropout(config.dropout)
        self.rotary = RotaryEmbedding(head_dim, config.rope_base) if config.position == "rope" else None
        self.blocks = nn.ModuleList(
            TransformerBlock(config.d_model, config.n_heads, config.d_ff, config.dropout, config.position,
                             config.max_relative, causal=True, attention_dropout=config.attention_dropout)
            for _ in range(config.n_layers)
        )
        self.final_norm = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # One matrix reads tokens in and scores them out; saved once, under token_embedding.
            self.lm_head.weight = self.token_embedding.weight
        self.tied_weight_names = ("lm_head.weight",) if config.tie_embeddings else ()
        init_gpt2_weights(self, self.blocks, config.n_layers)

    def init_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        """An empty KV cache; ``max_length = W`` makes it a sliding window (see ``KVCache``)."""
        return KVCache(self.config.n_layers, batch_size, max_length)

    def decoder(self) -> "SingleTokenDecoder":
        """A function ``(tokens (B,), cache) -> next-token logits (B, V)`` for token-by-token decoding.

        It gives the numbers of ``self(tokens[:, None], cache=cache).logits[:, -1]`` (to float
        rounding) in about half the time on a CPU: see ``SingleTokenDecoder``. It reads the weights
        as they are now: make a new one after training further.
        """
        return SingleTokenDecoder(self)

    def _check_memory(self, memory, memory_mask, batch: int):
        if len(memory) != self.config.n_layers:
            raise MusefmError(f"memory: expected one tensor per layer ({self.config.n_layers}), got {len(memory)}")
        memory_length = memory[0].shape[1]
        if memory_mask is None:
            return memory_length, None
        if memory_mask.dim() == 1:  # one flag per row: the whole memory is valid or not
            memory_mask = memory_mask[:, None].expand(batch, memory_length)
        if tuple(memory_mask.shape) != (batch, memory_length):
            raise MusefmError(f"memory_mask: expected shape {(batch, memory_length)}, got {tuple(memory_mask.shape)}")
        return memory_length, memory_mask.bool()

    def hidden_states(self, input_ids, attention_mask=None, memory=None, memory_mask=None, cache=None):
        """Final-normed hidden states (B, T, D), the new memory (or None) and its validity mask."""
        config = self.config
        if input_ids.dim() != 2:
            raise MusefmError(f"input_ids: expected (batch, time) token ids, got shape {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        device = input_ids.device
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
        memory_length, key_valid = 0, None
        if memory is not None:
            if cache is not None:
                raise MusefmError("memory: cannot be combined with a KV cache (the cache already holds the past)")
            if config.memory_len == 0:
                raise MusefmError("memory: this model was configured with memory_len=0")
            memory_length, memory_mask = self._check_memory(memory, memory_mask, batch)
            if memory_mask is not None:
                # Current tokens need no padding mask (padding is at the end; attention is causal).
                current = torch.ones(batch, length, dtype=torch.bool, device=device)
                key_valid = torch.cat([memory_mask, current], dim=1)  # (B, M + T)

        hidden = self.embedding_dropout(self.token_embedding(input_ids))  # (B, T, D)
        if cache is not None:
            if batch != cache.batch_size:
                raise MusefmError(f"cache: built for batch size {cache.batch_size}, got {batch}")
            past = cache.reserve(length)
            past_valid = cache.past_key_valid()
            if attention_mask is not None or past_valid is not None:
                if past_valid is None:
                    past_valid = torch.ones(batch, past, dtype=torch.bool, device=device)
                current = (attention_mask if attention_mask is not None
                           else torch.ones(batch, length, dtype=torch.bool, device=device))
                key_valid = torch.cat([past_valid, current], dim=1)  # (B, past + T)
            mask = build_attention_mask(length, past + length, causal=True, key_valid=key_valid,
                                        window=cache.max_length, device=device)
            first_position, rotated_length = cache.position, length
        else:
            mask = build_attention_mask(length, memory_length + length, causal=True, key_valid=key_valid,
                                        device=device)
            first_position, rotated_length = 0, memory_length + length  # memory rows sit at 0 .. M - 1
        rotary = self.rotary(first_position, rotated_length, device) if self.rotary is not None else None

        keep_memory = config.memory_len > 0 and cache is None
        new_memory = [] if keep_memory else None
        for index, block in enumerate(self.blocks):
            layer_memory = memory[index] if memory is not None else None
            if keep_memory:
                new_memory.append(next_memory(layer_memory, hidden, config.memory_len))  # (B, M', D)
            hidden = block(hidden, mask, rotary=rotary, memory=layer_memory, cache=cache, layer_index=index)
        if cache is not None:
            cache.advance(length, attention_mask)

        new_memory_mask = None
        if keep_memory:
            memory_valid = (memory_mask if memory_mask is not None
                            else torch.ones(batch, memory_length, dtype=torch.bool, device=device))
            segment_valid = (attention_mask if attention_mask is not None
                             else torch.ones(batch, length, dtype=torch.bool, device=device))
            new_memory_mask = next_memory_mask(memory_valid, segment_valid, config.memory_len)
        return self.final_norm(hidden), new_memory, new_memory_mask

    def forward(self, input_ids, attention_mask=None, memory=None, memory_mask=None, cache=None) -> MusicLMOutput:
        """Next-token logits for every position of ``input_ids`` (B, T).

        ``memory``: the previous segment's ``MusicLMOutput.memory`` (Transformer-XL); the segment's
        positions then continue after the M memory rows. ``memory_mask`` (B, M) or (B,) bool: False
        for memory rows a row must not see (its stream started a new piece, or they were padding).
        ``cache``: from ``init_cache``; the tokens are appended after the cached ones (decoding one
        token at a time gives the logits of a full forward over the whole sequence).
        """
        hidden, new_memory, new_memory_mask = self.hidden_states(input_ids, attention_mask, memory, memory_mask, cache)
        return MusicLMOutput(self.lm_head(hidden), new_memory, cache, new_memory_mask)

    @torch.no_grad()
    def generate(self, tokenizer, prompt_ids=None, max_new_tokens: int = 256, constrained: bool = True, **sampling):
        """Continue ``prompt_ids`` (model ids, BOS first; None = from scratch) by up to ``max_new_tokens``.

        Returns (ids (T,): prompt + new tokens, the symusic Score they decode to). ``sampling`` goes to
        ``musefm.generation.sampling.sample`` (temperature, top_k, top_p, seed, window, constraint);
        ``constrained`` adds the token grammar when no ``constraint`` is given (needs a tokenizer
        without BPE).
        """
        import numpy as np
        from symusic import Score

        from musefm.data.tokenize import decode, undo_bpe
        from musefm.generation.constraints import GrammarConstraint
        from musefm.generation.sampling import sample

        if tokenizer.is_multi_voc:
            raise MusefmError(f"tokenizer: {type(tokenizer).__name__} is not a single token stream (REMI or TSD)")
        prompt = torch.as_tensor([tokenizer.vocab["BOS_None"]] if prompt_ids is None else np.asarray(prompt_ids),
                                 dtype=torch.long)
        if prompt.ndim != 1 or not len(prompt) or int(prompt.min()) < 0 or int(prompt.max()) >= self.config.vocab_size:
            raise MusefmError(f"prompt_ids: expected (T,) ids of the model's {self.config.vocab_size}-token vocabulary")
        if constrained and sampling.get("constraint") is None:
            sampling["constraint"] = GrammarConstraint(tokenizer)
        new_ids, _ = sample(self, prompt, max_new_tokens, **sampling)
        ids = torch.cat([prompt, new_ids]).numpy()
        music = undo_bpe(tokenizer, ids[~np.isin(ids, tokenizer.special_tokens_ids)])
        return ids, decode(tokenizer, music) if len(music) else Score(tokenizer.time_division)

    def loss(self, batch: dict, memory=None, memory_mask=None):
        """Next-token cross-entropy over positions whose input and target are both real tokens.

        Returns (loss, metrics, new_memory). The first token of a segment is not predicted (its
        context is the previous segment's last position). ``new_memory`` (None when memory_len is
        0) goes into the next call; its rows include this segment's padding, which only follows
        the end of a piece: pass ``memory_mask`` False for rows whose stream starts a new piece.
        """
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        hidden, new_memory, _ = self.hidden_states(input_ids, attention_mask, memory, memory_mask)
        logits = self.lm_head(hidden[:, :-1])  # (B, T - 1, V): the last position has no target
        targets = input_ids[:, 1:]  # (B, T - 1)
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
            predicted = attention_mask[:, :-1] & attention_mask[:, 1:]
            targets = targets.masked_fill(~predicted, IGNORE_INDEX)
        summed = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        counted = targets != IGNORE_INDEX
        tokens = counted.sum()
        loss = summed / tokens.clamp(min=1)
        correct = ((logits.detach().argmax(dim=-1) == targets) & counted).sum()
        # One device-to-host transfer for all metrics.
        loss_value, token_count, correct_count = torch.stack(
            [loss.detach().float(), tokens.float(), correct.float()]).tolist()
        metrics = {"loss": loss_value, "tokens": int(token_count), "accuracy": correct_count / max(token_count, 1.0)}
        return loss, metrics, new_memory


class SingleTokenDecoder:
    """The cached forward pass of one new token per row, without the general path's overheads.

    At batch 1 a small model's decoding step is bound by per-operation overhead, not arithmetic.
    Compared with ``MusicLM.forward`` this path works on (B, D) rows instead of (B, T, D), calls
    functions instead of modules, rotates queries and keys in one operation, reads rotary angles from
    a table instead of recomputing them, and multiplies by weights transposed once into contiguous
    (in, out) matrices (MKL's M=1 product reads those ~1.5x faster than nn.Linear's (out, in) view).
    It applies to eval-mode rotary models, caches without padding and no autocast; anything else
    goes through ``MusicLM.forward``, so callers never need to choose.
    """

    def __init__(self, model: MusicLM):
        self.model = model
        config = model.config
        self.fast = config.position == "rope" and not model.training
        self.heads, self.head_dim = config.n_heads, config.d_model // config.n_heads
        if not self.fast:
            return
        with torch.no_grad():
            def transposed(linear: nn.Linear):
                return linear.weight.detach().t().contiguous(), linear.bias  # (in, out), (out,) or None

            self.layers = [
                dict(attention_norm=block.attention_norm, mlp_norm=block.mlp_norm,
                     qkv=transposed(block.attention.qkv_projection),
                     output=transposed(block.attention.output_projection),
                     up=transposed(block.mlp.up_projection), down=transposed(block.mlp.down_projection),
                     gelu=block.mlp.activation.approximate)
                for block in model.blocks
            ]
            self.head = transposed(model.lm_head)
        self.cos = self.sin = None  # (positions, Dh) rotary tables, grown on demand

    @staticmethod
    def _linear(rows: torch.Tensor, weight_and_bias) -> torch.Tensor:
        weight, bias = weight_and_bias  # (in, out), (out,)
        return rows @ weight if bias is None else torch.addmm(bias, rows, weight)

    def _rotary(self, position: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (Dh,) of ``position``: rows of a table computed by the model's own rotary module
        (the same float32 values a forward pass computes for that position)."""
        if self.cos is None or position >= len(self.cos) or self.cos.device != device:
            self.cos, self.sin = self.model.rotary(0, max(2 * position, 1024), device)
        return self.cos[position], self.sin[position]

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens (B,) appended to ``cache``; returns the logits (B, V) of the token after them."""
        if not self.fast or cache.key_valid is not None or torch.is_autocast_enabled(tokens.device.type):
            return self.model(tokens[:, None], cache=cache).logits[:, -1]
        batch = tokens.shape[0]
        heads, head_dim, half = self.heads, self.head_dim, self.head_dim // 2
        width = heads * head_dim
        if batch != cache.batch_size:
            raise MusefmError(f"cache: built for batch size {cache.batch_size}, got {batch}")
        cache.reserve(1)
        cos, sin = self._rotary(cache.position, tokens.device)
        hidden = self.model.token_embedding(tokens)  # (B, D)
        cos, sin = cos.to(hidden.dtype), sin.to(hidden.dtype)
        for index, layer in enumerate(self.layers):
            norm = layer["attention_norm"]
            normed = F.layer_norm(hidden, (width,), norm.weight, norm.bias, norm.eps)
            qkv = self._linear(normed, layer["qkv"]).view(batch, 3, heads, head_dim)  # (B, 3, H, Dh)
            query_key = qkv[:, :2]  # (B, 2, H, Dh)
            rotated_half = torch.cat([-query_key[..., half:], query_key[..., :half]], dim=-1)
            query_key = query_key * cos + rotated_half * sin  # the rotation of apply_rotary
            keys, values = cache.update(index, query_key[:, 1, :, None], qkv[:, 2, :, None])  # (B, H, past + 1, Dh)
            attended = F.scaled_dot_product_attention(query_key[:, 0, :, None], keys, values)  # (B, H, 1, Dh)
            hidden = hidden + self._linear(attended.reshape(batch, width), layer["output"])
            norm = layer["mlp_norm"]
            normed = F.layer_norm(hidden, (width,), norm.weight, norm.bias, norm.eps)
            up = F.gelu(self._linear(normed, layer["up"]), approximate=layer["gelu"])  # (B, d_ff)
            hidden = hidden + self._linear(up, layer["down"])
        cache.advance(1, None)
        norm = self.model.final_norm
        return self._linear(F.layer_norm(hidden, (width,), norm.weight, norm.bias, norm.eps), self.head)  # (B, V)
