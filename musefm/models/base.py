"""What every model family shares: a config dataclass, named presets, save/from_pretrained.

A saved model is a directory: ``config.json`` (family, hyperparameters, versions) and
``model.safetensors`` (weights only: loading never unpickles anything). Both are written into a
temporary directory that is renamed into place, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import torch
from torch import nn

from musefm.atomic import atomic_directory
from musefm.config import from_dict
from musefm.errors import MusefmError

FAMILIES = {
    "music-lm": "musefm.models.music_lm:MusicLM",
    "music-bert": "musefm.models.music_bert:MusicBERT",
    "transcriber": "musefm.models.transcriber:Transcriber",
}


# Transformer sizes shared by the symbolic families, so "small" means the same network everywhere.
TRANSFORMER_SIZES = {
    "debug": dict(d_model=32, n_layers=2, n_heads=2, d_ff=128, dropout=0.0, max_seq_len=64, max_relative=64),
    "small": dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024, dropout=0.1, max_seq_len=512, max_relative=512),
    "base": dict(d_model=512, n_layers=8, n_heads=8, d_ff=2048, dropout=0.1, max_seq_len=1024, max_relative=1024),
}


def validate_transformer(config) -> None:
    """The checks every transformer family's config shares; MusefmError names the bad field."""
    for name in ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "max_relative"):
        if getattr(config, name) < 1:
            raise MusefmError(f"{name}: must be at least 1, got {getattr(config, name)}")
    if config.d_model % config.n_heads:
        raise MusefmError(f"n_heads: d_model {config.d_model} is not a multiple of n_heads {config.n_heads}")
    if config.position not in ("rope", "relative"):
        raise MusefmError(f"position: must be 'rope' or 'relative', got {config.position!r}")
    if config.position == "rope" and (config.d_model // config.n_heads) % 2:
        raise MusefmError(f"n_heads: rope needs an even head size, d_model/n_heads = {config.d_model // config.n_heads}")
    if not 0.0 <= config.dropout < 1.0:
        raise MusefmError(f"dropout: must be in [0, 1), got {config.dropout}")
    if config.rope_base <= 1.0:
        raise MusefmError(f"rope_base: must exceed 1, got {config.rope_base}")


def config_from_presets(presets: dict, name: str, family: str, **overrides):
    """Preset ``name``'s config with ``overrides`` applied and validated (unknown keys are named)."""
    if name not in presets:
        raise MusefmError(f"unknown {family} preset {name!r} (choose from {', '.join(presets)})")
    return from_dict(type(presets[name]), dataclasses.asdict(presets[name]) | overrides)


def family_class(family: str):
    if family not in FAMILIES:
        raise MusefmError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})")
    module, name = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), name)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import musefm

    found = {"musefm": musefm.__version__, "torch": torch.__version__}
    for package in ("miditok", "symusic"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


class PretrainedModel(nn.Module):
    """Base of every model family. Subclasses set ``family`` and ``config_class``."""

    family: str = ""
    config_class: type = object

    def write_files(self, directory: Path, dtype: torch.dtype | None = None) -> None:
        """Write config.json and model.safetensors into an existing directory; ``dtype`` (e.g.
        torch.float16, as models shipped in the package are stored) applies to floating tensors."""
        from safetensors.torch import save_file

        directory = Path(directory)
        # Tied weights are stored once (under their owner's name); clones share no memory, which
        # safetensors requires.
        tied = set(getattr(self, "tied_weight_names", ()))

        def stored(tensor):
            tensor = tensor.detach().cpu()
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            return tensor.contiguous().clone()

        unique = {name: stored(tensor) for name, tensor in self.state_dict().items() if name not in tied}
        save_file(unique, str(directory / "model.safetensors"))
        config = {"family": self.family, "config": dataclasses.asdict(self.config), "versions": versions()}
        (directory / "config.json").write_text(json.dumps(config, indent=2))

    def save_pretrained(self, directory, dtype: torch.dtype | None = None) -> Path:
        with atomic_directory(directory) as folder:
            self.write_files(folder, dtype)
        return Path(directory)

    @classmethod
    def from_pretrained(cls, directory, map_location: str = "cpu"):
        model, _ = load_pretrained(directory, map_location, expected=cls)
        return model


def read_model_config(directory) -> dict:
    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        raise MusefmError(f"{directory}: not a musefm model (no config.json)")
    try:
        data = json.loads(path.read_text())
        family = data["family"]
    except (ValueError, KeyError):
        raise MusefmError(f"{path}: not a musefm model config") from None
    return data | {"family": family}


def load_pretrained(directory, map_location: str = "cpu", expected: type | None = None):
    """Model of whatever family ``directory`` holds, and its config.json contents."""
    from safetensors.torch import load_file

    directory = Path(directory)
    data = read_model_config(directory)
    cls = family_class(data["family"])
    if expected is not None and expected is not PretrainedModel and not issubclass(cls, expected):
        raise MusefmError(f"{directory}: holds a {data['family']} model, not a {expected.family} model")
    config = from_dict(cls.config_class, data["config"])
    model = cls(config)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise MusefmError(f"{directory}: model.safetensors is missing")
    state = load_file(str(weights), device=map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "tied_weight_names", ()))
    missing = [name for name in missing if name not in tied]
    if missing or unexpected:
        raise MusefmError(f"{weights}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(map_location), data


def average_pretrained(directories, map_location: str = "cpu"):
    """One model whose weights are the mean of several fine-tunes of one model (a uniform model soup,
    Wortsman et al. 2022): as cheap to run as any one of them, and often better than each on data
    none was tuned for. Every directory must hold the same family and config; integer buffers (batch
    norm's step counts) are taken from the first."""
    directories = [Path(d) for d in directories]
    if len(directories) < 2:
        raise MusefmError(f"average_pretrained: needs at least two models, got {len(directories)}")
    first, first_data = load_pretrained(directories[0], map_location)
    total = {name: tensor.detach().clone().double() for name, tensor in first.state_dict().items()
             if tensor.is_floating_point()}
    for directory in directories[1:]:
        model, data = load_pretrained(directory, map_location)
        if (data["family"], data["config"]) != (first_data["family"], first_data["config"]):
            raise MusefmError(f"{directory}: a different model from {directories[0]} "
                              "(family or config differ), so their weights cannot be averaged")
        for name, tensor in model.state_dict().items():
            if name in total:
                total[name] += tensor.double()
    state = first.state_dict()
    first.load_state_dict({name: (total[name] / len(directories)).to(state[name].dtype) if name in total
                           else state[name] for name in state})
    return first

