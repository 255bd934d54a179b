"""``musefm train-transcriber``: train the Onsets-and-Frames style transcriber on paired audio.

    musefm data build --render --source music21:bach --soundfonts timgm6mb,musescore --out data/bach-audio
    musefm train-transcriber --data data/bach-audio --preset small --out runs/transcriber
    torchrun --nproc-per-node 2 -m musefm train-transcriber ...          # same code, DDP

The run directory is the same as pretraining's (checkpoints/, best/, metrics.jsonl, loss curve;
``--resume`` continues exactly). At the end the best model transcribes the validation split (or the
test split with ``final_split=test``) and the note/frame F1 scores are written to ``eval.json``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from musefm.audio.augment import AudioAugmentConfig
from musefm.config import to_dict
from musefm.errors import MusefmError
from musefm.recipes.pretrain import load_recipe_config, open_run
from musefm.training.trainer import TrainConfig


# Settings a fine-tune (init_from) may change: each grows the model so it starts out transcribing as before.
GROWABLE = {"onset_stack", "d_model", "rnn_hidden", "harmonics"}


@dataclass
class TranscriberTrainConfig:
    preset: str = "small"
    model_settings: dict = field(default_factory=dict)  # overrides of TranscriberConfig fields
    init_from: str = ""  # start from this model's weights and config (fine-tuning; e.g. "shipped")
    data: str = ""
    out: str = ""
    segment_seconds: float = 5.0
    augment: AudioAugmentConfig = field(default_factory=AudioAugmentConfig)
    use_augment: bool = True
    # Loss weight of the onset and frame labels of notes a louder note's partials mask (a soft note an
    # octave or twelfth above a loud one: labels.harmonically_masked); 1 weighs every note alike. It
    # trades: 3 found more of them on an unfamiliar piano (recall 0.715 -> 0.760) and fewer repeated
    # notes, for note F1 -0.002 on validation; the shipped model used 1.7 (its model card, stages 11-13).
    masked_note_weight: float = 1.0
    final_split: str = "valid"  # transcribed and scored with mir_eval after training ("" = skip)
    final_limit: int = 0  # at most this many files in the final tuning and scoring (0: all)
    tune_decoding: bool = True  # choose onset/frame thresholds on the validation split (decode.json)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=6e-4, weight_decay=0.0, warmup_steps=200,
                                                                   batch_size=8, max_steps=5000, eval_every=500,
                                                                   save_every=500, eval_batches=20, loader_threads=2))

    def validate(self) -> None:
        if self.segment_seconds <= 0.5:
            raise MusefmError(f"segment_seconds: must exceed 0.5, got {self.segment_seconds}")
        if self.init_from and set(self.model_settings) - GROWABLE:
            raise MusefmError("init_from: the model keeps its own config; of model_settings only onset_stack "
                              "(grow an onset conv stack copied from the shared one), d_model and rnn_hidden "
                              "(widen it: Transcriber.widened) and harmonics (Transcriber.with_harmonics) can be given")
        if self.masked_note_weight <= 0:
            raise MusefmError(f"masked_note_weight: must be positive, got {self.masked_note_weight}")
        if self.final_split not in ("", "train", "valid", "test"):
            raise MusefmError(f"final_split: must be train, valid, test or empty, got {self.final_split!r}")
        self.train.validate()


def main(config: TranscriberTrainConfig, resume: bool = False, overwrite: bool = False, stream=None) -> dict:
    from musefm.data.audio_dataset import TranscriptionWindows, open_audio_datasets
    from musefm.models.transcriber import Transcriber, config_from_preset
    from musefm.training import checkpoint as ckpt
    from musefm.training.distributed import init_distributed, shutdown
    from musefm.training.seed import seed_everything
    from musefm.training.trainer import Trainer
    from musefm.transcription.transcribe import load_transcriber

    stream = stream or sys.stderr
    config, out = open_run(config, resume, overwrite)
    config.validate()
    if not config.data:
        raise MusefmError("no dataset given (--data DIR, built with musefm data build --render)")
    dataset = open_audio_datasets(config.data)  # "a,b": several builds as one (e.g. more soundfonts)
    if not dataset.split("train"):
        raise MusefmError(f"{config.data}: the dataset has no training examples")
    if config.init_from:  # fine-tuning: the starting model's own config (its weights are loaded below)
        start = load_transcriber(None if config.init_from == "shipped" else config.init_from)
        if config.model_settings.get("onset_stack") and not start.config.onset_stack:
            start = start.with_onset_stack()
        widths = {key: config.model_settings[key] for key in ("d_model", "rnn_hidden") if key in config.model_settings}
        if widths:
            start = start.widened(**widths, seed=config.train.seed)
        if config.model_settings.get("harmonics") and not start.config.harmonics:
            start = start.with_harmonics(config.model_settings["harmonics"])
        model_config = start.config
    else:
        model_config = config_from_preset(config.preset, **config.model_settings)
    checkpoint = ckpt.latest_checkpoint(out) if resume else None

    context = init_distributed(config.train.device)
    try:
        if context.is_main and overwrite and out.exists():
            shutil.rmtree(out)
        seed_everything(config.train.seed)
        model = Transcriber(model_config)
        if config.init_from:
            model.load_state_dict(start.state_dict())
        window = dict(segment_seconds=config.segment_seconds, sample_rate=model_config.sample_rate,
                      hop_length=model_config.hop_length)
        train_data = TranscriptionWindows(dataset, "train", augment=config.augment if config.use_augment else None,
                                          seed=config.train.seed, masked_note_weight=config.masked_note_weight, **window)
        valid_data = (TranscriptionWindows(dataset, "valid", jitter=False, **window) if dataset.split("valid") else None)
        if context.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if config.init_from and not (out / "start").exists():
                # The grown starting point, for averaging the fine-tune back toward it (average_weights.py).
                start.save_pretrained(out / "start")
            run = {"config": to_dict(config), "model_config": dataclasses.asdict(model_config),
                   "dataset": dataset.info.get("parts", str(dataset.root)), "parameters": model.num_parameters()}
            (out / "run.json").write_text(json.dumps(run, indent=2))
            hours = sum(row["seconds"] for row in dataset.split("train")) / 3600
            print(f"transcriber ({config.preset}): {model.num_parameters():,} parameters, {len(train_data):,} training "
                  f"windows of {config.segment_seconds:g} s ({hours:.2f} h), {context.world_size} process(es) on "
                  f"{context.device}", file=stream)
        trainer = Trainer(model, train_data, valid_data, config.train, out, None, context, stream)
        if checkpoint is not None:
            trainer.resume(checkpoint)
        summary = trainer.fit()
        best = out / "best" if (out / "best").exists() else ckpt.latest_checkpoint(out)
        if context.is_main and config.tune_decoding and dataset.split("valid"):
            summary["decode"] = tune_split(best, dataset, "valid", limit=config.final_limit, stream=stream)
        if context.is_main and config.final_split and dataset.split(config.final_split):
            summary["final"] = score_split(best, dataset, config.final_split, out / f"eval-{config.final_split}",
                                           limit=config.final_limit, stream=stream)
            (out / "eval.json").write_text(json.dumps(summary["final"], indent=2))
    finally:
        shutdown(context)
    return summary


def tune_split(model_dir: Path, dataset, split: str, limit: int = 0, stream=None, extra=()) -> dict:
    """Choose the decoding thresholds on ``split`` (and ``extra`` examples, (audio path, notes) pairs
    such as the split's pieces in other timbres) and save them beside the model (decode.json)."""
    from dataclasses import asdict

    from musefm.transcription.postprocess import read_notes_csv
    from musefm.transcription.transcribe import load_transcriber, tune_decoding, write_decode_config

    rows = dataset.split(split)[: limit or None]
    examples = [(dataset.path(row["audio"]), read_notes_csv(dataset.path(row["notes"]))) for row in rows]
    decode, scores = tune_decoding(load_transcriber(model_dir), examples + list(extra))
    write_decode_config(model_dir, decode)
    if stream is not None:
        also = f" and {len(extra)} more" if extra else ""
        print(f"decoding thresholds chosen on {split} ({len(rows)} files{also}): onset {decode.onset_threshold}, "
              f"frame {decode.frame_threshold}, frame-supported onsets {decode.frame_onset_threshold} "
              f"(note F1 {scores['note_f1']:.3f})", file=stream)
    return asdict(decode) | scores


def unseen_timbre_examples(dataset, soundfonts, programs, work: Path) -> dict[str, list]:
    """The validation pieces of ``dataset`` (one render per piece) played by other General MIDI
    programs of ``soundfonts``: {"<soundfont>-program<n>": [(audio path, reference notes), ...]}.
    Renders are written under ``work`` (one folder per group) and reused when they exist."""
    from musefm.audio.render import RenderJob, render_batch
    from musefm.transcription.postprocess import read_notes_csv

    pieces = {row["piece"]: row for row in dataset.split("valid")}.values()
    groups, jobs = {}, []
    for soundfont in soundfonts:
        for program in programs:
            name = f"{soundfont}-program{program}"
            for row in pieces:
                wav = Path(work) / name / (Path(row["midi"]).stem + ".wav")
                if not wav.exists():
                    jobs.append(RenderJob(dataset.path(row["midi"]), wav, soundfont, program))
                groups.setdefault(name, []).append((wav, read_notes_csv(dataset.path(row["notes"]))))
    problems = [problem for problem in render_batch(jobs, sample_rate=16000) if problem]
    if problems:
        raise MusefmError(f"rendering the unseen-timbre validation audio: {problems[0]}")
    return groups


def score_split(model_dir: Path, dataset, split: str, out: Path, limit: int = 0, stream=None) -> dict:
    """Transcribe a split's audio with a saved model and score it against its notes (mir_eval)."""
    from musefm.evaluation.transcription import score_notes
    from musefm.transcription.postprocess import read_notes_csv
    from musefm.transcription.transcribe import load_transcriber, transcribe_file

    model = load_transcriber(model_dir)
    rows = dataset.split(split)[: limit or None]
    per_file = []
    for row in rows:
        result = transcribe_file(model, dataset.path(row["audio"]))
        scores = score_notes(read_notes_csv(dataset.path(row["notes"])), result.notes)
        per_file.append({"id": row["id"], **scores})
    keys = [key for key in per_file[0] if key.endswith(("_f1", "_precision", "_recall"))] if per_file else []
    overall = {key: sum(row[key] for row in per_file) / len(per_file) for key in keys}
    out.mkdir(parents=True, exist_ok=True)
    (out / "scores.json").write_text(json.dumps({"overall": overall, "files": per_file}, indent=2))
    if stream is not None and overall:
        print(f"{split} split ({len(per_file)} files): note F1 {overall.get('note_f1', 0):.3f}, with offsets "
              f"{overall.get('note_offset_f1', 0):.3f}, frame F1 {overall.get('frame_f1', 0):.3f}", file=stream)
    return {"split": split, "files": len(per_file), **overall}


def load_config(path: str | None, overrides: dict, extra: list[str]) -> TranscriberTrainConfig:
    """Shipped or user YAML (``--config``), then CLI flags, then key=value pairs."""
    return load_recipe_config(TranscriberTrainConfig, path, overrides, extra)
