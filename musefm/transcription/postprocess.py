"""Frame activations -> notes (Onsets and Frames decoding), and notes -> MIDI / CSV files.

Pure numpy apart from the file writers: a model predicts onset, frame (and optionally offset and
velocity) probabilities, float32 ``(frames, 88)`` at ``frame_rate`` frames per second; this module
turns them into a float64 ``(N, 4)`` notes array (onset s, offset s, MIDI pitch, velocity).
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musefm.atomic import write_text_atomic
from musefm.errors import BadInputError, MusefmError
from musefm.transcription.labels import MIN_MIDI, NUM_KEYS, empty_notes

DEFAULT_VELOCITY = 64
CSV_HEADER = ("onset", "offset", "pitch", "velocity")


# How far from a frame run's first frame its onset peak may lie (frames: 40 ms at 50 frames/s).
FRAME_ONSET_FRAMES = 2


@dataclass
class DecodeConfig:
    """Thresholds for ``activations_to_notes``; the defaults are those of Onsets and Frames."""

    onset_threshold: float = 0.5
    frame_threshold: float = 0.5
    # None: offsets come only from the frame activation dropping (Onsets and Frames ignores its
    # offset head when decoding); a value: an offset probability at or above it also ends a note.
    offset_threshold: float | None = None
    # Notes shorter than this are dropped; 0 keeps everything (Magenta's default, min_duration_ms=0).
    min_note_seconds: float = 0.0
    # None: only onsets start notes (Onsets and Frames). A value: a key's frame activation rising
    # past frame_threshold also starts a note where the onset probability peaks within
    # +-FRAME_ONSET_FRAMES frames, if that peak reaches this value (a softly struck note the onset
    # head is unsure of while the frame head hears it sound).
    frame_onset_threshold: float | None = None

    def __post_init__(self):  # settings come from users (CLI flags): a bad one is a one-line error
        for name in ("onset_threshold", "frame_threshold", "offset_threshold", "frame_onset_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise MusefmError(f"DecodeConfig.{name} must lie in [0, 1], got {value}")
        if self.min_note_seconds < 0:
            raise MusefmError(f"DecodeConfig.min_note_seconds must be >= 0, got {self.min_note_seconds}")


def activations_to_notes(onset: np.ndarray, frame: np.ndarray, frame_rate: float, velocity: np.ndarray | None = None,
                         offset: np.ndarray | None = None, config: DecodeConfig | None = None) -> np.ndarray:
    """Decode ``(T, 88)`` activations into a notes array ``(N, 4)`` sorted by onset then pitch.

    A note starts on the first frame of each run of frames whose onset probability reaches
    ``onset_threshold`` (so a 2-3 frame onset blob gives one note), or, with
    ``frame_onset_threshold``, where a weaker onset peak meets a rising frame activation (see
    DecodeConfig), and lasts while the key stays
    active (frame >= frame_threshold, or onset still >= onset_threshold) until, exclusively, the
    first frame where it is inactive, a new onset run of the same key starts (a re-strike), or the
    offset probability reaches ``offset_threshold``. A sounding frame with no onset of either kind
    starts nothing.
    Times are frame indices / ``frame_rate``; velocity is ``velocity[onset frame] * 127`` rounded
    and clipped to 1..127 (64 without a velocity activation).
    """
    decoder = NoteDecoder(frame_rate, config)
    decoder.push(onset, frame, velocity=velocity, offset=offset)
    return decoder.finish()


# A frame's onset state depends on frame-run rises up to 2 * FRAME_ONSET_FRAMES frames either side
# (a rise's onset peak is searched within FRAME_ONSET_FRAMES of it), and a note start on the frame
# before. So a block of activations decodes exactly from CONTEXT_FRAMES after its first frame to
# UNSETTLED_FRAMES before its last, and a stream keeps CONTEXT_FRAMES of what it has decoded.
CONTEXT_FRAMES = 2 * FRAME_ONSET_FRAMES + 1
UNSETTLED_FRAMES = 2 * FRAME_ONSET_FRAMES


class NoteDecoder:
    """``activations_to_notes`` over activations that arrive in blocks (``Transcriber.iter_activations``
    streaming a long recording): ``push`` each block in order, then ``finish`` gives the notes,
    equal to those of one call on the whole. Between blocks it keeps a few frames of activations and
    each still-sounding note as (key, onset frame, velocity), so memory does not grow with length."""

    def __init__(self, frame_rate: float, config: DecodeConfig | None = None):
        self.frame_rate = frame_rate
        self.config = config or DecodeConfig()
        self._pending: dict[str, np.ndarray] = {}  # {head: (frames, 88)} from frame _pending_from on
        self._pending_from = 0
        self._frontier = 0  # every note starting before this frame has been found
        self._sounding = np.zeros((0, 3))  # notes found but not ended: key, onset frame, velocity
        self._ended: list[np.ndarray] = []  # (N, 4) blocks: onset frame, offset frame, key, velocity

    def push(self, onset: np.ndarray, frame: np.ndarray, velocity: np.ndarray | None = None,
             offset: np.ndarray | None = None) -> None:
        """Add the next ``(frames, 88)`` block of every head (the same heads each time)."""
        given = {"onset": onset, "frame": frame, "velocity": velocity, "offset": offset}
        block = {name: np.asarray(array) for name, array in given.items() if array is not None}
        shape = block["onset"].shape
        for name, array in block.items():
            if array.ndim != 2 or array.shape[1] != NUM_KEYS or array.shape != shape:
                raise ValueError(f"{name} activation must be (frames, {NUM_KEYS}) like onset {shape}, got {array.shape}")
        if self._pending and set(block) != set(self._pending):
            raise ValueError(f"every block needs the same heads: got {sorted(block)} after {sorted(self._pending)}")
        self._pending = ({name: np.concatenate([self._pending[name], array]) for name, array in block.items()}
                         if self._pending else block)
        self._decode(final=False)

    def finish(self) -> np.ndarray:
        """The notes of everything pushed, ``(N, 4)`` (onset s, offset s, MIDI pitch, velocity)."""
        if not self._pending:
            return empty_notes()
        self._decode(final=True)  # always adds a block to _ended
        ended = np.concatenate(self._ended)
        notes = np.stack([ended[:, 0] / self.frame_rate, ended[:, 1] / self.frame_rate, ended[:, 2] + MIN_MIDI,
                          ended[:, 3]], axis=1)  # (N, 4)
        notes = notes[(notes[:, 1] - notes[:, 0]) >= self.config.min_note_seconds - 1e-9]
        return notes[np.lexsort((notes[:, 2], notes[:, 0]))]

    def _decode(self, final: bool) -> None:
        """Find the notes that start, and the ends of those that stop, between the frontier and the
        last settled frame (the last frame pushed, once ``final``); then keep only the context."""
        pending, config = self._pending, self.config
        known = len(pending["onset"])
        settled = known if final else known - UNSETTLED_FRAMES  # pending index
        low = self._frontier - self._pending_from
        if settled <= low and not final:
            return
        starts, ends = _note_boundaries(pending["onset"], pending["frame"], pending.get("offset"), config)  # (88, known)
        # Key-major, one extra column per key that always "ends": past the settled frames, so one
        # flat searchsorted finds each note's end without running into the next key.
        row = settled - low + 1
        ends_row = np.ones((NUM_KEYS, row), dtype=bool)
        ends_row[:, :-1] = ends[:, low:settled]
        ends_flat = np.flatnonzero(ends_row)
        new_keys, new_columns = np.nonzero(starts[:, low:settled])
        if "velocity" in pending:
            struck = pending["velocity"][low + new_columns, new_keys].astype(np.float64)
            new_velocities = np.clip(np.rint(struck * 127), 1, 127)
        else:
            new_velocities = np.full(len(new_keys), DEFAULT_VELOCITY, dtype=np.float64)
        new = np.stack([new_keys, new_columns + self._frontier, new_velocities], axis=1).astype(np.float64)
        # A sounding note ends at its key's first end from the frontier; a new one after its onset.
        positions = np.concatenate([self._sounding[:, 0].astype(np.int64) * row - 1, new_keys * row + new_columns])
        notes = np.concatenate([self._sounding, new])  # (N, 3) key, onset frame, velocity
        stop_columns = ends_flat[np.searchsorted(ends_flat, positions, side="right")] - notes[:, 0].astype(np.int64) * row
        ended = (stop_columns < row - 1) | final  # the extra column: still sounding, or the input's end
        stops = self._frontier + stop_columns
        self._ended.append(np.stack([notes[ended, 1], stops[ended], notes[ended, 0], notes[ended, 2]], axis=1))
        self._sounding = notes[~ended]
        self._frontier += settled - low
        drop = max(0, self._frontier - CONTEXT_FRAMES - self._pending_from)
        self._pending = {name: array[drop:] for name, array in pending.items()}
        self._pending_from += drop


def _note_boundaries(onset: np.ndarray, frame: np.ndarray, offset: np.ndarray | None,
                     config: DecodeConfig) -> tuple[np.ndarray, np.ndarray]:
    """(note starts, note ends), key-major bool (88, T) each: a note starts on the first frame of an
    onset run and lasts until, exclusively, the next frame that ends it (inactive, or a re-strike,
    or offset reached)."""
    onset_high = onset.T >= config.onset_threshold  # (88, T)
    if config.frame_onset_threshold is not None:
        frames, keys = _frame_supported_onsets(onset, frame, config)
        onset_high[keys, frames] = True
    onset_start = onset_high.copy()
    onset_start[:, 1:] &= ~onset_high[:, :-1]  # first frame of each above-threshold run
    active = (frame.T >= config.frame_threshold) | onset_high
    ends_note = ~active | onset_start
    if offset is not None and config.offset_threshold is not None:
        ends_note |= offset.T >= config.offset_threshold
    return onset_start, ends_note


def _frame_supported_onsets(onset: np.ndarray, frame: np.ndarray, config: DecodeConfig) -> tuple[np.ndarray, np.ndarray]:
    """(frame indices, keys) of the weak onsets that start notes: for each frame run's first frame,
    the onset peak within +-FRAME_ONSET_FRAMES, kept when it lies in [frame_onset_threshold,
    onset_threshold) (at or above it, a normal onset starts the note already)."""
    sounding = frame >= config.frame_threshold  # (T, 88)
    rises = sounding.copy()
    rises[1:] &= ~sounding[:-1]
    starts, keys = np.nonzero(rises)  # (R,) each
    offsets = np.arange(-FRAME_ONSET_FRAMES, FRAME_ONSET_FRAMES + 1)
    window = np.clip(starts[:, None] + offsets, 0, len(onset) - 1)  # (R, 2 * FRAME_ONSET_FRAMES + 1)
    values = onset[window, keys[:, None]]
    peaks = values.max(axis=1)
    chosen = (peaks >= config.frame_onset_threshold) & (peaks < config.onset_threshold)
    peak_frames = window[np.arange(len(starts)), values.argmax(axis=1)]
    return peak_frames[chosen], keys[chosen]


# --------------------------------------------------------------------------------------------
# Notes -> files
# --------------------------------------------------------------------------------------------


def notes_to_score(notes: np.ndarray, program: int = 0, ticks_per_quarter: int = 480, tempo_bpm: float = 120.0):
    """A one-track symusic Score (ticks, one constant tempo) holding ``notes``.

    Times are rounded to the tick grid (at the defaults one tick is 1/960 s); every note keeps at
    least one tick.
    """
    import symusic

    notes = np.asarray(notes, dtype=np.float64).reshape(-1, 4)
    ticks_per_second = ticks_per_quarter * tempo_bpm / 60.0
    starts = np.rint(notes[:, 0] * ticks_per_second).astype(np.int32)
    durations = np.maximum(np.rint(notes[:, 1] * ticks_per_second).astype(np.int32) - starts, 1)
    pitches = np.clip(np.rint(notes[:, 2]), 0, 127).astype(np.int8)
    velocities = np.clip(np.rint(notes[:, 3]), 1, 127).astype(np.int8)
    order = np.lexsort((pitches, starts))
    score = symusic.Score(ticks_per_quarter)
    score.tempos.append(symusic.Tempo(0, float(tempo_bpm)))
    track = symusic.Track("piano", int(program), False)
    track.notes = symusic.Note.from_numpy(starts[order], durations[order], pitches[order], velocities[order])
    score.tracks.append(track)
    return score


def write_midi(notes: np.ndarray, path: Path, program: int = 0) -> Path:
    """Write ``notes`` as a one-track MIDI file, atomically (written beside ``path``, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = notes_to_score(notes, program=program).dumps_midi()
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(data)
    os.replace(handle.name, path)
    return path


def write_notes_csv(notes: np.ndarray, path: Path) -> Path:
    """Write ``notes`` as CSV with header ``onset,offset,pitch,velocity`` (seconds to 1 µs), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    notes = np.asarray(notes, dtype=np.float64).reshape(-1, 4)
    lines = [",".join(CSV_HEADER)]
    lines += [f"{onset:.6f},{offset:.6f},{int(round(pitch))},{int(round(velocity))}"
              for onset, offset, pitch, velocity in notes]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def read_notes_csv(path: Path) -> np.ndarray:
    """Read a notes CSV as written by ``write_notes_csv``; anything else raises ``BadInputError``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BadInputError(path, f"cannot read notes CSV: {error.__class__.__name__}: {error}")
    rows = [row for row in csv.reader(io.StringIO(text)) if row and any(cell.strip() for cell in row)]
    if not rows or tuple(cell.strip().lower() for cell in rows[0]) != CSV_HEADER:
        raise BadInputError(path, f"not a notes CSV: the first line must be {','.join(CSV_HEADER)}")
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != 4 or not all(_is_number(cell) for cell in row):
            raise BadInputError(path, f"row {number}: expected 4 numbers onset,offset,pitch,velocity")
    notes = np.array([[float(cell) for cell in row] for row in rows[1:]], dtype=np.float64).reshape(-1, 4)
    problems = [(~np.isfinite(notes)).any(axis=1), notes[:, 0] < 0, notes[:, 1] < notes[:, 0],
                (notes[:, 2] < 0) | (notes[:, 2] > 127), (notes[:, 3] < 0) | (notes[:, 3] > 127)]
    reasons = ["not finite", "negative onset", "offset before onset", "pitch outside 0..127", "velocity outside 0..127"]
    for mask, reason in zip(problems, reasons):
        if mask.any():
            raise BadInputError(path, f"row {int(np.argmax(mask)) + 2}: {reason}")
    return notes


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
