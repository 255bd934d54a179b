"""``musefm pretrain``: self-supervised pretraining of a model family on a built dataset.

    musefm pretrain --model music-lm --data data/bach --preset small --out runs/lm [key=value ...]
    torchrun --nproc-per-node 2 -m musefm pretrain ...        # same code, DDP

Everything is checked before any work starts: the config (unknown keys, bad values), the dataset
(built, with the tokenizer the family needs), and the output directory (a new run, ``--resume``
of the same run, or ``--overwrite``).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from musefm.config import from_dict, to_dict
from musefm.data.augment import AugmentConfig
from musefm.errors import MusefmError
from musefm.models.base import family_class
from musefm.training.trainer import TrainConfig

CONFIG_DIR = Path(__file__).parent / "configs"
FAMILY_MODULES = {"music-lm": "musefm.models.music_lm", "music-bert": "musefm.models.music_bert"}


@dataclass
class PretrainConfig:
    model: Literal["music-lm", "music-bert"] = "music-lm"
    preset: str = "small"
    model_settings: dict = field(default_factory=dict)  # overrides of the family's config fields
    data: str = ""
    out: str = ""
    seq_len: int = 0  # training window; 0 = the model's max_seq_len
    window: Literal["random", "bar"] = "random"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        if self.seq_len < 0:
            raise MusefmError("seq_len must be >= 0")
        self.augment.validate()
        self.train.validate()


def family_module(name: str):
    return importlib.import_module(FAMILY_MODULES[name])


def model_config_for(config: PretrainConfig, tokenizer):
    """The family's config from its preset, the tokenizer's vocabulary and the user's settings."""
    module = family_module(config.model)
    if config.preset not in module.PRESETS:
        raise MusefmError(f"unknown preset {config.preset!r} for {config.model} (known: {', '.join(module.PRESETS)})")
    if config.model == "music-lm":
        if tokenizer.is_multi_voc:
            raise MusefmError("music-lm needs a single-stream tokenizer (remi or tsd); this dataset uses octuple")
        vocabulary = {"vocab_size": len(tokenizer)}
    else:
        if not tokenizer.is_multi_voc:
            raise MusefmError("music-bert needs an octuple dataset (musefm data build --tokenizer octuple)")
        from musefm.models.music_bert import octuple_fields

        names, sizes = octuple_fields(tokenizer)
        vocabulary = {"field_names": names, "field_vocab_sizes": sizes}
    settings = {**vocabulary, **config.model_settings}
    known = {f.name for f in dataclasses.fields(module.PRESETS[config.preset].__class__)}
    unknown = sorted(set(config.model_settings) - known)
    if unknown:
        raise MusefmError(f"unknown config key model_settings.{unknown[0]} for {config.model} (known: {', '.join(sorted(known))})")
    return module.config_from_preset(config.preset, **settings)


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> dict | None:
    """Check the run directory; returns the saved config when resuming."""
    run_file = out / "run.json"
    if resume and overwrite:
        raise MusefmError("use either --resume or --overwrite, not both")
    if resume:
        if not run_file.exists():
            raise MusefmError(f"{out}: no run to resume (no run.json)")
        return json.loads(run_file.read_text())
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            what = "holds another run" if run_file.exists() else "is not empty"
            raise MusefmError(f"{out}: {what}; use --resume to continue it or --overwrite to replace it")
    return None


def open_run(config, resume: bool, overwrite: bool):
    """The run's config and directory: ``--resume`` takes the config saved in run.json (the
    command line's is ignored), a new run checks the directory is free (or ``--overwrite``)."""
    if not config.out:
        raise MusefmError("no run directory given (--out DIR)")
    out = Path(config.out)
    saved = prepare_run_dir(out, resume, overwrite)
    if saved is not None:
        config = from_dict(type(config), saved["config"])
    return config, out


def main(config: PretrainConfig, resume: bool = False, overwrite: bool = False, stream=None) -> dict:
    """Train; returns the trainer's summary (rank 0 prints where everything is)."""
    from musefm.data.dataset import TokenDataset, open_dataset
    from musefm.data.tokenize import load_tokenizer, tokenizer_fingerprint
    from musefm.training import checkpoint as ckpt
    from musefm.training.distributed import init_distributed, shutdown
    from musefm.training.seed import seed_everything
    from musefm.training.trainer import Trainer

    stream = stream or sys.stderr
    config, out = open_run(config, resume, overwrite)
    if not config.data:
        raise MusefmError("no dataset given (--data DIR, built with musefm data build)")
    dataset = open_dataset(config.data)
    tokenizer = dataset.tokenizer
    model_config = model_config_for(config, tokenizer)
    if resume:
        run_tokenizer = load_tokenizer(out / "tokenizer.json")
        if tokenizer_fingerprint(run_tokenizer) != tokenizer_fingerprint(tokenizer):
            raise MusefmError(f"{out}: the run's tokenizer differs from the dataset's ({config.data})")
    checkpoint = ckpt.latest_checkpoint(out) if resume else None

    context = init_distributed(config.train.device)
    try:
        if context.is_main and overwrite and out.exists():
            shutil.rmtree(out)
        seed_everything(config.train.seed)
        model = family_class(config.model)(model_config)
        seq_len = config.seq_len or model_config.max_seq_len
        # With Transformer-XL memory a piece is trained on segment after segment, in order.
        window = "segments" if getattr(model_config, "memory_len", 0) > 0 else config.window
        train_data = TokenDataset(dataset, "train", seq_len=seq_len, window=window, augment=config.augment,
                                  seed=config.train.seed)
        valid_data = TokenDataset(dataset, "valid", seq_len=seq_len, window="sequential") if dataset.rows("valid") else None
        if context.is_main:
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dataset.root / "tokenizer.json", out / "tokenizer.json")
            run = {"config": to_dict(config), "model_config": dataclasses.asdict(model_config),
                   "dataset": str(dataset.root), "parameters": sum(p.numel() for p in model.parameters())}
            (out / "run.json").write_text(json.dumps(run, indent=2))
        trainer = Trainer(model, train_data, valid_data, config.train, out, out / "tokenizer.json", context, stream)
        if checkpoint is not None:
            trainer.resume(checkpoint)
        if context.is_main:
            print(f"{config.model} ({config.preset}): {run['parameters']:,} parameters, {len(train_data):,} training "
                  f"windows of {seq_len} tokens, {context.world_size} process(es) on {context.device}", file=stream)
        summary = trainer.fit()
    finally:
        shutdown(context)
    return summary


def load_recipe_config(config_class, path: str | None, flags: dict, extra: list[str]):
    """A recipe's config: a shipped (by name) or user YAML file (``--config``), then the command's
    flags (None = not given), then ``key=value`` overrides."""
    from musefm.config import apply_overrides, load_yaml

    if path:
        candidate = Path(path)
        if not candidate.exists() and (CONFIG_DIR / f"{path}.yaml").exists():
            candidate = CONFIG_DIR / f"{path}.yaml"
        config = load_yaml(config_class, candidate)
    else:
        config = config_class()
    data = to_dict(config)
    data.update({key: value for key, value in flags.items() if value is not None})
    return apply_overrides(from_dict(config_class, data), extra)


def load_config(path: str | None, model: str | None, overrides: dict, extra: list[str]) -> PretrainConfig:
    """Build the config: shipped or user YAML (``--config``), then CLI flags, then key=value pairs."""
    return load_recipe_config(PretrainConfig, path, {**overrides, "model": model}, extra)
