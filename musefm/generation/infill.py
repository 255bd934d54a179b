"""Infilling: regenerate bars i..j of a piece given the music on both sides.

Bars are numbered from 0 here (bar ``k`` is Octuple's ``Bar_k``, the ``k``-th ``Bar`` token of REMI),
both ends included. Everything outside bars i..j comes back unchanged, token for token, and decodes
to the same notes: the infilled bars keep their time signatures, so the music after them stays on
its beats.

MusicBERT (``infill_music_bert``), iterative mask-predict (Ghazvininejad et al. 2019): the notes of
bars i..j become note slots (as many as the original bars held, or ``num_notes``) whose note fields
(pitch, position, bar, velocity, duration, program) are all masked; tempo and time signature are
the bar's structure, not the notes, and stay. One pass predicts every masked field; each later pass
re-masks the ``N (K - k) / K`` least confident of the N field entries and predicts them again. The
predictions are constrained so the result always decodes into bars i..j: bar values in [i, j], a
position inside its bar's time signature, ``PitchDrum`` exactly for the drum program, programs the
piece already uses. Bar is decided before position, and program before pitch, within a pass; re-masking
one re-masks the other.

MusicLM (``infill_music_lm``), a causal model as trained (no fill-in-the-middle training), by sampling
and reranking: N candidates for bars i..j are drawn from the left context under the token grammar,
each ends where it opens bar j + 1 (or ends the piece when bar j was the last), and the original
right context (bars j + 1 ..) is appended. A candidate scores ``log p(candidate | left) +
log p(right | left, candidate)`` under the model; the best one (or one drawn by those scores) wins.
Only the right side can tell the candidates apart beyond their own likelihood, so this is
the posterior of the candidates given both sides, restricted to what the left-to-right model samples.
Rules on the candidates keep the right side exact: each bar restates the original time signature,
no Tempo is generated (a tempo change inside the original bars i..j is dropped, and the tempo in
force at bar j + 1 is restated there), and a bar longer than ``max_bar_tokens`` is closed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from symusic import Score

from musefm.data.dataset import BOS, EOS, MASK
from musefm.data.tokenize import bar_token_ids, decode, encode
from musefm.errors import MusefmError
from musefm.generation.sampling import filter_logits

SPECIAL_TOKENS = 4  # PAD, BOS, EOS, MASK: ids 0..3 of every vocabulary


@dataclass
class InfillResult:
    """A piece with bars ``bars[0]..bars[1]`` regenerated."""

    ids: np.ndarray  # (T,) REMI base ids, or (T, F) Octuple rows; no special tokens
    score: Score  # what ``ids`` decode to
    bars: tuple[int, int]  # 0-based, inclusive
    span: tuple[int, int]  # ids[span[0] : span[1]] are the regenerated tokens (Octuple: rows)
    log_probs: np.ndarray  # per regenerated token (Octuple: per row, summed over its predicted fields)
    method: str  # "mask-predict" (MusicBERT) or "rerank" (MusicLM)
    seed: int
    details: dict = field(default_factory=dict)  # per method, JSON-ready: passes, candidate scores ...
    candidates: list[np.ndarray] | None = None  # MusicLM: every complete candidate for bars i..j

    def quarters(self) -> tuple[float, float]:
        """Where the infilled bars start and end in ``score``, in quarter notes."""
        return bar_start_quarter(self.score, self.bars[0]), bar_start_quarter(self.score, self.bars[1] + 1)

    def marked_score(self) -> Score:
        """A copy of ``score`` whose notes starting in the infilled bars form one more track (for pictures)."""
        from symusic import Track

        start, end = (quarter * self.score.ticks_per_quarter for quarter in self.quarters())
        marked = self.score.copy()
        infilled = Track(name=f"infilled bars {self.bars[0] + 1}-{self.bars[1] + 1}", program=0)
        for track in marked.tracks:
            infilled.notes.extend(note for note in track.notes if start <= note.time < end)
            track.notes = [note for note in track.notes if not start <= note.time < end]
        marked.tracks.append(infilled)
        return marked


def check_bars(bars, num_bars: int) -> tuple[int, int]:
    """(i, j) as ints; MusefmError unless 0 <= i <= j < num_bars."""
    try:
        first, last = (int(bar) for bar in bars)
    except (TypeError, ValueError):
        raise MusefmError(f"bars: expected (first, last) bar numbers, got {bars!r}") from None
    if first > last:
        raise MusefmError(f"bars: the first bar ({first}) comes after the last ({last})")
    if first < 0 or last >= num_bars:
        raise MusefmError(f"bars: {first}..{last} lie outside the piece's bars 0..{num_bars - 1} (numbered from 0)")
    return first, last


def num_bars(tokenizer, ids) -> int:
    """Bars of a piece's base ids: Bar tokens (REMI), or the last Octuple bar value + 1."""
    ids = np.asarray(ids)
    if tokenizer.is_multi_voc:
        bar_values = _OctupleLayout(tokenizer).bar_values(ids)
        return int(bar_values.max()) + 1 if len(bar_values) else 0
    return int(np.isin(ids, bar_token_ids(tokenizer)).sum())


