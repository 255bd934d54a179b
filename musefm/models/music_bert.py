"""MusicBERT (Zeng et al. 2021): a bidirectional encoder over Octuple tokens, trained by masking.

An Octuple token is one note as F fields (MidiTok's order: pitch, position, bar, velocity,
duration, program, tempo, time signature), each with its own vocabulary; the config names the
fields and their vocabulary sizes (``octuple_fields(tokenizer)`` reads both from a tokenizer).

Reading order: config and presets, output type, the model (embedding, encoder, heads), masking,
loss, embeddings for downstream use.

- Input: the F field embeddings of a token are summed (equivalent to the paper's concatenation
  followed by a linear projection, with one matrix fewer), then pre-LayerNorm transformer blocks
  without causal masking; positions are rotary or relative (``position``), padding keys are masked.
- Output: one classifier per field, computed as one fused linear layer and split.
- Masking (``mask_batch``): "random" picks field entries independently; "element" picks whole
  notes; "bar" is the paper's bar-level masking: a (bar, field) pair is picked and that field is
  masked for every note of the bar, so the model cannot copy it from a neighbour of the same bar.
  Picked entries follow BERT's 80/10/10 rule (MASK / random regular token of that field / kept).
  Special tokens (PAD, BOS, EOS, MASK: ids 0-3 in every field vocabulary) are never picked.

Field names and vocabulary sizes come from the tokenizer, so presets leave them empty: a config
without them is valid as a config, and building a model requires them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from musefm.errors import MusefmError
from musefm.models.base import TRANSFORMER_SIZES, PretrainedModel, config_from_presets, validate_transformer
from musefm.modules.attention import build_attention_mask
from musefm.modules.dropout import Dropout
from musefm.modules.positions import RotaryEmbedding
from musefm.modules.transformer import TransformerBlock, init_gpt2_weights

IGNORE_INDEX = -100  # labels of entries that are not predicted (F.cross_entropy's convention)
SPECIAL_TOKENS = 4  # PAD, BOS, EOS, MASK are ids 0..3 of every field vocabulary; regular ids start here


@dataclass
class MusicBERTConfig:
    field_names: list[str] = field(default_factory=list)  # from the tokenizer: octuple_fields()
    field_vocab_sizes: list[int] = field(default_factory=list)
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 1024
    dropout: float = 0.1
    max_seq_len: int = 512  # training context; positions themselves are unbounded
    position: Literal["rope", "relative"] = "rope"
    max_relative: int = 512  # relative attention: farther distances share the last embedding per side
    rope_base: float = 10000.0
    mask_probability: float = 0.15
    masking: Literal["random", "element", "bar"] = "bar"
    pad_id: int = 0
    mask_id: int = 3

    def validate(self, require_fields: bool = False) -> None:
        """Raise MusefmError naming the first bad field; ``require_fields`` when building a model."""
        if len(self.field_names) != len(self.field_vocab_sizes):
            raise MusefmError(f"field_vocab_sizes: {len(self.field_vocab_sizes)} sizes for "
                              f"{len(self.field_names)} field_names")
        if require_fields and not self.field_names:
            raise MusefmError("field_names: must be set from the tokenizer (octuple_fields) before building a model")
        if len(set(self.field_names)) != len(self.field_names):
            raise MusefmError(f"field_names: names repeat in {self.field_names}")
        for name, size in zip(self.field_names, self.field_vocab_sizes):
            if size <= SPECIAL_TOKENS:
                raise MusefmError(f"field_vocab_sizes: field {name!r} has {size} tokens, "
                                  f"no more than the {SPECIAL_TOKENS} special ones")
        validate_transformer(self)
        if not 0.0 < self.mask_probability < 1.0:
            raise MusefmError(f"mask_probability: must be in (0, 1), got {self.mask_probability}")
        if self.masking not in ("random", "element", "bar"):
            raise MusefmError(f"masking: must be 'random', 'element' or 'bar', got {self.masking!r}")
        if self.masking == "bar" and self.field_names and bar_field_index(self.field_names) is None:
            raise MusefmError(f"masking: 'bar' needs a field named like 'bar' (fields: {self.field_names})")
        for name in ("pad_id", "mask_id"):
            if not 0 <= getattr(self, name) < SPECIAL_TOKENS:
                raise MusefmError(f"{name}: must be a special token id (0-{SPECIAL_TOKENS - 1}), got {getattr(self, name)}")


def bar_field_index(field_names: list[str]) -> int | None:
    """Index of the first field whose name contains 'bar' (any case), or None."""
    for index, name in enumerate(field_names):
        if "bar" in name.lower():
            return index
    return None


def octuple_fields(tokenizer) -> tuple[list[str], list[int]]:
    """(field_names, field_vocab_sizes) of a multi-vocabulary (Octuple) MidiTok tokenizer.

    A field is named after the type of its first regular token, lower-cased ("Pitch_21" -> "pitch",
    "TimeSig_4/4" -> "timesig").
    """
    vocabularies = getattr(tokenizer, "vocab", None)
    if not isinstance(vocabularies, list) or not vocabularies:
        raise MusefmError(f"{type(tokenizer).__name__} has one vocabulary; MusicBERT needs Octuple tokens")
    names, sizes = [], []
    for vocabulary in vocabularies:
        by_id = {index: token for token, index in vocabulary.items()}
        if SPECIAL_TOKENS not in by_id:
            raise MusefmError(f"{type(tokenizer).__name__}: a field vocabulary holds special tokens only")
        names.append(by_id[SPECIAL_TOKENS].split("_")[0].lower())
        sizes.append(len(vocabulary))
    return names, sizes


PRESETS = {name: MusicBERTConfig(**sizes) for name, sizes in TRANSFORMER_SIZES.items()}


def config_from_preset(name: str, **overrides) -> MusicBERTConfig:
    """A preset's config with ``overrides`` applied and validated (unknown keys are named)."""
    return config_from_presets(PRESETS, name, "music-bert", **overrides)


