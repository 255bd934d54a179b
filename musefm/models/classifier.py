"""PieceClassifier: a pretrained backbone (MusicBERT or MusicLM), pooling and a linear head.

Reading order: config, the model (construction, freezing, features, loss, predict), files.

Three ways to adapt the backbone:

- ``linear_probe``: the whole backbone is frozen (``requires_grad=False``) and kept in eval mode
  (no dropout), so only the head learns and features are the pretrained ones exactly.
- ``freeze_layers=N``: the embeddings and the first N transformer blocks are frozen (and kept in
  eval mode); later blocks, the final norm and the head are trained.
- neither: full fine-tuning.

Pooling turns the backbone's hidden states (B, T, D) into one vector per window: "mean" over real
(unpadded) tokens, "first" (the BOS row: meaningful for the bidirectional MusicBERT), or "last"
(the last real token: the only one that has seen the whole window in the causal MusicLM).

A saved classifier is a directory like every musefm model, but of its own family "classifier":
``config.json`` (the backbone's family and config, the head's config with the label names),
``model.safetensors`` (backbone and head weights; no pickle) and ``tokenizer.json``. It is not in
``base.FAMILIES``: ``PieceClassifier.from_pretrained`` reads it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from musefm.config import from_dict
from musefm.data.dataset import MASK
from musefm.errors import MusefmError
from musefm.atomic import atomic_directory
from musefm.models.base import family_class, read_model_config, versions

FAMILY = "classifier"


@dataclass
class ClassifierConfig:
    label_names: list[str] = field(default_factory=list)
    pooling: Literal["mean", "first", "last"] = "mean"
    dropout: float = 0.1  # before the linear head
    linear_probe: bool = False
    freeze_layers: int = 0  # embeddings + this many first blocks frozen (ignored with linear_probe)
    seq_len: int = 0  # window length the classifier was trained on (prediction uses the same)
    # Octuple [column, token id] pairs: that field is set to this one value in every note before the
    # backbone reads it, so piece-wide metadata (tempo, program ...) cannot give the label away.
    neutral: list[list[int]] = field(default_factory=list)

    def validate(self) -> None:
        if len(self.label_names) < 2:
            raise MusefmError(f"label_names: a classifier needs at least 2 classes, got {self.label_names}")
        if len(set(self.label_names)) != len(self.label_names):
            raise MusefmError(f"label_names: names repeat in {self.label_names}")
        if self.pooling not in ("mean", "first", "last"):
            raise MusefmError(f"pooling: must be 'mean', 'first' or 'last', got {self.pooling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise MusefmError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.freeze_layers < 0 or self.seq_len < 0:
            raise MusefmError("freeze_layers and seq_len must be >= 0")
        if any(len(pair) != 2 or min(pair) < 0 for pair in self.neutral):
            raise MusefmError(f"neutral: expected [column, token id] pairs, got {self.neutral}")

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


class PieceClassifier(nn.Module):
    family = FAMILY

    def __init__(self, backbone: nn.Module, config: ClassifierConfig):
        super().__init__()
        config.validate()
        if backbone.family not in ("music-bert", "music-lm"):
            raise MusefmError(f"a classifier needs a music-bert or music-lm backbone, not {backbone.family!r}")
        n_layers = backbone.config.n_layers
        if config.freeze_layers > n_layers:
            raise MusefmError(f"freeze_layers: the backbone has {n_layers} blocks, cannot freeze {config.freeze_layers}")
        self.backbone, self.config = backbone, config
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(backbone.config.d_model, config.num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        # Training-time only (set by the recipe), so not saved with the weights.
        self.register_buffer("class_weights", torch.ones(config.num_classes), persistent=False)
        for module in self.frozen_modules():
            for parameter in module.parameters():
                parameter.requires_grad_(False)
        self.train()

    # ---- freezing ----------------------------------------------------------------------

    def frozen_modules(self) -> list[nn.Module]:
        """Backbone modules that are not trained (and stay in eval mode)."""
        if self.config.linear_probe:
            return [self.backbone]
        if self.config.freeze_layers == 0:
            return []
        embedding = self.backbone.field_embedding if self.backbone.family == "music-bert" else self.backbone.token_embedding
        return [embedding, self.backbone.embedding_dropout, *self.backbone.blocks[: self.config.freeze_layers]]

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()  # frozen features are the pretrained ones: no dropout in them
        return self

    # ---- forward -----------------------------------------------------------------------

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled backbone states (B, D) of windows ``input_ids`` (B, T) or (B, T, F)."""
        if self.config.neutral and input_ids.dim() == 3:
            input_ids = input_ids.clone()
            for column, token_id in self.config.neutral:
                values = input_ids[..., column]  # (B, T) view
                values.masked_fill_(values > MASK, token_id)  # PAD/BOS/EOS/MASK rows keep theirs
        if self.backbone.family == "music-bert":
            hidden = self.backbone(input_ids, attention_mask).hidden  # (B, T, D)
        else:
            hidden = self.backbone.hidden_states(input_ids, attention_mask)[0]  # (B, T, D)
        batch, length, _ = hidden.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        real = attention_mask.bool()
        if self.config.pooling == "first":
            return hidden[:, 0]
        if self.config.pooling == "last":
            # Padding is at the end of each row, so the last real token is at (count - 1).
            last = (real.sum(dim=1) - 1).clamp(min=0)  # (B,)
            return hidden[torch.arange(batch, device=hidden.device), last]
        weights = real.to(hidden.dtype)[..., None]  # (B, T, 1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, C)."""
        return self.head(self.dropout(self.features(input_ids, attention_mask)))

    def loss(self, batch: dict):
        """(weighted) cross-entropy of ``batch["label"]`` (B,) int64; the trainer's interface.

        Returns (loss, metrics, None); ``metrics["tokens"]`` is the number of examples.
        """
        labels = batch["label"]
        logits = self(batch["input_ids"], batch.get("attention_mask")).float()  # (B, C)
        weights = self.class_weights.to(logits.device)
        per_example = F.cross_entropy(logits, labels, reduction="none")  # (B,)
        example_weights = weights[labels]  # (B,)
        # Weighted mean (as F.cross_entropy's weight=): class weights change the balance, not the scale.
        loss = (per_example * example_weights).sum() / example_weights.sum().clamp(min=1e-12)
        correct = (logits.detach().argmax(dim=-1) == labels).sum()
        loss_value, correct_count = torch.stack([loss.detach(), correct.float()]).tolist()
        count = int(labels.numel())
        return loss, {"loss": loss_value, "tokens": count, "accuracy": correct_count / max(count, 1)}, None

    @torch.no_grad()
    def predict(self, batch: dict) -> torch.Tensor:
        """Class probabilities (B, C) of a batch of windows (eval mode, no gradients)."""
        was_training = self.training
        self.eval()
        try:
            logits = self(batch["input_ids"], batch.get("attention_mask"))
        finally:
            self.train(was_training)
        return logits.float().softmax(dim=-1)

    # ---- files -------------------------------------------------------------------------

    def write_files(self, directory: Path) -> None:
        """config.json and model.safetensors into an existing directory (checkpoints use this)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        tied = {f"backbone.{name}" for name in getattr(self.backbone, "tied_weight_names", ())}
        weights = {name: tensor.detach().cpu().contiguous().clone()
                   for name, tensor in self.state_dict().items() if name not in tied}
        save_file(weights, str(directory / "model.safetensors"))
        config = {"family": FAMILY, "backbone": {"family": self.backbone.family,
                                                  "config": dataclasses.asdict(self.backbone.config)},
                  "config": dataclasses.asdict(self.config), "versions": versions()}
        (directory / "config.json").write_text(json.dumps(config, indent=2))

    def save_pretrained(self, directory, tokenizer_path=None) -> Path:
        """Write the classifier directory atomically (with ``tokenizer.json`` when given)."""
        with atomic_directory(directory) as folder:
            self.write_files(folder)
            if tokenizer_path is not None:
                shutil.copyfile(tokenizer_path, folder / "tokenizer.json")
        return Path(directory)

    @classmethod
    def from_pretrained(cls, directory, map_location: str = "cpu") -> "PieceClassifier":
        from safetensors.torch import load_file

        directory = Path(directory)
        data = read_model_config(directory)
        if data["family"] != FAMILY:
            raise MusefmError(f"{directory}: holds a {data['family']} model, not a classifier (run musefm finetune)")
        try:
            backbone_family, backbone_config = data["backbone"]["family"], data["backbone"]["config"]
        except (KeyError, TypeError):
            raise MusefmError(f"{directory / 'config.json'}: classifier config has no backbone") from None
        backbone_class = family_class(backbone_family)
        backbone = backbone_class(from_dict(backbone_class.config_class, backbone_config))
        model = cls(backbone, from_dict(ClassifierConfig, data["config"]))
        weights = directory / "model.safetensors"
        if not weights.is_file():
            raise MusefmError(f"{directory}: model.safetensors is missing")
        missing, unexpected = model.load_state_dict(load_file(str(weights), device=map_location), strict=False)
        tied = {f"backbone.{name}" for name in getattr(backbone, "tied_weight_names", ())}
        missing = [name for name in missing if name not in tied]
        if missing or unexpected:
            raise MusefmError(f"{weights}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model.to(map_location).eval()