def piece_ids(tokenizer, piece, label: str = "piece", first_bars: int = 0) -> np.ndarray:
    """Base ids of a Score or of token ids, special tokens (BOS, EOS, PAD rows) dropped; only the
    first ``first_bars`` bars when it is not 0. ``label`` names the piece in errors."""
    if isinstance(piece, Score):
        ids = np.asarray(encode(tokenizer, piece, label=label), dtype=np.int64)
    else:
        ids = np.asarray(piece, dtype=np.int64)
    if tokenizer.is_multi_voc:
        if ids.ndim != 2 or ids.shape[1] != len(tokenizer.vocab):
            raise MusefmError(f"{label}: expected (T, {len(tokenizer.vocab)}) Octuple ids, got shape {ids.shape}")
        ids = ids[(ids >= SPECIAL_TOKENS).all(axis=1)]
        return ids[_OctupleLayout(tokenizer).bar_values(ids) < first_bars] if first_bars else ids
    if ids.ndim != 1:
        raise MusefmError(f"{label}: expected (T,) token ids, got shape {ids.shape}")
    if tokenizer.is_trained:
        raise MusefmError(f"{label}: infilling works on base tokens; this tokenizer uses BPE")
    ids = ids[~np.isin(ids, tokenizer.special_tokens_ids)]
    starts = np.flatnonzero(np.isin(ids, bar_token_ids(tokenizer)))  # bar k opens at starts[k]
    return ids[: starts[first_bars]] if first_bars and len(starts) > first_bars else ids


def bar_start_quarter(score: Score, bar: int) -> float:
    """Where bar ``bar`` (from 0) starts in ``score``, in quarter notes, following its time signatures."""
    tpq = score.ticks_per_quarter
    signatures = sorted((ts.time, ts.numerator, ts.denominator) for ts in score.time_signatures) or [(0, 4, 4)]
    tick = 0
    for _ in range(bar):
        in_force = [signature for signature in signatures if signature[0] <= tick] or signatures[:1]
        _, numerator, denominator = in_force[-1]
        tick += numerator * 4 * tpq // denominator
    return tick / tpq


def notes_between(score: Score, start: float, end: float) -> int:
    """Notes of ``score`` starting in [start, end) quarter notes."""
    tpq = score.ticks_per_quarter
    return sum(sum(1 for note in track.notes if start * tpq <= note.time < end * tpq) for track in score.tracks)


def piece_programs(tokenizer, ids) -> list[int] | None:
    """The MIDI programs (-1 = drums) of a REMI/TSD piece's Program tokens; None when it has none."""
    names = {tokenizer[int(token)] for token in set(np.asarray(ids).tolist()) if 0 <= int(token) < len(tokenizer)}
    return sorted(int(name.split("_")[1]) for name in names if name.startswith("Program_")) or None


# -- MusicBERT: iterative mask-predict -------------------------------------------------------------------


