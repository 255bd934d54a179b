"""Infilling with MusicBERT (``infill_music_bert``): iterative mask-predict (Ghazvininejad et al.
2019). The notes of bars i..j become note slots (as many as the original bars held, or ``num_notes``) whose note fields
(pitch, position, bar, velocity, duration, program) are all masked; tempo and time signature are
the bar's structure, not the notes, and stay. One pass predicts every masked field; each later pass
re-masks the ``N (K - k) / K`` least confident of the N field entries and predicts them again. The
predictions are constrained so the result always decodes into bars i..j: bar values in [i, j], a
position inside its bar's time signature, ``PitchDrum`` exactly for the drum program, programs the
piece already uses. Bar is decided before position, and program before pitch, within a pass; re-masking
one re-masks the other.
"""

from __future__ import annotations

import numpy as np
import torch

from musefm.data.dataset import BOS, EOS, MASK
from musefm.data.tokenize import decode
from musefm.errors import MusefmError
from musefm.generation.infill import SPECIAL_TOKENS, InfillResult, OctupleLayout, check_bars, piece_ids
from musefm.generation.sampling import filter_logits


def _bar_structure(layout: OctupleLayout, rows: np.ndarray, first: int, last: int) -> dict[int, dict[int, int]]:
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

    def __init__(self, layout: OctupleLayout, rows: np.ndarray, first: int, last: int, key, pitch_range, programs):
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
    layout = OctupleLayout(tokenizer)
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
