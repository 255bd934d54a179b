"""``musefm data build --render``: sources -> paired audio + aligned notes (transcription data).

    musefm data build --render --source music21:bach --soundfonts timgm6mb,musescore \\
        --test-soundfonts fluidr3 --out data/bach-audio
    musefm data build --render --source maestro:/data/maestro-v3.0.0 --out data/maestro

Symbolic pieces are played as piano (every part on program 0, drums dropped, velocities given a
per-piece dynamic level and per-note variation, so the velocity head has something to learn) and
rendered with FluidSynth once per soundfont; the notes are read back from the MIDI that was rendered,
with the sustain pedal applied, so audio and labels agree by construction. MAESTRO rows keep their
own recordings, MIDI and split. ``test_soundfonts`` renders the test split with soundfonts never used
for training, for an honest held-out timbre.

Layout::

    dataset.json        format, settings, status and totals
    audio/STEM.flac     mono audio at ``sample_rate`` (rendered pieces; MAESTRO audio stays in place)
    midi/STEM.mid       the performance that was rendered (the reference for ``evaluate transcription``)
    notes/STEM.csv      onset,offset,pitch,velocity in seconds (sustain applied)
    manifest.jsonl      one line per example: id, piece, soundfont, split, paths, seconds, notes
    progress.jsonl      one line per finished source file (resume skips them)
    rejected.jsonl, card.md
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from musefm.atomic import write_text_atomic
from musefm.data import corpus
from musefm.data.build import SPLITS, note_fingerprint, prepare_output, read_jsonl, select_items, split_of
from musefm.data.convert import default_cache_dir
from musefm.errors import BadInputError, MusefmError
from musefm.progress import Progress

FORMAT = "musefm-audio-dataset"
FORMAT_VERSION = 1


@dataclass
class AudioBuildConfig:
    sources: list[str] = field(default_factory=list)
    out: str = ""
    soundfonts: list[str] = field(default_factory=lambda: ["timgm6mb"])  # names or .sf2/.sf3/.sfz/.cfg paths
    test_soundfonts: list[str] = field(default_factory=list)  # test split only (empty: same as soundfonts)
    sample_rate: int = 16000
    piano: bool = True  # play every part on the piano (program 0); False keeps the score's programs
    dynamics: tuple[int, int] = (45, 105)  # per-piece base velocity range
    velocity_spread: float = 10.0  # per-note standard deviation around the piece's level
    max_seconds: float = 0.0  # cut pieces longer than this (0: whole pieces)
    valid_fraction: float = 0.05
    test_fraction: float = 0.05
    limit: int = 0
    workers: int = 0
    seed: int = 0
    cache_dir: str | None = None

    def validate(self) -> None:
        from musefm.audio.render import soundfont_path

        if not self.sources:
            raise MusefmError("no source given (e.g. --source music21:bach)")
        if not self.out:
            raise MusefmError("no output directory given (--out)")
        if not self.soundfonts:
            raise MusefmError("soundfonts: name at least one (e.g. timgm6mb)")
        for font in list(self.soundfonts) + list(self.test_soundfonts):
            soundfont_path(font)  # a missing soundfont fails before any work
        if not 8000 <= self.sample_rate <= 48000:
            raise MusefmError(f"sample_rate: must be in 8000..48000, got {self.sample_rate}")
        low, high = self.dynamics
        if not 1 <= low <= high <= 127:
            raise MusefmError(f"dynamics: need 1 <= low <= high <= 127, got {self.dynamics}")
        if not (0 <= self.valid_fraction < 1 and 0 <= self.test_fraction < 1 and self.valid_fraction + self.test_fraction < 1):
            raise MusefmError("valid_fraction and test_fraction must be in [0, 1) and leave pieces for training")
        if self.max_seconds < 0 or self.limit < 0 or self.workers < 0:
            raise MusefmError("max_seconds, limit and workers must be >= 0")

    def identity(self) -> dict:
        data = asdict(self)
        for name in ("out", "workers", "cache_dir"):
            data.pop(name)
        data["dynamics"] = list(self.dynamics)
        return data


def example_stem(example_id: str) -> str:
    """A file-system-safe, unique stem for an example id (ids hold ':', '/', '#', '@')."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", example_id)[-60:].strip("_")
    return f"{slug}-{hashlib.sha1(example_id.encode()).hexdigest()[:8]}"