class _OctupleLayout:
    """Field indices and token values of an Octuple tokenizer."""

    def __init__(self, tokenizer):
        from miditok.constants import TIME_SIGNATURE

        self.tokenizer = tokenizer
        self.index = dict(tokenizer.vocab_types_idx)  # "Pitch" -> 0, "Bar" -> 2 ...
        if "Bar" not in self.index or "Position" not in self.index:
            raise MusefmError(f"{type(tokenizer).__name__}: infilling needs Bar and Position fields")
        self.values = []  # per field: (V_f,) int values (-10**9 for specials and non-numbers)
        self.kinds = []  # per field: (V_f,) token type ("Pitch", "PitchDrum", ...)
        for vocabulary in tokenizer.vocab:
            values = np.full(len(vocabulary), -10**9, dtype=np.int64)
            kinds = np.empty(len(vocabulary), dtype=object)
            for token, token_id in vocabulary.items():
                kind, value = token.split("_", 1)
                kinds[token_id] = kind
                if token_id >= SPECIAL_TOKENS and kind in ("Pitch", "PitchDrum", "Position", "Bar", "Program"):
                    values[token_id] = int(value)
            self.values.append(values)
            self.kinds.append(kinds)
        self.default_time_signature = TIME_SIGNATURE

    def bar_values(self, rows: np.ndarray) -> np.ndarray:
        return self.values[self.index["Bar"]][rows[:, self.index["Bar"]]]

    def bar_positions(self, time_signature_id: int | None) -> int:
        """Positions in a bar of this time signature, as MidiTok's Octuple decoder counts them."""
        from miditok.utils import compute_ticks_per_bar
        from symusic import TimeSignature

        if time_signature_id is None:
            numerator, denominator = self.default_time_signature
        else:
            token = self.tokenizer.vocab[self.index["TimeSig"]]
            name = next(name for name, token_id in token.items() if token_id == time_signature_id)
            numerator, denominator = (int(part) for part in name.split("_")[1].split("/"))
        division = self.tokenizer.time_division
        ticks_per_bar = compute_ticks_per_bar(TimeSignature(0, numerator, denominator), division)
        ticks_per_position = self.tokenizer._tpb_per_ts[denominator] // self.tokenizer.config.max_num_pos_per_beat
        return ticks_per_bar // ticks_per_position


def _bar_structure(layout: _OctupleLayout, rows: np.ndarray, first: int, last: int) -> dict[int, dict[int, int]]:
    """Per bar of first..last: {field index: id} of its tempo and time signature.

    From the bar's first note; a bar without notes carries what was in force before it (or, at the
    start of the piece, what comes after), as MidiTok's decoder would.
    """
    kept = [layout.index[name] for name in ("Tempo", "TimeSig") if name in layout.index]
    bars = layout.bar_values(rows)
    structure = {}
    for bar in range(first, last + 1):
        at_or_before = np.flatnonzero(bars <= bar)
        if len(at_or_before) and bars[at_or_before[-1]] == bar:
            source = np.flatnonzero(bars == bar)[0]  # the bar's first note
        elif len(at_or_before):
            source = at_or_before[-1]
        else:
            source = 0
        structure[bar] = {index: int(rows[source, index]) for index in kept} if len(rows) else {}
    return structure


