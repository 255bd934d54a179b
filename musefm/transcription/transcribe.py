"""Audio files in, notes out: ``musefm transcribe in.wav [more ...] -o out/``.

For each input: ``STEM.mid``, ``STEM.csv`` (onset,offset,pitch,velocity in seconds) and ``STEM.png``
(piano roll); ``--sonify`` adds ``STEM.sonified.wav`` (the MIDI rendered back with a soundfont).
A file that cannot be read is reported in ``rejected.jsonl`` and the batch goes on.

Audio is read in chunks and turned into log-mel frames as it streams in (``iter_log_mel``), the
network runs over overlapping windows of those frames as they arrive (``Transcriber.iter_activations``)
and the notes are decoded window by window (``NoteDecoder``), so memory does not depend on the
recording's length.
Without ``--model`` the small piano model shipped inside the package is used.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from musefm.errors import BadInputError, MusefmError

SHIPPED_MODEL = Path(__file__).parent / "models" / "piano-small"
# Decoding thresholds chosen on the validation split, saved beside a model's weights.
DECODE_FILE = "decode.json"


def load_transcriber(path: str | Path | None = None, device: str = "cpu"):
    """A saved transcriber (a model directory or a training run), or the shipped one."""
    from musefm.models.transcriber import Transcriber

    directory = Path(path) if path else SHIPPED_MODEL
    if path is None and not (directory / "model.safetensors").is_file():
        raise MusefmError(f"the shipped transcription model is missing from {directory} (reinstall musefm)")
    if (directory / "run.json").exists() and not (directory / "config.json").exists():
        directory = directory / "best"  # a training run: its best model
    model = Transcriber.from_pretrained(directory, map_location=device)
    model.eval()
    model.decode_config = read_decode_config(directory)
    return model


def read_decode_config(directory: Path):
    """The thresholds saved with a model (``decode.json``), else the Onsets-and-Frames defaults."""
    from musefm.transcription.postprocess import DecodeConfig

    path = Path(directory) / DECODE_FILE
    if not path.is_file():
        return DecodeConfig()
    try:
        return DecodeConfig(**json.loads(path.read_text()))
    except (ValueError, TypeError) as error:
        raise MusefmError(f"{path}: not a valid decoding config ({error})") from None


def write_decode_config(directory: Path, decode) -> None:
    from dataclasses import asdict

    from musefm.atomic import write_text_atomic

    write_text_atomic(Path(directory) / DECODE_FILE, json.dumps(asdict(decode), indent=2))


def tune_decoding(model, examples: list[tuple[Path, np.ndarray]], onset_grid=(0.3, 0.4, 0.5, 0.6),
                  frame_grid=(0.3, 0.4, 0.5), frame_onset_grid=(None, 0.05, 0.1, 0.15, 0.2)):
    """The onset, frame and frame-onset thresholds (every combination; a frame-onset threshold only
    below the onset one) with the best mean note F1 (ties: onset+offset F1, then the earlier, None
    first) on ``examples`` (audio path, reference notes): run on the validation split, never on the
    test split."""
    from musefm.audio.features import log_mel_for_file
    from musefm.evaluation.transcription import score_notes
    from musefm.transcription.postprocess import DecodeConfig, activations_to_notes

    heads = []
    for path, reference in examples:
        mel = log_mel_for_file(path, model.config.mel_config())
        with torch.inference_mode():
            heads.append((model.activations(torch.from_numpy(mel)), reference))

    def mean_scores(decode) -> tuple[float, float]:
        scores = [score_notes(reference, activations_to_notes(h["onset"], h["frame"], model.config.frame_rate,
                                                              velocity=h["velocity"], config=decode))
                  for h, reference in heads]
        return float(np.mean([s["note_f1"] for s in scores])), float(np.mean([s["note_offset_f1"] for s in scores]))

    candidates = [DecodeConfig(onset_threshold=onset, frame_threshold=frame, frame_onset_threshold=frame_onset)
                  for onset in onset_grid for frame in frame_grid for frame_onset in frame_onset_grid
                  if frame_onset is None or frame_onset < onset]
    best, best_key = DecodeConfig(), (-1.0, -1.0)
    for decode in candidates:
        if (key := mean_scores(decode)) > best_key:
            best, best_key = decode, key
    return best, {"note_f1": best_key[0], "note_offset_f1": best_key[1]}


@dataclass
class Transcription:
    notes: np.ndarray  # (N, 4) onset s, offset s, pitch, velocity
    audio_seconds: float
    seconds_taken: float


def transcribe_file(model, path: Path, decode=None, chunk_seconds: float = 60.0) -> Transcription:
    """Notes of one audio file. Raises BadInputError naming the file when it cannot be used.

    Audio, log-mel frames, activations and decoding all stream, so memory stays flat however long
    the recording is; the notes equal those of decoding the whole file's activations at once."""
    from musefm.audio.features import iter_log_mel
    from musefm.transcription.postprocess import NoteDecoder

    started = time.perf_counter()
    config = model.config
    decoder = NoteDecoder(config.frame_rate, decode or getattr(model, "decode_config", None))
    frames = 0
    mel_blocks = (torch.from_numpy(block) for block in iter_log_mel(path, config.mel_config(), chunk_seconds))
    with torch.inference_mode():
        for heads in model.iter_activations(mel_blocks):  # {head: (frames, 88)}
            decoder.push(heads["onset"], heads["frame"], velocity=heads["velocity"])
            frames += len(heads["onset"])
    audio_seconds = (frames - 1) * config.hop_length / config.sample_rate
    return Transcription(decoder.finish(), audio_seconds, time.perf_counter() - started)


