"""Model families: one file each (music_lm.py, music_bert.py), loaded by name from a checkpoint."""

from musefm.models.base import FAMILIES, PretrainedModel, family_class, load_pretrained

__all__ = ["FAMILIES", "PretrainedModel", "family_class", "load_pretrained"]