class _SlotRules:
    """What each note field of a slot in bars first..last may hold, so that every slot decodes there.

    Bars in first..last; a position inside its bar's time signature; ``PitchDrum`` for the drum
    program and ``Pitch`` (in ``pitch_range`` and ``key``) otherwise; ``programs`` (default: those
    the piece uses). ``structure``: per bar, its tempo and time signature ids by field.
    """

    def __init__(self, layout: _OctupleLayout, rows: np.ndarray, first: int, last: int, key, pitch_range, programs):
        from musefm.generation.constraints import scale_pitch_classes

        self.layout = layout
        self.sizes = [len(values) for values in layout.values]
        self.bar_field, self.position_field = layout.index["Bar"], layout.index["Position"]
        self.pitch_field, self.program_field = layout.index.get("Pitch"), layout.index.get("Program")
        self.structure = _bar_structure(layout, rows, first, last)
        self.regular = [np.arange(size) >= SPECIAL_TOKENS for size in self.sizes]
        bar_values = layout.values[self.bar_field]
        self.bars = self.regular[self.bar_field] & (bar_values >= first) & (bar_values <= last)
        time_signature_field = layout.index.get("TimeSig")
        position_values = layout.values[self.position_field]
        self.positions = {bar: self.regular[self.position_field]
                          & (position_values < layout.bar_positions(fields.get(time_signature_field)))
                          for bar, fields in self.structure.items()}
        self.pitches = {}  # drum program or not -> (V_pitch,) bool
        if self.pitch_field is not None:
            kinds, values = layout.kinds[self.pitch_field], layout.values[self.pitch_field]
            pitched = self.regular[self.pitch_field] & (kinds == "Pitch")
            if pitch_range is not None:
                pitched &= (values >= int(pitch_range[0])) & (values <= int(pitch_range[1]))
            if key is not None:
                classes = scale_pitch_classes(key) if isinstance(key, str) else {int(pc) % 12 for pc in key}
                pitched &= np.isin(values % 12, sorted(classes))
            if not pitched.any():
                raise MusefmError("key, pitch_range: no Pitch value is left to infill with")
            drums = self.regular[self.pitch_field] & (kinds == "PitchDrum")
            self.pitches = {False: pitched, True: drums if drums.any() else pitched}
        self.programs = None  # (V_program,) bool
        if self.program_field is not None:
            program_values = layout.values[self.program_field]
            wanted = ({int(p) for p in programs} if programs is not None
                      else set(program_values[rows[:, self.program_field]].tolist()))
            self.programs = self.regular[self.program_field] & np.isin(program_values, sorted(wanted))
            if not self.programs.any():
                raise MusefmError(f"programs: none of {sorted(wanted)} is a Program value of the tokenizer")

    def allowed(self, field_index: int, slot_rows: np.ndarray) -> np.ndarray:
        """(n, V_f) bool: the values field ``field_index`` may take in each of ``slot_rows`` (n, F)."""
        if field_index == self.position_field:
            bars = self.layout.values[self.bar_field][slot_rows[:, self.bar_field]]
            return np.stack([self.positions[int(bar)] for bar in bars])
        if field_index == self.pitch_field:
            drum = (self.layout.values[self.program_field][slot_rows[:, self.program_field]] == -1
                    if self.program_field is not None else np.zeros(len(slot_rows), dtype=bool))
            return np.stack([self.pitches[bool(is_drum)] for is_drum in drum])
        row = (self.bars if field_index == self.bar_field else self.programs if field_index == self.program_field
               else self.regular[field_index])
        return np.repeat(row[None], len(slot_rows), axis=0)


