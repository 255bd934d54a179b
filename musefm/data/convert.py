"""Reading one music file into symusic Scores: MIDI directly, notation formats through music21.

music21 parsing is slow (tens of ms to seconds a file), so every notation file is converted once
and cached on disk as MIDI plus a JSON of its metadata, keyed by a hash of the file's bytes and the
converter version: a second build over the same files does no music21 parsing at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
from symusic import KeySignature, Note, Score, Tempo, TimeSignature, Track

from musefm.atomic import write_text_atomic
from musefm.data.music import estimate_key, key_from_signature
from musefm.errors import BadInputError

# Bump when the conversion below changes: it invalidates every cached conversion.
CONVERTER_VERSION = "3"
TICKS_PER_QUARTER = 480
MIDI_SUFFIXES = {".mid", ".midi"}
NOTATION_SUFFIXES = {".mxl", ".musicxml", ".xml", ".krn", ".abc"}
SUPPORTED_SUFFIXES = MIDI_SUFFIXES | NOTATION_SUFFIXES

# Sanity limits: beyond them a file is rejected as corrupt rather than fed to a model.
MIN_QPM, MAX_QPM = 10.0, 1000.0
MAX_SECONDS = 3 * 3600.0


@dataclass
class TuneInfo:
    """What the notation file says about one tune (a file may hold many)."""

    index: int  # 1-based position in the file
    title: str | None = None
    composer: str | None = None
    key: str | None = None
    key_source: str | None = None  # "signature", "signature+profile" or "profile"
    time_signature: str | None = None
    license: str | None = None
    error: str | None = None  # set when this tune could not be converted
    extra: dict = field(default_factory=dict)


def default_cache_dir() -> Path:
    return Path(os.environ.get("MUSEFM_CACHE", Path.home() / ".cache" / "musefm"))


def _file_digest(path: Path) -> str:
    digest = hashlib.sha1(CONVERTER_VERSION.encode())
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_score(score: Score, path) -> Score:
    """Reject scores a model should never see: no notes, absurd tempos or lengths."""
    if score.note_num() == 0:
        raise BadInputError(path, "no notes")
    for tempo in score.tempos:
        if not MIN_QPM <= tempo.qpm <= MAX_QPM:
            raise BadInputError(path, f"absurd tempo {tempo.qpm:.4g} quarter notes per minute")
    seconds = score.to("second").end()
    if not np.isfinite(seconds) or seconds > MAX_SECONDS:
        raise BadInputError(path, f"absurd duration {seconds:.4g} s")
    return score


def read_midi(path: Path) -> Score:
    """A MIDI file as a symusic Score, or BadInputError naming what is wrong."""
    size = path.stat().st_size
    if size == 0:
        raise BadInputError(path, "empty file")
    try:
        score = Score(str(path))
    except Exception as error:  # symusic raises RuntimeError with its own wording
        raise BadInputError(path, f"not a readable MIDI file ({str(error).splitlines()[0]})") from None
    return check_score(score, path)


# --------------------------------------------------------------------------------------------
# music21 -> symusic
# --------------------------------------------------------------------------------------------


def _ticks(quarter_length) -> int:
    return int(round(float(Fraction(quarter_length)) * TICKS_PER_QUARTER))


def _merge_ties(flat, pickup: int) -> list[list[int]]:
    """Notes of a flattened part as [start, duration, pitch, velocity] ticks, tied notes merged.

    Does what music21's ``stripTies`` does for our purpose at a fraction of its cost (it deep-copies
    and re-sorts the whole stream, 90% of the conversion time of a large score).
    """
    notes: list[list[int]] = []
    open_ties: dict[int, int] = {}  # MIDI pitch -> index of the note its tie continues
    for element in flat.getElementsByClass(["Note", "Chord"]):
        duration = _ticks(element.quarterLength)
        if element.duration.isGrace or duration <= 0:
            continue
        start = _ticks(element.offset) + pickup
        velocity = element.volume.velocity
        velocity = max(1, min(127, int(velocity))) if velocity is not None else 80
        if element.isChord:
            components = [(note.pitch, note.tie or element.tie) for note in element.notes]
        else:
            components = [(element.pitch, element.tie)]
        for pitch, tie in components:
            midi_pitch = int(round(pitch.ps))
            if not 0 <= midi_pitch <= 127:
                raise ValueError(f"pitch {pitch.nameWithOctave} outside the MIDI range")
            tie_type = tie.type if tie is not None else None
            held = notes[open_ties[midi_pitch]] if midi_pitch in open_ties else None
            # A note continues a held tie when it says so, or when it starts where the held note
            # ends: encoders often omit the "stop" or write "start" for "continue" (as stripTies
            # allows too).
            if held is not None and (tie_type in ("continue", "stop") or held[0] + held[1] == start):
                held[1] = max(held[1], start + duration - held[0])
                if tie_type not in ("start", "continue"):
                    del open_ties[midi_pitch]
                continue
            notes.append([start, duration, midi_pitch, velocity])
            if tie_type in ("start", "continue"):
                open_ties[midi_pitch] = len(notes) - 1
            else:
                open_ties.pop(midi_pitch, None)
    return notes


def m21_to_score(m21_score) -> tuple[Score, TuneInfo]:
    """Convert a music21 Score (or Part) to a symusic Score and describe it.

    Ties are merged, grace notes dropped (they have no duration), and a pickup bar is padded so
    that bar lines in the Score fall where the notation has them.
    """
    from music21 import key as m21key
    from music21 import stream

    parts = list(m21_score.parts) if isinstance(m21_score, stream.Score) else [m21_score]
    parts = [part for part in parts if part.recurse().notes]
    score = Score(TICKS_PER_QUARTER)
    info = TuneInfo(index=1)
    if not parts:
        return score, info

    first_measure = parts[0].getElementsByClass("Measure").first()
    pickup = _ticks(first_measure.paddingLeft) if first_measure is not None else 0

    all_pitches, all_durations = [], []
    first_flat = None
    for part_number, part in enumerate(parts):
        instrument = part.getInstrument(returnDefault=True)
        program = instrument.midiProgram if instrument.midiProgram is not None else 0
        track = Track(name=part.partName or f"part {part_number + 1}", program=int(program), is_drum=False)
        flat = part.flatten()
        first_flat = first_flat if first_flat is not None else flat
        for start, duration, midi_pitch, velocity in _merge_ties(flat, pickup):
            track.notes.append(Note(start, duration, midi_pitch, velocity))
            all_pitches.append(midi_pitch)
            all_durations.append(duration)
        track.notes.sort()
        score.tracks.append(track)

        if part_number == 0:  # global events are read from the first part, as MIDI has them once
            for mark in flat.getElementsByClass("MetronomeMark"):
                qpm = mark.getQuarterBPM()
                if qpm:
                    score.tempos.append(Tempo(_ticks(mark.offset) + pickup, float(qpm)))
            for meter in flat.getElementsByClass("TimeSignature"):
                tick = _ticks(meter.offset) + pickup if meter.offset > 0 else 0
                score.time_signatures.append(TimeSignature(tick, meter.numerator, meter.denominator))
                info.time_signature = info.time_signature or meter.ratioString
            for signature in flat.getElementsByClass("KeySignature"):
                is_minor = isinstance(signature, m21key.Key) and signature.mode == "minor"
                tick = _ticks(signature.offset) + pickup if signature.offset > 0 else 0
                score.key_signatures.append(KeySignature(tick, int(signature.sharps), int(is_minor)))

    signatures = first_flat.getElementsByClass("KeySignature")
    first_signature = signatures.first()
    pitches, durations = np.array(all_pitches), np.array(all_durations, dtype=np.float64)
    if isinstance(first_signature, m21key.Key) and first_signature.mode in ("major", "minor"):
        info.key, info.key_source = key_from_signature(first_signature.sharps, first_signature.mode), "signature"
    elif first_signature is not None:
        info.key, info.key_source = estimate_key(pitches, durations, first_signature.sharps), "signature+profile"
    else:
        info.key, info.key_source = estimate_key(pitches, durations), "profile"

    metadata = m21_score.metadata
    if metadata is not None:
        # music21 fills in "Music21 Fragment" / "Music21" for scores that name nothing.
        title = metadata.title or metadata.movementName
        info.title = title if title and title != "Music21 Fragment" else None
        info.composer = metadata.composer if metadata.composer and metadata.composer != "Music21" else None
        copyright_text = metadata.copyright
        info.license = str(copyright_text) if copyright_text else None
    return score, info


def _parse_notation(path: Path):
    """Parse a notation file with music21 into a list of music21 scores (one per tune)."""
    from music21 import converter, stream

    parsed = converter.parse(str(path), forceSource=True)
    if isinstance(parsed, stream.Opus):
        return list(parsed.scores)
    return [parsed]


def convert_notation(path: Path) -> list[tuple[Score | None, TuneInfo]]:
    """Every tune of a notation file, converted; a tune that fails carries its error."""
    if path.stat().st_size == 0:
        raise BadInputError(path, "empty file")
    try:
        tunes = _parse_notation(path)
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BadInputError(path, f"music21 cannot parse it ({message[:200]})") from None
    results = []
    for index, tune in enumerate(tunes, start=1):
        try:
            score, info = m21_to_score(tune)
            info.index = index
            results.append((score, info))
        except Exception as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            results.append((None, TuneInfo(index=index, error=f"cannot convert ({message[:200]})")))
    if not results:
        raise BadInputError(path, "no music in file")
    return results


def load_notation_cached(path: Path, cache_dir: Path | None) -> list[tuple[Score | None, TuneInfo]]:
    """``convert_notation`` through the on-disk cache (MIDI bytes + metadata JSON per file)."""
    if cache_dir is None:
        return convert_notation(path)
    cache_dir = Path(cache_dir) / "notation"
    digest = _file_digest(path)
    entry = cache_dir / digest[:2] / f"{digest}.json"
    if entry.exists():
        record = json.loads(entry.read_text())
        if "error" in record:
            raise BadInputError(path, record["error"])
        results = []
        for tune in record["tunes"]:
            info = TuneInfo(**tune["info"])
            score = Score.from_midi(bytes.fromhex(tune["midi"])) if tune["midi"] else None
            results.append((score, info))
        return results

    try:
        results = convert_notation(path)
        record = {
            "source": str(path),
            "tunes": [
                {"info": asdict(info), "midi": score.dumps_midi().hex() if score is not None else None}
                for score, info in results
            ],
        }
    except BadInputError as error:
        results, record = error, {"source": str(path), "error": error.reason}
    entry.parent.mkdir(parents=True, exist_ok=True)
    # Atomic: a killed build never leaves a truncated cache entry behind.
    write_text_atomic(entry, json.dumps(record))
    if isinstance(results, BadInputError):
        raise results
    return results
