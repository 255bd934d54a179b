"""Piano-transcription training targets: MIDI -> notes (seconds) -> frame-level label rolls.

Notes arrays everywhere in ``musefm.transcription`` are float64 ``(N, 4)``: onset seconds, offset
seconds, MIDI pitch, velocity (1..127). Label rolls are float32 ``(frames, 88)`` for the piano keys
MIDI 21..108, frame ``i`` centred at ``i / frame_rate`` (Onsets and Frames, Hawthorne et al. 2018).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from musefm.errors import BadInputError

MIN_MIDI = 21  # A0, the lowest piano key
MAX_MIDI = 108  # C8, the highest
NUM_KEYS = MAX_MIDI - MIN_MIDI + 1  # 88

SUSTAIN_CONTROL = 64
SUSTAIN_DOWN = 64  # CC64 values >= 64 mean the pedal is down (General MIDI)

# Codes painted into one roll per note, later notes over earlier ones (as in the PyTorch Onsets and
# Frames data loader): a re-struck key's new onset overwrites the old note's offset.
_OFFSET, _FRAME, _ONSET = 1, 2, 3


def empty_notes() -> np.ndarray:
    return np.zeros((0, 4), dtype=np.float64)


def notes_to_targets(notes: np.ndarray, num_frames: int, frame_rate: float, onset_frames: int = 1,
                     offset_frames: int = 1) -> dict[str, np.ndarray]:
    """Onset, frame, offset and velocity targets, each float32 ``(num_frames, 88)``.

    A note's onset frame is ``round(onset * frame_rate)``; its onset label covers ``onset_frames``
    frames from there; it sounds (frame label) from the onset frame up to, not including, its offset
    frame (at least one frame); its offset label covers ``offset_frames`` frames from the offset frame.
    "velocity" holds velocity / 127 on onset-labelled frames, 0 elsewhere. Pitches outside 21..108
    are ignored; notes running past either end are clipped. When a key is struck again before its
    previous note ended, the earlier note is cut at the new onset (the later onset wins).
    """
    if onset_frames < 1 or offset_frames < 1:
        raise ValueError(f"onset_frames and offset_frames must be >= 1, got {onset_frames}, {offset_frames}")
    notes = _as_notes(notes)
    codes = np.zeros((num_frames, NUM_KEYS), dtype=np.int8)  # (T, 88)
    velocity = np.zeros((num_frames, NUM_KEYS), dtype=np.float32)  # (T, 88)
    keys = np.rint(notes[:, 2]).astype(np.int64) - MIN_MIDI
    notes, keys = notes[(keys >= 0) & (keys < NUM_KEYS)], keys[(keys >= 0) & (keys < NUM_KEYS)]
    order = np.lexsort((keys, notes[:, 0]))  # by onset: later notes are painted over earlier ones
    notes, keys = notes[order], keys[order]
    starts = np.rint(notes[:, 0] * frame_rate).astype(np.int64)
    stops = np.maximum(np.rint(notes[:, 1] * frame_rate).astype(np.int64), starts + 1)
    stops = _cut_at_restrikes(keys, starts, stops)
    for key, start, stop, note_velocity in zip(keys, starts, stops, notes[:, 3]):
        if start >= num_frames or stop <= 0:
            continue
        first = max(start, 0)  # a note that began before the excerpt sounds from frame 0, unstruck
        onset_stop = max(min(start + onset_frames, stop), first)  # never a negative slice end
        codes[first:stop, key] = _FRAME
        codes[stop:stop + offset_frames, key] = _OFFSET
        codes[first:onset_stop, key] = _ONSET
        velocity[first:onset_stop, key] = np.clip(note_velocity, 0, 127) / 127.0
    onset = (codes == _ONSET).astype(np.float32)
    return {"onset": onset, "frame": (codes >= _FRAME).astype(np.float32),
            "offset": (codes == _OFFSET).astype(np.float32), "velocity": velocity * onset}


# Semitones from a note to its 2nd..6th partials (12, 19.02, 24, 27.86, 31.02 rounded).
HARMONIC_INTERVALS = (12, 19, 24, 28, 31)


def harmonically_masked(notes: np.ndarray, tolerance: float = 0.03) -> np.ndarray:
    """Which notes start while a louder note sounds one of whose 2nd..6th partials lands on their key:
    bool ``(N,)``. The hardest notes to hear on a piano: a soft note an octave or a twelfth above a loud
    one adds little energy that the loud note's partials do not already explain (the kind of note the
    shipped model misses most on an unfamiliar piano). ``tolerance``: seconds by which the louder note
    may start later.
    """
    notes = _as_notes(notes)
    onset, offset, pitch, velocity = (notes[:, column] for column in range(4))
    # (N, N): row i is the candidate masked note, column j the louder note sounding at its onset
    sounding = (onset[None, :] <= onset[:, None] + tolerance) & (offset[None, :] > onset[:, None])
    louder = velocity[None, :] > velocity[:, None]
    partial = np.isin(np.rint(pitch[:, None] - pitch[None, :]), HARMONIC_INTERVALS)
    return (sounding & louder & partial).any(axis=1)


def masked_note_weights(notes: np.ndarray, frame_roll: np.ndarray, frame_rate: float, weight: float) -> np.ndarray:
    """Loss weights float32 ``(frames, 88)``: ``weight`` on the sounding frames (onset included) of
    ``harmonically_masked`` notes, 1 elsewhere, so training leans on the notes it finds hardest.
    ``frame_roll``: all the notes' ``notes_to_targets(...)["frame"]``, which the caller already has;
    it keeps the weights off frames where a re-strike of the key has cut a masked note short."""
    notes = _as_notes(notes)
    masked = notes_to_targets(notes[harmonically_masked(notes)], len(frame_roll), frame_rate)["frame"]
    return (1.0 + (weight - 1.0) * masked * frame_roll).astype(np.float32)


def _cut_at_restrikes(keys: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """End each note no later than the next onset of the same key (notes sorted by onset)."""
    stops = stops.copy()
    by_key = np.lexsort((starts, keys))  # grouped by key, by onset within a key
    same_key_next = keys[by_key][1:] == keys[by_key][:-1]
    current, following = by_key[:-1][same_key_next], by_key[1:][same_key_next]
    # A simultaneous duplicate (same start) keeps its one frame; the later one paints over it anyway.
    stops[current] = np.minimum(stops[current], np.maximum(starts[following], starts[current] + 1))
    return stops


def _as_notes(notes) -> np.ndarray:
    notes = np.asarray(notes, dtype=np.float64)
    if notes.size == 0:
        return empty_notes()
    if notes.ndim != 2 or notes.shape[1] != 4:
        raise ValueError(f"notes must be (N, 4) onset, offset, pitch, velocity; got shape {notes.shape}")
    return notes


# --------------------------------------------------------------------------------------------
# MIDI -> notes
# --------------------------------------------------------------------------------------------


def notes_from_midi(path: Path, apply_sustain: bool = True) -> np.ndarray:
    """Notes ``(N, 4)`` of all non-drum tracks of a MIDI file; see ``notes_from_score``."""
    import symusic

    if not Path(path).is_file():
        raise BadInputError(path, "no such file")
    try:
        score = symusic.Score(str(path))
    except Exception as error:  # symusic raises RuntimeError/ValueError with a parser message
        raise BadInputError(path, f"cannot read MIDI: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
    return notes_from_score(score, apply_sustain=apply_sustain)


def notes_from_score(score, apply_sustain: bool = True) -> np.ndarray:
    """Notes ``(N, 4)`` in seconds of all non-drum tracks of a symusic Score, sorted by onset then pitch.

    With ``apply_sustain`` a note released while its track's sustain pedal (CC64 >= 64) is down keeps
    sounding until the pedal is lifted or the same key is struck again, exactly as Magenta's
    ``apply_sustain_control_changes`` builds the MAESTRO / Onsets and Frames labels.
    """
    score = score.to("second")
    columns, sustain_events = [], []
    for track_index, track in enumerate(score.tracks):
        if track.is_drum:
            continue
        arrays = track.notes.numpy()
        if len(arrays["time"]):
            onset = arrays["time"].astype(np.float64)
            columns.append(np.stack([onset, onset + arrays["duration"].astype(np.float64),
                                     arrays["pitch"].astype(np.float64), arrays["velocity"].astype(np.float64),
                                     np.full(len(onset), track_index, np.float64)], axis=1))  # (n, 5)
        if apply_sustain:
            sustain_events += [(float(control.time), track_index, control.value >= SUSTAIN_DOWN)
                               for control in track.controls if control.number == SUSTAIN_CONTROL]
    if not columns:
        return empty_notes()
    notes = np.concatenate(columns)  # (N, 5): onset, offset, pitch, velocity, track
    if sustain_events:
        notes = _apply_sustain(notes, sustain_events)
    notes = notes[np.lexsort((notes[:, 2], notes[:, 0]))]
    return np.ascontiguousarray(notes[:, :4])


# Event order at equal times, as in Magenta: pedal down, pedal up, note on, note off.
_PEDAL_DOWN, _PEDAL_UP, _NOTE_ON, _NOTE_OFF = 0, 1, 2, 3


def _apply_sustain(notes: np.ndarray, sustain_events: list[tuple[float, int, bool]]) -> np.ndarray:
    """Extend offsets of (N, 5) notes [onset, offset, pitch, velocity, track] through sustain pedals."""
    notes = notes.copy()
    events = [(onset, _NOTE_ON, index) for index, onset in enumerate(notes[:, 0])]
    events += [(offset, _NOTE_OFF, index) for index, offset in enumerate(notes[:, 1])]
    events += [(time, _PEDAL_DOWN if down else _PEDAL_UP, track) for time, track, down in sustain_events]
    events.sort(key=lambda event: (event[0], event[1]))
    pedal_down: dict[int, bool] = {}
    sounding: dict[int, list[int]] = {}  # track -> note indices still sounding (held or sustained)
    removed = np.zeros(len(notes), dtype=bool)
    time = 0.0
    for time, kind, subject in events:
        if kind == _PEDAL_DOWN:
            pedal_down[subject] = True
        elif kind == _PEDAL_UP:
            pedal_down[subject] = False
            kept = []
            for index in sounding.get(subject, []):
                if notes[index, 1] < time:  # released earlier, held by the pedal: ends now
                    notes[index, 1] = time
                else:  # the key itself is still down
                    kept.append(index)
            sounding[subject] = kept
        elif kind == _NOTE_ON:
            track = int(notes[subject, 4])
            active = sounding.setdefault(track, [])
            if pedal_down.get(track, False):
                # Re-striking a key under the pedal ends its previous (sustained) note.
                kept = []
                for index in active:
                    if notes[index, 2] == notes[subject, 2]:
                        notes[index, 1] = time
                        removed[index] |= notes[index, 0] == time  # same key struck twice at once: keep one
                    else:
                        kept.append(index)
                active[:] = kept
            active.append(subject)
        else:  # _NOTE_OFF
            track = int(notes[subject, 4])
            if not pedal_down.get(track, False) and subject in sounding.get(track, []):
                sounding[track].remove(subject)
    for active in sounding.values():  # still held by a pedal never lifted: last event ends them
        for index in active:
            notes[index, 1] = max(notes[index, 1], time)
    return notes[~removed]