@torch.no_grad()
def infill_music_bert(model, tokenizer, piece, bars, *, iterations: int = 10, num_notes: int | None = None,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                      seed: int = 0, key=None, pitch_range: tuple[int, int] | None = None,
                      programs=None) -> InfillResult:
    """Regenerate bars ``bars = (i, j)`` (0-based, inclusive) of ``piece`` with MusicBERT's mask-predict.

    ``piece``: a Score or Octuple ids (T, F). ``iterations``: prediction passes (1 = predict once).
    ``num_notes``: note slots to fill (default: as many notes as bars i..j hold; for empty bars, the
    piece's mean per bar). Sampling uses ``temperature``/``top_k``/``top_p`` with ``seed``, or the
    most likely value with ``greedy``. ``key``/``pitch_range``/``programs`` narrow the values as in
    ``GrammarConstraint`` (default programs: those the piece uses).
    """
    if not tokenizer.is_multi_voc:
        raise MusefmError(f"{type(tokenizer).__name__}: MusicBERT infilling needs an Octuple tokenizer")
    sizes = [len(vocabulary) for vocabulary in tokenizer.vocab]
    if list(model.config.field_vocab_sizes) != sizes:
        raise MusefmError(f"tokenizer: field vocabularies {sizes} do not match the model's "
                          f"{list(model.config.field_vocab_sizes)}")
    if iterations < 1:
        raise MusefmError(f"iterations: must be at least 1, got {iterations}")
    layout = _OctupleLayout(tokenizer)
    rows = piece_ids(tokenizer, piece)  # (T, F)
    if not len(rows):
        raise MusefmError("piece: no notes to infill around")
    bar_values = layout.bar_values(rows)
    first, last = check_bars(bars, int(bar_values.max()) + 1)
    start, end = np.searchsorted(bar_values, first), np.searchsorted(bar_values, last, side="right")
    if num_notes is None:
        num_notes = int(end - start) or max(1, round(len(rows) * (last - first + 1) / (int(bar_values.max()) + 1)))
    if num_notes < 1:
        raise MusefmError(f"num_notes: must be at least 1, got {num_notes}")

    field_count = rows.shape[1]
    rules = _SlotRules(layout, rows, first, last, key, pitch_range, programs)
    bar_field, position_field = rules.bar_field, layout.index["Position"]
    structure = rules.structure
    predicted = sorted(f for name, f in layout.index.items() if name not in ("Tempo", "TimeSig"))  # note fields
    # Bar and program first: position and pitch depend on them.
    order = sorted(predicted, key=lambda f: 0 if f in (bar_field, rules.program_field) else 1)

    # -- the slots, in their place in the sequence ----------------------------------------------------
    slots = np.empty((num_notes, field_count), dtype=np.int64)  # (n, F)
    original_bars = bar_values[start:end]
    for slot in range(num_notes):
        bar = int(original_bars[slot]) if slot < len(original_bars) else first
        slots[slot] = MASK
        for field_index, value in structure[bar].items():
            slots[slot, field_index] = value
    context_length = model.config.max_seq_len
    bos, eos = np.full((1, field_count), BOS), np.full((1, field_count), EOS)
    sequence = np.concatenate([bos, rows[:start], slots, rows[end:], eos])  # (T', F)
    slot_start = 1 + start
    if num_notes > context_length:
        raise MusefmError(f"bars {first}..{last}: {num_notes} note slots do not fit the model's context of "
                          f"{context_length} notes")
    window_start = 0
    if len(sequence) > context_length:  # a window of the model's context, the slots in its middle
        window_start = min(max(0, slot_start - (context_length - num_notes) // 2), len(sequence) - context_length)
    window = torch.as_tensor(sequence[window_start : window_start + context_length])  # (L, F)
    offset = slot_start - window_start  # slots are window[offset : offset + n]

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    columns = {f: k for k, f in enumerate(predicted)}
    log_probs = np.zeros((num_notes, len(predicted)))  # (n, P) of each entry's current value
    masked = np.ones((num_notes, len(predicted)), dtype=bool)  # (n, P)
    total = masked.size
    remasked, passes = [total], 0
    for iteration in range(iterations):
        if iteration:
            # Mask-predict's schedule: re-mask the N (K - k) / K least confident entries.
            count = total * (iterations - iteration) // iterations
            if count == 0:
                break
            order_by_confidence = np.argsort(log_probs, axis=None, kind="stable")[:count]
            masked = np.zeros_like(masked)
            masked.flat[order_by_confidence] = True
            # A new bar may not fit the old position; a new program not the old kind of pitch.
            for leader, follower in ((bar_field, position_field), (rules.program_field, rules.pitch_field)):
                if leader in columns and follower in columns:
                    masked[:, columns[follower]] |= masked[:, columns[leader]]
            remasked.append(int(masked.sum()))
        slot_view = window[offset : offset + num_notes]  # (n, F), a view: edits reach the window
        for f, k in columns.items():
            slot_view[torch.from_numpy(masked[:, k]), f] = MASK
        logits = model(window[None].to(device)).logits  # F x (1, L, V_f)
        passes += 1
        for f in order:
            k = columns[f]
            chosen_slots = np.flatnonzero(masked[:, k])
            if not len(chosen_slots):
                continue
            field_logits = logits[f][0, offset : offset + num_notes][torch.from_numpy(chosen_slots)].float().cpu()  # (m, V_f)
            allowed = torch.from_numpy(rules.allowed(f, slot_view.numpy()[chosen_slots]))
            field_logits = field_logits.masked_fill(~allowed, float("-inf"))
            if greedy:
                values = field_logits.argmax(dim=-1)
            else:
                probabilities = torch.softmax(filter_logits(field_logits, temperature, top_k, top_p), dim=-1)
                values = torch.multinomial(probabilities, 1, generator=generator)[:, 0]
            log_probs[chosen_slots, k] = torch.log_softmax(field_logits, -1).gather(-1, values[:, None])[:, 0].numpy()
            slot_view[torch.from_numpy(chosen_slots), f] = values
            if f == bar_field:  # the slot now lives in that bar: its tempo and time signature
                for slot, bar in zip(chosen_slots, layout.values[bar_field][values.numpy()]):
                    for field_index, value in structure[int(bar)].items():
                        slot_view[slot, field_index] = value

    filled = window[offset : offset + num_notes].numpy().copy()  # (n, F)
    # Back in time order (MidiTok's decoder reads time signatures in order): by bar, then position.
    time_order = np.lexsort((layout.values[position_field][filled[:, position_field]],
                             layout.values[bar_field][filled[:, bar_field]]))
    filled, row_log_probs = filled[time_order], log_probs[time_order].sum(axis=1)
    ids = np.concatenate([rows[:start], filled, rows[end:]]).astype(np.int64)
    return InfillResult(ids=ids, score=decode(tokenizer, ids), bars=(first, last),
                        span=(int(start), int(start) + num_notes), log_probs=row_log_probs, method="mask-predict",
                        seed=seed, details={"iterations": iterations, "passes": passes, "remasked": remasked,
                                            "num_notes": num_notes, "original_notes": int(end - start)})


# -- MusicLM: sample candidates, rerank with the right context -------------------------------------------


class InfillGrammar:
    """A ``GrammarConstraint`` plus the rules that make a candidate fill exactly bars i..j.

    The candidate opens with a Bar; each bar restates its original TimeSig; no Tempo and no EOS,
    except that when bar i is the piece's first bar it opens with ``Position_0`` and the piece's
    ``opening_tempo``, as MidiTok writes a piece's start; a bar that reached ``max_bar_tokens`` may
    only finish its note group and close. The Bar that would open bar j + 1 (or, when ``may_end``,
    an EOS after bar j) ends the candidate: then only EOS is allowed, so the sampler stops the row.
    """

    def __init__(self, inner, num_bars: int, time_signatures: list[int | None], max_bar_tokens: int,
                 opening_tempo: int | None = None, may_end: bool = False):
        self.inner = inner
        self.vocab_size = inner.vocab_size
        self.num_bars, self.time_signatures, self.max_bar_tokens = num_bars, time_signatures, max_bar_tokens
        self.opening_tempo, self.may_end = opening_tempo, may_end
        types = np.asarray(inner.token_types)
        self.is_bar = torch.from_numpy(types == "Bar")
        self.is_tempo = torch.from_numpy(types == "Tempo")
        # What an over-long bar may still do: finish the note group in progress, or close.
        self.closing = torch.from_numpy(np.isin(types, ["Bar", "Pitch", "PitchDrum", "Velocity", "Duration"]))
        self.group_start = torch.from_numpy(types == "Program")
        self.forced = {}  # one-token masks
        position_0 = inner.position_ids[0] if len(inner.position_ids) else -1
        self.opening = [int(position_0), opening_tempo] if opening_tempo is not None and position_0 >= 0 else []
        self._masks: dict = {}

    def _only(self, token_id: int) -> torch.Tensor:
        if token_id not in self.forced:
            self.forced[token_id] = torch.zeros(self.vocab_size, dtype=torch.bool)
            self.forced[token_id][token_id] = True
        return self.forced[token_id]

    # A state: (inner state, bars opened, tokens in the current bar, opening tokens written, ended)
    def start(self, prefix_ids):
        return (self.inner.start(prefix_ids), 0, 0, 0, False)

    def allowed(self, state) -> torch.Tensor:
        mask = self._masks.get(state)
        if mask is None:
            mask = self._masks[state] = self._build(state)
        return mask

    def _build(self, state) -> torch.Tensor:
        inner_state, opened, in_bar, opening_written, ended = state
        if ended:
            return self._only(EOS)
        if opened == 0:
            return self.is_bar & self.inner.allowed(inner_state)
        if inner_state.kind == "Bar" and self.time_signatures[opened - 1] is not None:
            return self._only(self.time_signatures[opened - 1])
        if opened == 1 and opening_written < len(self.opening):
            return self._only(self.opening[opening_written])
        mask = self.inner.allowed(inner_state).clone()
        mask[self.is_tempo] = False
        end_here = self.may_end and opened == self.num_bars and bool(mask[EOS])
        if in_bar >= self.max_bar_tokens:
            closing = self.closing | self.group_start if inner_state.kind == "Position" else self.closing
            narrowed = mask & closing
            mask = narrowed if narrowed.any() else mask
        mask[EOS] = end_here
        return mask

    def advance(self, state, token_id: int):
        inner_state, opened, in_bar, opening_written, ended = state
        token_id = int(token_id)
        if ended or token_id == EOS:
            return (inner_state, opened, in_bar, opening_written, True)
        if self.is_bar[token_id]:
            if opened == self.num_bars:
                return (inner_state, opened, in_bar, opening_written, True)
            return (self.inner.advance(inner_state, token_id), opened + 1, 0, opening_written, False)
        if opened == 1 and opening_written < len(self.opening) and token_id == self.opening[opening_written]:
            opening_written += 1
        return (self.inner.advance(inner_state, token_id), opened, min(in_bar + 1, self.max_bar_tokens),
                opening_written, False)


def _tempos(types: np.ndarray, ids: np.ndarray) -> list[int]:
    """The Tempo ids among ``ids``, in order."""
    return [int(token) for token in ids if types[token] == "Tempo"]


def _restate_tempo(tokenizer, types: np.ndarray, right: np.ndarray, tempo: int) -> np.ndarray:
    """``right`` (starting at a Bar) with ``tempo`` stated at its first bar's Position_0."""
    head = 1 + int(len(right) > 1 and types[right[1]] == "TimeSig")  # after Bar (and TimeSig)
    position_0 = tokenizer.vocab["Position_0"]
    if head < len(right) and right[head] == position_0:
        if head + 1 < len(right) and types[right[head + 1]] == "Tempo":
            return right  # it states its own tempo
        return np.concatenate([right[: head + 1], [tempo], right[head + 1 :]])
    return np.concatenate([right[:head], [position_0, tempo], right[head:]])


@torch.no_grad()
def score_candidates(model, prompt: np.ndarray, candidates: list[np.ndarray], right: np.ndarray
                     ) -> list[tuple[np.ndarray, float]]:
    """Per candidate: (log p of each candidate token (n,), log p of ``right`` after it), both given ``prompt``.

    One pass per candidate over ``prompt[-W:] + candidate + right`` with the sampler's sliding window
    W (the training context): within W tokens this is a plain forward pass, and the candidate tokens
    get the log-probabilities the sampler drew them from (before temperature and filtering).
    """
    window = model.config.max_seq_len
    device = next(model.parameters()).device
    context = np.asarray(prompt, dtype=np.int64)[-window:]
    scores = []
    model.eval()
    for candidate in candidates:
        sequence = torch.as_tensor(np.concatenate([context, candidate, right]), dtype=torch.long, device=device)
        cache = model.init_cache(1, max_length=window)
        logits = model(sequence[None], cache=cache).logits[0, :-1].float()  # (T - 1, V): predicts sequence[1:]
        token_log_probs = torch.log_softmax(logits, -1).gather(-1, sequence[1:, None])[:, 0].cpu().numpy()
        first = len(context) - 1  # token_log_probs[first] is that of the candidate's first token
        middle = token_log_probs[first : first + len(candidate)]
        scores.append((middle, float(token_log_probs[first + len(candidate):].sum())))
    return scores


@torch.no_grad()
def infill_music_lm(model, tokenizer, piece, bars, *, num_candidates: int = 8, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0, select: str = "best",
                    right_context_tokens: int | None = None, max_bar_tokens: int | None = None,
                    constraint=None) -> InfillResult:
    """Regenerate bars ``bars = (i, j)`` (0-based, inclusive) of ``piece`` with a causal MusicLM.

    ``piece``: a Score or REMI base ids (T,) (a leading BOS / trailing EOS is dropped).
    ``num_candidates`` are drawn (``temperature``/``top_k``/``top_p``, ``seed``) and scored by
    ``log p(candidate | left) + log p(right | left, candidate)``; ``select`` "best" keeps the highest,
    "sample" draws one with probability proportional to exp(score). ``right_context_tokens``: how
    much of the right side is scored (default: the model's context, W; the whole right side ends
    with EOS). ``max_bar_tokens``: a longer bar is closed (default: twice the piece's longest bar).
    ``constraint``: a ``GrammarConstraint`` carrying musical constraints (default: the grammar, with
    the programs the piece uses).
    """
    from musefm.generation.constraints import GrammarConstraint
    from musefm.generation.sampling import sample_batch

    if tokenizer.is_multi_voc:
        raise MusefmError(f"{type(tokenizer).__name__}: MusicLM infilling needs a single token stream (REMI)")
    if num_candidates < 1:
        raise MusefmError(f"num_candidates: must be at least 1, got {num_candidates}")
    if select not in ("best", "sample"):
        raise MusefmError(f"select: must be 'best' or 'sample', got {select!r}")
    body = piece_ids(tokenizer, piece)
    bar_ids = bar_token_ids(tokenizer)
    if not len(bar_ids):
        raise MusefmError(f"{type(tokenizer).__name__} has no Bar tokens to infill between; use REMI")
    if len(tokenizer) > model.config.vocab_size:
        raise MusefmError(f"tokenizer: {len(tokenizer)} tokens, but the model has a {model.config.vocab_size}-token "
                          f"vocabulary")
    starts = np.flatnonzero(np.isin(body, bar_ids))  # bar k opens at starts[k]
    if not len(starts) or starts[0] != 0:
        raise MusefmError("piece: REMI tokens must open with a Bar")
    first, last = check_bars(bars, len(starts))
    end = int(starts[last + 1]) if last + 1 < len(starts) else len(body)
    left, middle, right = body[: starts[first]], body[starts[first] : end], body[end:]

    if constraint is None:  # the plain grammar, and the instruments the piece already plays
        constraint = GrammarConstraint(tokenizer, programs=piece_programs(tokenizer, body))
    types = np.asarray(constraint.token_types, dtype=object)
    bar_lengths = np.diff(np.append(starts, len(body)))
    max_bar_tokens = max_bar_tokens or max(16, 2 * int(bar_lengths.max()))
    bar_count = last - first + 1
    signatures = [int(body[s + 1]) if s + 1 < len(body) and types[body[s + 1]] == "TimeSig" else None
                  for s in starts[first : last + 1]]
    opening = _tempos(types, body[: starts[1] if len(starts) > 1 else len(body)])
    opening_tempo = opening[0] if first == 0 and opening else None  # the piece must state its tempo
    rules = InfillGrammar(constraint, bar_count, signatures, max_bar_tokens, opening_tempo, may_end=not len(right))
    prompt = np.concatenate([[BOS], left]).astype(np.int64)
    try:
        rules.start(prompt)
    except MusefmError as error:
        raise MusefmError(f"piece: the grammar rejects the music before bar {first} ({error})") from None

    # The tempo in force after bar j: restated at bar j + 1 when the new bars no longer lead to it.
    if len(right):
        after_original = (_tempos(types, np.concatenate([left, middle])) or [None])[-1]
        after_new = opening_tempo if first == 0 else (_tempos(types, left) or [None])[-1]
        if after_original is not None and after_original != after_new:
            right = _restate_tempo(tokenizer, types, right, after_original)

    runs = sample_batch(model, torch.as_tensor(prompt), num_candidates, bar_count * (max_bar_tokens + 6) + 2,
                        temperature, top_k, top_p, seed, stop_at_eos=True, constraint=rules)
    candidates = []
    for tokens, _ in runs:  # each ends at the Bar opening bar j + 1, or at EOS after bar j
        tokens = tokens.numpy()
        opened = np.flatnonzero(np.isin(tokens, bar_ids))
        ended = np.flatnonzero(tokens == EOS)
        if len(opened) > bar_count:
            candidates.append(tokens[: opened[bar_count]].astype(np.int64))
        elif len(opened) == bar_count and len(ended):
            candidates.append(tokens[: ended[0]].astype(np.int64))
    if not candidates:
        raise MusefmError(f"no candidate closed bar {last} within its token budget")

    budget = model.config.max_seq_len if right_context_tokens is None else right_context_tokens
    scored_right = np.concatenate([right, [EOS]]) if len(right) < budget else right[:budget]
    scores = score_candidates(model, prompt, candidates, scored_right.astype(np.int64))
    totals = np.array([float(middle_lp.sum()) + right_lp for middle_lp, right_lp in scores])
    if select == "best":
        chosen = int(np.argmax(totals))
    else:
        weights = torch.softmax(torch.as_tensor(totals), dim=0)
        chosen = int(torch.multinomial(weights, 1, generator=torch.Generator().manual_seed(seed + 1)))
    ids = np.concatenate([left, candidates[chosen], right]).astype(np.int64)
    return InfillResult(
        ids=ids, score=decode(tokenizer, ids), bars=(first, last),
        span=(len(left), len(left) + len(candidates[chosen])), log_probs=scores[chosen][0], method="rerank",
        seed=seed, candidates=candidates,
        details={"num_candidates": num_candidates, "complete_candidates": len(candidates), "chosen": chosen,
                 "select": select, "scores": [round(float(t), 4) for t in totals],
                 "candidate_log_probs": [round(float(m.sum()), 4) for m, _ in scores],
                 "right_log_probs": [round(r, 4) for _, r in scores],
                 "right_context_tokens": int(len(scored_right)), "max_bar_tokens": max_bar_tokens})
