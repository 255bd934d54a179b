"""A fast REMI encoder that gives exactly MidiTok's token ids.

MidiTok builds one Python ``Event`` object and one string per token, which costs about 3 ms for a
chorale; a dataset build spends nearly all its time there. This encoder reuses MidiTok's own
preprocessing (quantisation, velocity and tempo bins, track merging) and then emits ids directly:
note tokens (Program, Pitch, Velocity, Duration) with numpy lookups, Bar/TimeSig/Position tokens in
a loop over distinct onset times. It mirrors ``REMI._add_time_events`` for the settings musefm uses
(programs in one stream, time signatures, tempos; no rests, chords, pedals, pitch bends, controls,
pitch intervals or attribute controls); ``supports`` says whether a tokenizer qualifies, and any
token missing from the vocabulary makes ``encode_remi`` return None so the caller can fall back to
MidiTok. Tests compare both encoders on every fixture and on corpus pieces.
"""

from __future__ import annotations

import numpy as np
from miditok import REMI, MusicTokenizer
from miditok.constants import TIME_SIGNATURE
from miditok.utils import get_score_ticks_per_beat

_TABLES_ATTRIBUTE = "_musefm_fast_remi_tables"


def supports(tokenizer: MusicTokenizer) -> bool:
    config = tokenizer.config
    extra = config.additional_params
    return (
        type(tokenizer) is REMI
        and config.use_programs and config.one_token_stream_for_programs and not config.program_changes
        and config.use_velocities and not tokenizer._note_on_off
        and set(range(-1, 128)) <= set(config.use_note_duration_programs)
        and not (config.use_rests or config.use_chords or config.use_sustain_pedals or config.use_pitch_bends
                 or config.use_control_changes or config.use_pitch_intervals or config.use_key_signatures)
        and len(tokenizer.attribute_controls) == 0
        and not extra.get("use_bar_end_tokens") and extra.get("max_bar_embedding") is None
        and not extra.get("add_trailing_bars")
        and not tokenizer.is_trained
    )


class _Tables:
    """Dense id lookups for one tokenizer (built once, cached on the tokenizer)."""

    def __init__(self, tokenizer: MusicTokenizer):
        vocab = tokenizer._vocab_base
        self.vocab = vocab

        def table(prefix: str, size: int, offset: int = 0) -> np.ndarray:
            ids = np.full(size, -1, dtype=np.int64)
            for value in range(-offset, size - offset):
                ids[value + offset] = vocab.get(f"{prefix}_{value}", -1)
            return ids

        self.pitch = table("Pitch", 128)
        self.drum = table("PitchDrum", 128)
        self.velocity = table("Velocity", 128)
        self.program = table("Program", 129, offset=1)  # index program + 1 (drums are -1)
        self.duration = {}
        for ticks_per_beat, mapping in tokenizer._tpb_ticks_to_tokens.items():
            ids = np.full(max(mapping) + 1, -1, dtype=np.int64)
            for ticks, value in mapping.items():
                ids[ticks] = vocab.get(f"Duration_{value}", -1)
            self.duration[int(ticks_per_beat)] = ids
        self.bar = vocab["Bar_None"]


def _tables(tokenizer: MusicTokenizer) -> _Tables:
    tables = getattr(tokenizer, _TABLES_ATTRIBUTE, None)
    if tables is None:
        tables = _Tables(tokenizer)
        setattr(tokenizer, _TABLES_ATTRIBUTE, tables)
    return tables


def _note_blocks(tokenizer, tables: _Tables, score) -> tuple[np.ndarray, np.ndarray] | None:
    """Note onsets (N,) and their 4 token ids (N, 4), in MidiTok's event order (tracks, then notes)."""
    if tokenizer.config.use_time_signatures and len(score.time_signatures) > 0:
        sections = get_score_ticks_per_beat(score)
    else:
        sections = np.array([[score.end(), tokenizer.time_division]])
    onsets, blocks = [], []
    for track in score.tracks:
        notes = track.notes.numpy()
        if len(notes["time"]) == 0:
            continue
        time = notes["time"].astype(np.int64)
        pitch = notes["pitch"].astype(np.int64)
        program = -1 if track.is_drum else int(track.program)
        pitch_ids = (tables.drum if track.is_drum and tokenizer.config.use_pitchdrum_tokens else tables.pitch)[pitch]
        velocity_ids = tables.velocity[notes["velocity"].astype(np.int64)]
        # The ticks-per-beat section of each onset decides the duration vocabulary.
        section = np.minimum(np.searchsorted(sections[:, 0], time, side="right"), len(sections) - 1)
        duration = notes["duration"].astype(np.int64)
        duration_ids = np.full(len(time), -1, dtype=np.int64)
        for index in np.unique(section):
            lookup = tables.duration.get(int(sections[index, 1]))
            if lookup is None:
                return None
            chosen = section == index
            in_range = duration[chosen] < len(lookup)
            ids = np.full(int(chosen.sum()), -1, dtype=np.int64)
            ids[in_range] = lookup[duration[chosen][in_range]]
            duration_ids[chosen] = ids
        block = np.stack([np.full(len(time), tables.program[program + 1]), pitch_ids, velocity_ids, duration_ids], 1)
        onsets.append(time)
        blocks.append(block)
    if not onsets:
        return np.zeros(0, np.int64), np.zeros((0, 4), np.int64)
    onsets, blocks = np.concatenate(onsets), np.concatenate(blocks)
    order = np.argsort(onsets, kind="stable")
    return onsets[order], blocks[order]