def piano_performance(score, rng: np.random.Generator, dynamics: tuple[int, int], spread: float, piano: bool):
    """The score as it will be played: one piano track (unless ``piano`` is off), no drums, and
    velocities around a per-piece level so dynamics vary across the data."""
    from symusic import Score, Track

    level = rng.uniform(*dynamics)
    played = Score(score.ticks_per_quarter)
    played.tempos = score.tempos.copy()
    played.time_signatures = score.time_signatures.copy()
    tracks = [track for track in score.tracks if not track.is_drum]
    if piano:
        merged = Track("piano", 0, False)
        for track in tracks:
            merged.notes.extend(track.notes)
            merged.pedals.extend(track.pedals)
            merged.controls.extend(track.controls)
        merged.notes.sort(key=lambda note: (note.time, note.pitch))
        tracks = [merged]
    for track in tracks:
        if len(track.notes) == 0:
            continue
        copy = track.copy()
        velocities = np.clip(np.round(level + rng.normal(0.0, spread, len(copy.notes))), 1, 127).astype(int)
        for note, velocity in zip(copy.notes, velocities):
            note.velocity = int(velocity)
        played.tracks.append(copy)
    return played


def cut_score(score, max_seconds: float):
    """The score up to ``max_seconds``: notes still sounding there are left out (audio and labels
    agree); 0 keeps it whole."""
    if max_seconds <= 0:
        return score
    seconds = score.to("second")
    if seconds.end() <= max_seconds:
        return score
    # Convert the cut time back to ticks through the tempo map by clipping in seconds.
    clipped = seconds.clip(0, max_seconds, clip_end=True)
    return clipped.to("tick")


# --------------------------------------------------------------------------------------------
# Worker side: one source file -> its examples (rendered) and rejections
# --------------------------------------------------------------------------------------------

_state: dict = {}


def _init_worker(config: dict, out: str) -> None:
    _state["config"] = AudioBuildConfig(**config)
    _state["out"] = Path(out)


def _render_example(piece_score, example_id: str, font: str, config: AudioBuildConfig, out: Path) -> dict:
    from musefm.audio.io import load_audio, save_audio
    from musefm.audio.render import render_midi
    from musefm.transcription.labels import notes_from_midi
    from musefm.transcription.postprocess import write_notes_csv

    stem = example_stem(example_id)
    midi_path, audio_path, notes_path = out / "midi" / f"{stem}.mid", out / "audio" / f"{stem}.flac", out / "notes" / f"{stem}.csv"
    midi_path.parent.mkdir(parents=True, exist_ok=True)
    temporary_midi = midi_path.with_name(f".{stem}.tmp.mid")
    piece_score.dump_midi(str(temporary_midi))
    os.replace(temporary_midi, midi_path)
    notes = notes_from_midi(midi_path)
    with tempfile.TemporaryDirectory(prefix="musefm-render-") as folder:
        wav = render_midi(midi_path, Path(folder) / "render.wav", font, config.sample_rate)
        audio, _ = load_audio(wav, sample_rate=config.sample_rate, mono=True)
    audio_path.parent.mkdir(parents=True, exist_ok=True)
    save_audio(audio_path, audio, config.sample_rate)
    write_notes_csv(notes, notes_path)
    return {"audio": f"audio/{stem}.flac", "midi": f"midi/{stem}.mid", "notes": f"notes/{stem}.csv",
            "seconds": round(len(audio) / config.sample_rate, 3), "note_count": int(len(notes))}