def _unique_stems(paths: list[Path]) -> list[str]:
    """Output names: the file stems, made unique when two inputs share one (a/x.wav, b/x.wav)."""
    stems, seen = [], {}
    for path in paths:
        stem = path.stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def transcribe_paths(paths: list[Path], out: Path, model=None, sonify: bool = False, soundfont: str | None = None,
                     decode=None, stream=None) -> dict:
    """Transcribe many files into ``out``; returns a summary (done, rejected, seconds, real-time factor)."""
    from musefm.audio.render import render_midi
    from musefm.progress import Progress
    from musefm.transcription.postprocess import write_midi, write_notes_csv
    from musefm.viz.pianoroll import plot_notes

    model = model or load_transcriber()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done, rejected = [], []
    audio_seconds = taken = 0.0
    # One file needs no progress lines: its result (or its one-line error) is the whole output.
    with Progress(len(paths), "transcribe", stream=stream, quiet=len(paths) == 1) as bar:
        for path, stem in zip(paths, _unique_stems(paths)):
            try:
                result = transcribe_file(model, Path(path), decode)
                write_midi(result.notes, out / f"{stem}.mid")
                write_notes_csv(result.notes, out / f"{stem}.csv")
                plot_notes(result.notes, out / f"{stem}.png", title=f"{Path(path).name}: {len(result.notes)} notes")
                if sonify:
                    render_midi(out / f"{stem}.mid", out / f"{stem}.sonified.wav", soundfont, model.config.sample_rate)
                done.append({"input": str(path), "midi": f"{stem}.mid", "notes": int(len(result.notes)),
                             "audio_seconds": round(result.audio_seconds, 3), "seconds": round(result.seconds_taken, 3)})
                audio_seconds += result.audio_seconds
                taken += result.seconds_taken
            except BadInputError as error:
                rejected.append({"path": error.path, "reason": error.reason})
            bar.update(1, done=len(done), rejected=len(rejected))
    (out / "rejected.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rejected))
    (out / "transcriptions.json").write_text(json.dumps(done, indent=2))
    return {"done": done, "rejected": rejected, "audio_seconds": audio_seconds, "seconds": taken,
            "real_time_factor": taken / audio_seconds if audio_seconds else 0.0}