def encode_remi(tokenizer: MusicTokenizer, score) -> np.ndarray | None:
    """REMI ids of ``score`` (a symusic Score, not yet preprocessed), or None to fall back."""
    tables = _tables(tokenizer)
    score = tokenizer.preprocess_score(score)
    notes = _note_blocks(tokenizer, tables, score)
    if notes is None:
        return None
    note_times, note_blocks = notes
    if (note_blocks < 0).any():
        return None
    vocab = tables.vocab
    config = tokenizer.config
    time_division = score.ticks_per_quarter

    # Global events in MidiTok's order: time signatures, then tempos; a stable sort by time puts
    # them before the notes that share their tick.
    globals_ = []
    if config.use_time_signatures:
        globals_ += [(ts.time, "TimeSig", (ts.numerator, ts.denominator)) for ts in score.time_signatures]
    if config.use_tempos:
        globals_ += [(tempo.time, "Tempo", round(tempo.tempo, 2)) for tempo in score.tempos]
    globals_.sort(key=lambda event: event[0])

    current_time_sig, time_sig_time = TIME_SIGNATURE, 0
    for time, kind, value in globals_:
        if kind == "TimeSig":
            current_time_sig, time_sig_time = value, time
            break
    ticks_per_bar, _, ticks_per_pos = tokenizer._compute_ticks_per_units(time_sig_time, current_time_sig, time_division)

    output: list = []
    current_bar, bar_at_last_change, tick_at_last_change, tick_at_bar = -1, 0, 0, 0
    previous_tick = -1

    def time_sig_id(signature) -> int:
        return vocab.get(f"TimeSig_{signature[0]}/{signature[1]}", -1)

    def advance(time: int, is_time_sig: bool) -> None:
        """Bars (each followed by the current TimeSig) up to ``time``, then its Position."""
        nonlocal current_bar, tick_at_bar
        new_bars = bar_at_last_change + (time - tick_at_last_change) // ticks_per_bar - current_bar
        for index in range(new_bars):
            current_bar += 1
            tick_at_bar = tick_at_last_change + (current_bar - bar_at_last_change) * ticks_per_bar
            output.append(tables.bar)
            if config.use_time_signatures and not (is_time_sig and index + 1 == new_bars):
                output.append(time_sig_id(current_time_sig))
        if not is_time_sig:
            output.append(vocab.get(f"Position_{(time - tick_at_bar) // ticks_per_pos}", -1))

    # Distinct note onsets; global events are interleaved before the notes of their tick.
    starts = np.flatnonzero(np.r_[True, note_times[1:] != note_times[:-1]]) if len(note_times) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(note_times)]
    global_index = 0
    for start, end in zip(list(starts) + [None], list(ends) + [None]):
        onset = int(note_times[start]) if start is not None else None
        while global_index < len(globals_) and (onset is None or globals_[global_index][0] <= onset):
            time, kind, value = globals_[global_index]
            global_index += 1
            if time != previous_tick:
                advance(time, kind == "TimeSig")
                previous_tick = time
            if kind == "TimeSig":
                bar_at_last_change += (time - tick_at_last_change) // ticks_per_bar
                tick_at_last_change = time
                current_time_sig = value
                ticks_per_bar, _, ticks_per_pos = tokenizer._compute_ticks_per_units(time, value, time_division)
                previous_tick -= 1
                output.append(time_sig_id(value))
            else:
                output.append(vocab.get(f"Tempo_{value}", -1))
        if onset is None:
            break
        if onset != previous_tick:
            advance(onset, False)
            previous_tick = onset
        output.append(note_blocks[start:end].reshape(-1))

    ids = np.concatenate([np.atleast_1d(np.asarray(part, dtype=np.int64)) for part in output]) if output else np.zeros(0, np.int64)
    if (ids < 0).any():
        return None
    return ids