def process_item(item: corpus.SourceItem) -> tuple[str, list[dict], list[dict]]:
    from musefm.audio.render import soundfont_name

    config, out = _state["config"], _state["out"]
    rows, rejected = [], []
    try:
        results = corpus.load_item(item, Path(config.cache_dir) if config.cache_dir else None)
    except Exception as error:  # a reader bug must not stop the batch
        results = [corpus.Rejection(item.path, f"unexpected error {type(error).__name__}: {error}", item.source)]
    for result in results:
        if isinstance(result, corpus.Rejection):
            rejected.append(result.to_dict())
            continue
        meta = result.meta
        split = meta.split or split_of(note_fingerprint(result.score), config.valid_fraction, config.test_fraction)
        base = {"piece": meta.id, "split": split, "collection": meta.collection, "composer": meta.composer,
                "title": meta.title, "license": meta.license}
        try:
            if meta.audio_path:  # a recording with its MIDI (MAESTRO): the pair as it is
                rows.append(_recorded_example(meta, base, config))
                continue
            fonts = config.test_soundfonts if split == "test" and config.test_soundfonts else config.soundfonts
            seed = int(hashlib.sha1(f"{config.seed}:{meta.id}".encode()).hexdigest()[:8], 16)
            performance = piano_performance(cut_score(result.score, config.max_seconds), np.random.default_rng(seed),
                                            tuple(config.dynamics), config.velocity_spread, config.piano)
            if performance.note_num() == 0:
                raise BadInputError(meta.path, "no pitched notes to render")
            for font in fonts:
                example_id = f"{meta.id}@{soundfont_name(font)}"
                rows.append(dict(base, id=example_id, soundfont=soundfont_name(font),
                                 **_render_example(performance, example_id, font, config, out)))
        except BadInputError as error:
            rejected.append(corpus.Rejection(meta.path, error.reason, item.source).to_dict())
        except Exception as error:
            rejected.append(corpus.Rejection(meta.path, f"unexpected error {type(error).__name__}: {error}", item.source).to_dict())
    return item.key, rows, rejected


def _recorded_example(meta, base: dict, config: AudioBuildConfig) -> dict:
    from musefm.audio.io import audio_info
    from musefm.transcription.labels import notes_from_midi
    from musefm.transcription.postprocess import write_notes_csv

    audio = Path(meta.audio_path)
    info = audio_info(audio)  # an unreadable recording is rejected here, not during training
    notes = notes_from_midi(meta.path)
    stem = example_stem(meta.id)
    write_notes_csv(notes, _state["out"] / "notes" / f"{stem}.csv")
    return dict(base, id=meta.id, soundfont="recording", audio=str(audio.resolve()), midi=str(Path(meta.path).resolve()),
                notes=f"notes/{stem}.csv", seconds=round(info.duration_seconds, 3), note_count=int(len(notes)))


# --------------------------------------------------------------------------------------------
# Main side
# --------------------------------------------------------------------------------------------


@dataclass
class AudioBuildSummary:
    out: Path
    examples: int
    rejected: int
    hours: dict
    seconds: float
    resumed_files: int = 0

    def line(self) -> str:
        hours = ", ".join(f"{name} {value:.2f} h" for name, value in self.hours.items())
        resumed = f"; {self.resumed_files} files already done" if self.resumed_files else ""
        return (f"{self.out}: {self.examples} audio examples ({hours}), rejected {self.rejected} "
                f"(see rejected.jsonl) in {self.seconds:.1f}s{resumed}")


