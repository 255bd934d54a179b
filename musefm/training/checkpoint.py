"""Checkpoint directories: written atomically, loaded without unpickling, resumed exactly.

A run directory holds::

    run.json                       the recipe's full config (what to rebuild on --resume)
    checkpoints/step-00000100/     config.json, model.safetensors, tokenizer.json, train_state.pt
    checkpoints/latest             name of the newest complete checkpoint
    best/                          the model with the best validation loss (config, weights, tokenizer)

``train_state.pt`` holds the optimizer state, RNG states, step and data position as tensors and
plain containers only, and is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from musefm.errors import MusefmError
from musefm.atomic import atomic_directory, write_text_atomic

CHECKPOINTS = "checkpoints"


def save_checkpoint(run_dir: Path, step: int, model, tokenizer_path: Path | None, train_state: dict, keep_last: int) -> Path:
    """Write checkpoint ``step`` and point ``latest`` at it; keep only the newest ``keep_last``."""
    folder = Path(run_dir) / CHECKPOINTS
    final = folder / f"step-{step:08d}"
    with atomic_directory(final) as temporary:
        model.write_files(temporary)
        if tokenizer_path is not None:  # audio models carry their feature settings in config.json
            shutil.copyfile(tokenizer_path, temporary / "tokenizer.json")
        torch.save(train_state, temporary / "train_state.pt")
    write_text_atomic(folder / "latest", final.name)
    for old in sorted(p for p in folder.glob("step-*") if p.is_dir())[:-max(1, keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_best(run_dir: Path, model, tokenizer_path: Path | None, metrics: dict) -> Path:
    final = Path(run_dir) / "best"
    with atomic_directory(final) as temporary:
        model.write_files(temporary)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, temporary / "tokenizer.json")
        (temporary / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    folder = Path(run_dir) / CHECKPOINTS
    pointer = folder / "latest"
    if pointer.exists():
        candidate = folder / pointer.read_text().strip()
        if (candidate / "train_state.pt").exists():
            return candidate
    complete = sorted(p for p in folder.glob("step-*") if (p / "train_state.pt").exists())
    return complete[-1] if complete else None


def load_train_state(checkpoint: Path, map_location="cpu") -> dict:
    path = Path(checkpoint) / "train_state.pt"
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise MusefmError(f"{path}: cannot read the training state ({type(error).__name__}: {error})") from None


def resolve_model_dir(path) -> Path:
    """A model directory from a run directory (its best model, else its latest checkpoint) or itself."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "best" / "config.json").is_file():
        return path / "best"
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    raise MusefmError(f"{path}: not a model or training run (no config.json, best/ or checkpoints/)")