@dataclass
class MusicBERTOutput:
    logits: list[torch.Tensor]  # one (B, T, V_f) per field
    hidden: torch.Tensor  # (B, T, D) final-normed contextual states


class MusicBERT(PretrainedModel):
    family = "music-bert"
    config_class = MusicBERTConfig
    tied_weight_names = ()

    def __init__(self, config: MusicBERTConfig):
        super().__init__()
        config.validate(require_fields=True)
        self.config = config
        sizes = config.field_vocab_sizes
        self.n_fields = len(sizes)
        self.bar_field = bar_field_index(config.field_names)
        # All field vocabularies in one table: field f's ids are shifted by the sizes before it, so
        # one embedding lookup serves every field.
        offsets = torch.tensor([0, *sizes[:-1]]).cumsum(0)
        self.register_buffer("field_offsets", offsets, persistent=False)  # (F,)
        self.register_buffer("field_sizes", torch.tensor(sizes), persistent=False)  # (F,)
        self.field_embedding = nn.Embedding(sum(sizes), config.d_model)
        self.embedding_dropout = Dropout(config.dropout)
        head_dim = config.d_model // config.n_heads
        self.rotary = RotaryEmbedding(head_dim, config.rope_base) if config.position == "rope" else None
        self.blocks = nn.ModuleList(
            TransformerBlock(config.d_model, config.n_heads, config.d_ff, config.dropout, config.position,
                             config.max_relative, causal=False)
            for _ in range(config.n_layers)
        )
        self.final_norm = nn.LayerNorm(config.d_model)
        self.output_head = nn.Linear(config.d_model, sum(sizes))  # all field classifiers, fused
        init_gpt2_weights(self, self.blocks, config.n_layers)

    def _check_input(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 3 or input_ids.shape[-1] != self.n_fields:
            raise MusefmError(f"input_ids: expected (batch, time, {self.n_fields}) Octuple ids, "
                              f"got shape {tuple(input_ids.shape)}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> MusicBERTOutput:
        """Per-field logits and hidden states of ``input_ids`` (B, T, F); ``attention_mask`` (B, T)."""
        self._check_input(input_ids)
        batch, length, _ = input_ids.shape
        embedded = self.field_embedding(input_ids + self.field_offsets)  # (B, T, F, D)
        hidden = self.embedding_dropout(embedded.sum(dim=2))  # (B, T, D)
        key_valid = attention_mask.bool() if attention_mask is not None else None
        mask = build_attention_mask(length, length, causal=False, key_valid=key_valid, device=input_ids.device)
        rotary = self.rotary(0, length, input_ids.device) if self.rotary is not None else None
        for block in self.blocks:
            hidden = block(hidden, mask, rotary=rotary)
        hidden = self.final_norm(hidden)
        logits = self.output_head(hidden).split(self.config.field_vocab_sizes, dim=-1)  # F x (B, T, V_f)
        return MusicBERTOutput(list(logits), hidden)

    def _uniform(self, shape, generator: torch.Generator | None, device) -> torch.Tensor:
        """U[0, 1) numbers drawn from ``generator`` (on its own device) and moved to ``device``."""
        source_device = generator.device if generator is not None else device
        return torch.rand(shape, generator=generator, device=source_device).to(device)

    def mask_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked_input_ids, labels), both (B, T, F); labels are -100 where nothing is predicted."""
        self._check_input(input_ids)
        batch, length, n_fields = input_ids.shape
        device = input_ids.device
        probability = self.config.mask_probability
        eligible = input_ids >= SPECIAL_TOKENS  # (B, T, F)
        if attention_mask is not None:
            eligible = eligible & attention_mask.bool()[..., None]

        if self.config.masking == "random":
            picked = self._uniform((batch, length, n_fields), generator, device) < probability
        elif self.config.masking == "element":
            picked = (self._uniform((batch, length, 1), generator, device) < probability).expand(-1, -1, n_fields)
        else:
            # A bar is a run of equal ids in the bar field (runs, not ids: bar numbers may wrap).
            bars = input_ids[..., self.bar_field]  # (B, T)
            new_bar = F.pad(bars[:, 1:] != bars[:, :-1], (1, 0))  # (B, T): True where a bar starts
            bar_index = new_bar.long().cumsum(dim=1)  # (B, T): 0, 0, 1, 1, 1, 2 ...
            pair_picked = self._uniform((batch, length, n_fields), generator, device) < probability  # (B, bar, F)
            picked = pair_picked.gather(1, bar_index[..., None].expand(-1, -1, n_fields))  # (B, T, F)
        picked = picked & eligible

        # BERT's 80/10/10: the MASK token, a random regular token of the entry's field, or unchanged.
        action = self._uniform((batch, length, n_fields), generator, device)
        draw = self._uniform((batch, length, n_fields), generator, device)
        random_ids = SPECIAL_TOKENS + (draw * (self.field_sizes - SPECIAL_TOKENS)).long()  # (B, T, F)
        random_ids = torch.minimum(random_ids, self.field_sizes - 1)  # float rounding at draw -> 1
        masked = torch.where(picked & (action < 0.8), torch.full_like(input_ids, self.config.mask_id), input_ids)
        masked = torch.where(picked & (action >= 0.8) & (action < 0.9), random_ids, masked)
        labels = input_ids.masked_fill(~picked, IGNORE_INDEX)
        return masked, labels

    def loss(self, batch: dict, generator: torch.Generator | None = None):
        """Masked-token cross-entropy, averaged over every predicted field entry.

        Returns (loss, metrics, None): metrics hold ``loss``, ``tokens`` (predicted field entries),
        ``accuracy`` and ``accuracy_<field>`` for each field (0 when none of it was predicted).
        """
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        masked, labels = self.mask_batch(input_ids, attention_mask, generator)
        output = self(masked, attention_mask)
        summed, counts, corrects = [], [], []
        for index, logits in enumerate(output.logits):
            field_labels = labels[..., index]  # (B, T)
            summed.append(F.cross_entropy(logits.flatten(0, 1), field_labels.flatten(),
                                          ignore_index=IGNORE_INDEX, reduction="sum"))
            counted = field_labels != IGNORE_INDEX
            counts.append(counted.sum())
            corrects.append(((logits.detach().argmax(dim=-1) == field_labels) & counted).sum())
        counts, corrects = torch.stack(counts), torch.stack(corrects)  # (F,)
        tokens = counts.sum()
        loss = torch.stack(summed).sum() / tokens.clamp(min=1)
        # One device-to-host transfer for all metrics.
        values = torch.cat([loss.detach().float()[None], counts.float(), corrects.float()]).tolist()
        loss_value, field_counts, field_corrects = values[0], values[1 : 1 + self.n_fields], values[1 + self.n_fields :]
        total = sum(field_counts)
        metrics = {"loss": loss_value, "tokens": int(total), "accuracy": sum(field_corrects) / max(total, 1.0)}
        for name, count, correct in zip(self.config.field_names, field_counts, field_corrects):
            metrics[f"accuracy_{name}"] = correct / max(count, 1.0)
        return loss, metrics, None

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              pooling: str = "mean") -> torch.Tensor:
        """Contextual embeddings (B, D) of unmasked input: the mean over real tokens, or the first
        token's state (the BOS row)."""
        if pooling not in ("mean", "first"):
            raise MusefmError(f"pooling: must be 'mean' or 'first', got {pooling!r}")
        hidden = self(input_ids, attention_mask).hidden  # (B, T, D)
        if pooling == "first":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(dim=1)
        weights = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