def build_audio_dataset(config: AudioBuildConfig, overwrite: bool = False, stream=None) -> AudioBuildSummary:
    """Build (or resume) a paired audio dataset; returns what was made and rejected."""
    config.validate()
    stream = stream or sys.stderr
    started = time.monotonic()
    out = Path(config.out)
    items = select_items(config.sources, config.limit)
    prepare_output(out, config.identity(), overwrite)
    progress_path = out / "progress.jsonl"
    done = {row["item"] for row in read_jsonl(progress_path)} if progress_path.exists() else set()
    pending = [item for item in items if item.key not in done]
    info = {"format": FORMAT, "version": FORMAT_VERSION, "identity": config.identity(), "status": "building"}
    write_text_atomic(out / "dataset.json", json.dumps(info, indent=2))
    if config.cache_dir is None:
        config.cache_dir = str(default_cache_dir())
    workers = min(config.workers or os.cpu_count() or 1, max(1, len(pending)))
    examples = failed = 0
    with open(progress_path, "a", encoding="utf-8") as log, Progress(len(pending), "audio build", stream=stream) as bar:
        def consume(results):
            nonlocal examples, failed
            for key, rows, rejected in results:
                # One line per finished file: a stopped build resumes after the last one written.
                log.write(json.dumps({"item": key, "rows": rows, "rejected": rejected}) + "\n")
                log.flush()
                examples, failed = examples + len(rows), failed + len(rejected)
                bar.update(1, examples=examples, rejected=failed)

        init_args = (asdict(config), str(out))
        if workers <= 1:
            _init_worker(*init_args)
            consume(process_item(item) for item in pending)
        else:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with multiprocessing.get_context(method).Pool(workers, _init_worker, init_args) as pool:
                consume(pool.imap(process_item, pending, chunksize=1))
    return _finalize(out, config, info, len(done), started)


def _finalize(out: Path, config: AudioBuildConfig, info: dict, resumed: int, started: float) -> AudioBuildSummary:
    records = read_jsonl(out / "progress.jsonl")
    rows = [row for record in records for row in record["rows"]]
    rejected = [row for record in records for row in record["rejected"]]
    with_reason = "\n".join(json.dumps(row) for row in rejected)
    write_text_atomic(out / "rejected.jsonl", with_reason + ("\n" if rejected else ""))
    if not rows:
        reasons = sorted({row["reason"] for row in rejected})
        detail = f": {reasons[0]}" if len(reasons) == 1 else f" ({len(rejected)} files rejected, see {out / 'rejected.jsonl'})"
        raise MusefmError(f"nothing could be rendered from {', '.join(config.sources)}{detail}")
    write_text_atomic(out / "manifest.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    hours = {name: round(sum(r["seconds"] for r in rows if r["split"] == name) / 3600, 4) for name in SPLITS}
    write_text_atomic(out / "card.md", audio_card(rows, rejected, config))
    info.update(status="complete", examples=len(rows), rejected=len(rejected), hours=hours,
                splits={name: sum(r["split"] == name for r in rows) for name in SPLITS})
    write_text_atomic(out / "dataset.json", json.dumps(info, indent=2))
    return AudioBuildSummary(out, len(rows), len(rejected), hours, time.monotonic() - started, resumed)


def audio_card(rows: list[dict], rejected: list[dict], config: AudioBuildConfig) -> str:
    """A short card: hours and notes per split and soundfont, pitch coverage, rejections."""
    lines = ["# Audio dataset card", "", f"Sources: {', '.join(config.sources)}. Sample rate {config.sample_rate} Hz.",
             "", "| split | soundfont | examples | hours | notes |", "|---|---|---|---|---|"]
    groups: dict = {}
    for row in rows:
        group = groups.setdefault((row["split"], row["soundfont"]), [0, 0.0, 0])
        group[0] += 1
        group[1] += row["seconds"]
        group[2] += row["note_count"]
    for (split, font), (count, seconds, notes) in sorted(groups.items()):
        lines.append(f"| {split} | {font} | {count} | {seconds / 3600:.2f} | {notes:,} |")
    lines += ["", f"Rejected files: {len(rejected)} (reasons in rejected.jsonl).", "",
              "Test examples use soundfonts never used for training when `test_soundfonts` is set: "
              f"{', '.join(config.test_soundfonts) or 'not set (test timbres were also trained on)'}."]
    return "\n".join(lines) + "\n"
