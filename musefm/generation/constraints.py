"""Grammar-constrained decoding: an automaton that says which tokens may come next.

A language model trained on REMI or TSD learns the token grammar only approximately; a sampled
sequence with a Velocity where a Pitch belongs, or a Position that goes back in time, decodes into
lost or misplaced notes. ``GrammarConstraint`` tracks where a sequence stands and, before every
step, gives the set of tokens that keep it well formed; the sampler sets all others to -inf.

The automaton is derived from the tokenizer, not from a hand-written token list: token types and
values come from its vocabulary, the type successions from MidiTok's ``tokens_types_graph``, bar
lengths from its ``_compute_ticks_per_units``. On top of the type graph it tracks the state MidiTok's
graph cannot express, and only narrows the graph where MidiTok's encoder is stricter than its graph
(so every encoded piece is still accepted):

- a note group is ``Program Pitch Velocity Duration``, with ``PitchDrum`` instead of ``Pitch`` exactly
  when the Program is drums (-1);
- REMI: a piece starts with a Bar; a Bar is followed by its TimeSig, and a TimeSig comes nowhere
  else; within a bar Positions strictly increase and stay below the bar's number of positions for
  its time signature; a note and a Tempo only come after a Position of their bar;
- TSD: a piece starts with its TimeSig (MidiTok writes it at tick 0 first); Tempo and TimeSig only
  come at a time step (after a TimeShift, or at the start);
- EOS only where a new note group could begin (never inside one) and once a note exists; after EOS
  only EOS (a finished row keeps a valid, if unused, distribution); PAD, BOS and MASK never.

Optional musical constraints narrow the values: a key (pitches of a scale), a pitch range, the
allowed programs, a fixed time signature. Key and range apply to pitched notes; drum notes
(``PitchDrum``) name instruments, not pitches, and stay free.

Not covered: bars in TSD (it has none, so a TimeSig change is not aligned to a bar line), duplicate
notes at one onset, note overlaps, and tokenizers with other token types (rests, chords, pedals,
key signatures, BPE): those raise ``MusefmError`` at construction. Octuple is decoded as one
multi-element token per note, not token by token, and is refused too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from miditok import REMI, TSD, MusicTokenizer
from miditok.constants import TIME_SIGNATURE

from musefm.errors import MusefmError

SPECIAL_TYPES = ("PAD", "BOS", "EOS", "MASK")
NOTE_GROUP = ("Program", "Pitch", "Velocity", "Duration")  # PitchDrum stands for Pitch after Program_-1
SUPPORTED_TYPES = {
    REMI: {"Bar", "TimeSig", "Position", "Tempo", "Program", "Pitch", "PitchDrum", "Velocity", "Duration"},
    TSD: {"TimeShift", "TimeSig", "Tempo", "Program", "Pitch", "PitchDrum", "Velocity", "Duration"},
}
DRUM_PROGRAM = -1

# Piece-start kinds of state: "BOS" after the BOS token (or nothing), "RESUME" for a prefix that
# begins mid-piece (no BOS): a REMI window starting at a bar line, a TSD window at any time step.
PIECE_START, RESUME, END = "BOS", "RESUME", "EOS"

PITCH_CLASS_OF_LETTER = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
ACCIDENTAL_SHIFT = {"": 0, "#": 1, "♯": 1, "b": -1, "♭": -1, "##": 2, "bb": -2}
SCALE_STEPS = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "harmonic minor": (0, 2, 3, 5, 7, 8, 11),
    "melodic minor": (0, 2, 3, 5, 7, 9, 11),
    "ionian": (0, 2, 4, 5, 7, 9, 11),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "phrygian": (0, 1, 3, 5, 7, 8, 10),
    "lydian": (0, 2, 4, 6, 7, 9, 11),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
    "aeolian": (0, 2, 3, 5, 7, 8, 10),
    "locrian": (0, 1, 3, 5, 6, 8, 10),
    "major pentatonic": (0, 2, 4, 7, 9),
    "minor pentatonic": (0, 3, 5, 7, 10),
}


def scale_pitch_classes(key: str) -> frozenset[int]:
    """Pitch classes (0 = C) of a key written as tonic and mode: ``"G major"``, ``"F# minor"``, ``"Bb dorian"``."""
    words = key.strip().split(None, 1)
    tonic, mode = (words[0], words[1].strip().lower()) if len(words) == 2 else ("", "")
    letter, accidental = tonic[:1].upper(), tonic[1:]
    if letter not in PITCH_CLASS_OF_LETTER or accidental not in ACCIDENTAL_SHIFT or mode not in SCALE_STEPS:
        raise MusefmError(f"key: cannot read {key!r} (expected a tonic A-G with an optional # or b and a mode: "
                          f"{', '.join(SCALE_STEPS)})")
    root = PITCH_CLASS_OF_LETTER[letter] + ACCIDENTAL_SHIFT[accidental]
    return frozenset((root + step) % 12 for step in SCALE_STEPS[mode])


@dataclass(frozen=True)
class GrammarState:
    """Where a token sequence stands in the grammar; immutable and hashable (masks are cached per state)."""

    kind: str  # type of the last token ("Position", "Duration", ...), or BOS / RESUME / EOS
    position: int = -1  # REMI: Position of the current onset in its bar; -1 before the bar's first
    bar_positions: int = 0  # REMI: how many Positions the current bar has (set by its TimeSig)
    drum: bool = False  # the current note group's Program is drums, so PitchDrum follows, not Pitch
    has_notes: bool = False  # a complete note exists, so EOS may end the piece
    onset_notes: int = 0  # complete notes at the current onset (for max_notes_per_onset)


class GrammarConstraint:
    """The tokens that may follow a REMI or TSD sequence, with optional musical constraints.

    ``key``: a key name (``"G major"``, see ``SCALE_STEPS`` for modes) or explicit pitch classes
    (0 = C). ``pitch_range``: (lowest, highest) MIDI pitch, inclusive. ``programs``: the MIDI
    programs notes may use (-1 = drums). ``time_signature``: ``"3/4"`` or ``(3, 4)``, the only one
    allowed. ``max_notes_per_onset``: no more notes than this may start at one time (an undertrained
    model otherwise tends to pile notes onto one onset instead of moving on). A combination that
    leaves nothing to generate raises ``MusefmError`` here.

    Use: ``state = constraint.start(prompt)``, then per step ``constraint.allowed(state)`` (a (V,)
    bool mask) and ``state = constraint.advance(state, token)``.
    """

    def __init__(self, tokenizer: MusicTokenizer, *, key: str | Iterable[int] | None = None,
                 pitch_range: tuple[int, int] | None = None, programs: Iterable[int] | None = None,
                 time_signature: str | Sequence[int] | None = None, max_notes_per_onset: int | None = None):
        if max_notes_per_onset is not None and max_notes_per_onset < 1:
            raise MusefmError(f"max_notes_per_onset must be >= 1, got {max_notes_per_onset}")
        self.max_notes_per_onset = max_notes_per_onset
        self.tokenizer = tokenizer
        self.is_remi = _check_supported(tokenizer)
        vocab = tokenizer._vocab_base
        self.vocab_size = len(vocab)
        self.special_ids = {name: vocab[f"{name}_None"] for name in SPECIAL_TYPES}

        # Per id: its type and integer value (a TimeSig's value is its number of bar positions).
        self.token_types: list[str] = [""] * self.vocab_size
        self.token_values: list[int] = [0] * self.vocab_size
        self.type_masks: dict[str, np.ndarray] = {}
        time_signature_ids: dict[tuple[int, int], int] = {}
        for token, token_id in vocab.items():
            token_type, value = token.split("_", 1)
            self.token_types[token_id] = token_type
            self.type_masks.setdefault(token_type, np.zeros(self.vocab_size, dtype=bool))[token_id] = True
            if token_type in ("Position", "Program", "Pitch", "PitchDrum"):
                self.token_values[token_id] = int(value)
            elif token_type == "TimeSig":
                signature = tuple(int(part) for part in value.split("/"))
                time_signature_ids[signature] = token_id
                self.token_values[token_id] = self._bar_positions(signature)
        self.uses_drum_tokens = "PitchDrum" in self.type_masks

        # Position ids indexed by value, to select "after p, before the bar's end" by slicing.
        positions = [(self.token_values[i], i) for i in np.flatnonzero(self.type_masks.get("Position", []))]
        self.position_ids = np.full(max((value for value, _ in positions), default=-1) + 1, -1)
        for value, token_id in positions:
            self.position_ids[value] = token_id

        # The musical constraints narrow copies of the type masks: ``allowed`` uses those, while
        # ``advance`` checks only the grammar, so a prompt may use any key, program or meter.
        self.value_masks = {token_type: mask.copy() for token_type, mask in self.type_masks.items()}
        self._restrict_values(key, pitch_range, programs, time_signature, time_signature_ids)
        self.successors = self._successor_types()
        self._masks: dict[tuple[GrammarState, bool], tuple[np.ndarray, torch.Tensor]] = {}

    # -- construction ------------------------------------------------------------------------------

    def _bar_positions(self, signature: tuple[int, int]) -> int:
        """Positions in a bar of ``signature`` (REMI), as MidiTok's encoder counts them."""
        if not self.is_remi:
            return 0
        ticks_per_bar, _, ticks_per_position = self.tokenizer._compute_ticks_per_units(
            0, signature, self.tokenizer.time_division)
        return ticks_per_bar // ticks_per_position

    def _restrict_values(self, key, pitch_range, programs, time_signature, time_signature_ids) -> None:
        """Narrow the Pitch, Program and TimeSig value masks; refuse a combination with nothing left."""
        values = np.asarray(self.token_values)
        pitch_mask = self.type_masks["Pitch"]
        vocabulary_pitches = values[pitch_mask]
        low_vocab, high_vocab = int(vocabulary_pitches.min()), int(vocabulary_pitches.max())
        if pitch_range is not None:
            low, high = (int(bound) for bound in pitch_range)
            if low > high:
                raise MusefmError(f"pitch_range: lowest pitch {low} is above highest pitch {high}")
            pitch_mask = pitch_mask & (values >= low) & (values <= high)
            if not pitch_mask.any():
                raise MusefmError(f"pitch_range: no Pitch token lies in {low}..{high} "
                                  f"(the vocabulary covers {low_vocab}..{high_vocab})")
        if key is not None:
            pitch_classes = scale_pitch_classes(key) if isinstance(key, str) else frozenset(int(pc) % 12 for pc in key)
            if not pitch_classes:
                raise MusefmError("key: an empty scale allows no pitch")
            in_scale = np.isin(values % 12, sorted(pitch_classes))
            if not (pitch_mask & in_scale).any():
                raise MusefmError(f"key: no Pitch token of {key!r} lies in the allowed range")
            pitch_mask = pitch_mask & in_scale
        self.value_masks["Pitch"] = pitch_mask

        program_mask = self.type_masks["Program"]
        if programs is not None:
            wanted = sorted({int(program) for program in programs})
            program_mask = program_mask & np.isin(values, wanted)
            if not program_mask.any():
                known = values[self.type_masks["Program"]]
                raise MusefmError(f"programs: none of {wanted} is a Program token of the vocabulary "
                                  f"(it has {known.min()}..{known.max()})")
        # A pitched program is only usable if some Pitch is left; with none left, refuse the
        # combination rather than silently generating drums only.
        pitched = program_mask & (values != DRUM_PROGRAM) if self.uses_drum_tokens else program_mask
        if pitched.any() and not pitch_mask.any():
            raise MusefmError("key, pitch_range: no Pitch token is left for the allowed programs")
        self.value_masks["Program"] = program_mask

        if time_signature is not None:
            if isinstance(time_signature, str):
                try:
                    signature = tuple(int(part) for part in time_signature.split("/"))
                except ValueError:
                    signature = ()
            else:
                signature = tuple(int(part) for part in time_signature)
            if signature not in time_signature_ids:
                known = ", ".join(f"{n}/{d}" for n, d in sorted(time_signature_ids, key=lambda s: (s[1], s[0])))
                raise MusefmError(f"time_signature: {time_signature!r} is not a TimeSig token of the vocabulary "
                                  f"(it has {known or 'none'})")
            only = np.zeros(self.vocab_size, dtype=bool)
            only[time_signature_ids[signature]] = True
            self.value_masks["TimeSig"] = only
        self.fixed_time_signature = time_signature is not None

    def _successor_types(self) -> dict[str, frozenset[str]]:
        """Token types allowed after each kind of state: MidiTok's graph, narrowed as its encoder is."""
        graph = self.tokenizer.tokens_types_graph
        present = set(self.type_masks) - set(SPECIAL_TYPES)
        successors = {kind: set(graph.get(kind, ())) & present for kind in present}
        # EOS may end a piece wherever MidiTok's graph lets a new note group begin: between groups.
        self.eos_kinds = frozenset(kind for kind in present if NOTE_GROUP[0] in graph.get(kind, ()))
        if self.is_remi:
            if "TimeSig" in present:
                # MidiTok writes a TimeSig right after each Bar and nowhere else (its graph also
                # allows Tempo -> TimeSig), and a note always after a Position of its bar.
                for kind in present - {"Bar"}:
                    successors[kind].discard("TimeSig")
                successors["TimeSig"].discard("Program")
            successors[PIECE_START] = successors[RESUME] = {"Bar"}
        else:
            at_time_step = successors["TimeShift"]
            successors[RESUME] = set(at_time_step)
            successors[PIECE_START] = {"TimeSig"} if "TimeSig" in present else set(at_time_step)
        return {kind: frozenset(types) for kind, types in successors.items()}

    # -- the automaton -----------------------------------------------------------------------------

    def start(self, prefix_ids: Iterable[int] = ()) -> GrammarState:
        """The state after ``prefix_ids`` (a prompt). A prefix starting with BOS (or empty) is a piece
        start; one without BOS resumes mid-piece (REMI: it must begin at a Bar). Raises MusefmError
        naming the first token the grammar rejects."""
        ids = [int(token_id) for token_id in (prefix_ids.tolist() if hasattr(prefix_ids, "tolist") else prefix_ids)]
        bar_positions = self._bar_positions(TIME_SIGNATURE)
        starts_piece = not ids or ids[0] == self.special_ids["BOS"]
        state = GrammarState(PIECE_START if starts_piece else RESUME, bar_positions=bar_positions)
        first = 1 if ids and starts_piece else 0  # BOS itself is not a grammar token
        for index, token_id in enumerate(ids[first:], start=first):
            try:
                state = self.advance(state, token_id)
            except MusefmError as error:
                raise MusefmError(f"prefix token {index}: {error}") from None
        return state

    def allowed(self, state: GrammarState) -> torch.Tensor:
        """(V,) bool: the tokens that may follow ``state`` under the grammar and the musical
        constraints. Cached per state: do not modify it."""
        return self._mask(state, restricted=True)[1]

    def allowed_ids(self, state: GrammarState) -> np.ndarray:
        """The ids that may follow ``state``, ascending."""
        return np.flatnonzero(self._mask(state, restricted=True)[0])

    def advance(self, state: GrammarState, token_id: int) -> GrammarState:
        """The state after ``token_id``; MusefmError if the grammar does not allow it there
        (the musical constraints are not checked: they only steer what ``allowed`` offers)."""
        token_id = int(token_id)
        if not (0 <= token_id < self.vocab_size and self._mask(state, restricted=False)[0][token_id]):
            name = self.tokenizer[token_id] if 0 <= token_id < self.vocab_size else f"id {token_id}"
            raise MusefmError(f"grammar: {name} cannot follow {state.kind} here ({state})")
        token_type, value = self.token_types[token_id], self.token_values[token_id]
        if token_type == END:
            return GrammarState(END, has_notes=state.has_notes)  # one finished state, whatever came before
        if token_type == "Bar":
            return replace(state, kind=token_type, position=-1, onset_notes=0)
        if token_type == "TimeSig" and self.is_remi:
            return replace(state, kind=token_type, bar_positions=value)
        if token_type in ("Position", "TimeShift"):
            return replace(state, kind=token_type, position=value if token_type == "Position" else state.position,
                           onset_notes=0)
        if token_type == "Program":
            return replace(state, kind=token_type, drum=value == DRUM_PROGRAM and self.uses_drum_tokens)
        if token_type == "Duration":
            # The counter saturates at the cap, which keeps the number of distinct states (and cached masks) small.
            cap = self.max_notes_per_onset or 0
            return replace(state, kind=token_type, drum=False, has_notes=True,
                           onset_notes=min(state.onset_notes + 1, cap))
        return replace(state, kind=token_type)

    def _mask(self, state: GrammarState, restricted: bool) -> tuple[np.ndarray, torch.Tensor]:
        cached = self._masks.get((state, restricted))
        if cached is None:
            mask = self._build_mask(state, restricted)
            cached = self._masks[state, restricted] = (mask, torch.from_numpy(mask))  # the tensor shares the array
        return cached

    def _build_mask(self, state: GrammarState, restricted: bool) -> np.ndarray:
        masks = self.value_masks if restricted else self.type_masks
        mask = np.zeros(self.vocab_size, dtype=bool)
        if state.kind == END:
            mask[self.special_ids["EOS"]] = True
            return mask
        for token_type in self.successors[state.kind]:
            if token_type == "Position":
                # Strictly after the current onset, and inside the bar.
                window = self.position_ids[state.position + 1 : state.bar_positions]
                mask[window[window >= 0]] = True
            elif token_type == "TimeSig" and restricted and self.fixed_time_signature and not self.is_remi:
                # TSD states its meter once; restating a fixed one would only repeat it (REMI
                # restates it in every bar, where it is required).
                if state.kind == PIECE_START:
                    mask |= masks[token_type]
            elif token_type in ("Pitch", "PitchDrum"):
                if (token_type == "PitchDrum") == state.drum:
                    # A prompt may end on a Program the constraints exclude, whose pitches may all
                    # be excluded too: the grammar's pitches then keep the sequence going.
                    mask |= masks[token_type] if masks[token_type].any() else self.type_masks[token_type]
            else:
                mask |= masks[token_type]
        if state.kind in self.eos_kinds and state.has_notes:
            mask[self.special_ids["EOS"]] = True
        if restricted and self.max_notes_per_onset and state.onset_notes >= self.max_notes_per_onset:
            mask[self.type_masks["Program"]] = False  # this onset is full: move on in time
        return mask


def _check_supported(tokenizer: MusicTokenizer) -> bool:
    """True for REMI, False for TSD; MusefmError (one line) for anything the grammar does not model."""
    kind = type(tokenizer)
    if kind not in SUPPORTED_TYPES:
        if tokenizer.is_multi_voc:
            raise MusefmError(f"grammar constraints: {kind.__name__} decodes one multi-element token per note, "
                              f"not token by token; use REMI or TSD")
        raise MusefmError(f"grammar constraints: {kind.__name__} is not supported (use REMI or TSD)")
    if tokenizer.is_trained:
        raise MusefmError("grammar constraints: the tokenizer uses BPE; constrain a model over base tokens")
    config = tokenizer.config
    if not (config.use_programs and config.one_token_stream_for_programs and not config.program_changes
            and config.use_velocities and config.using_note_duration_tokens):
        raise MusefmError("grammar constraints: need one token stream with Program, Velocity and Duration "
                          "tokens per note (use_programs, use_velocities, note durations; no program_changes)")
    vocab = tokenizer._vocab_base
    types = {token.split("_", 1)[0] for token in vocab}
    unknown = types - SUPPORTED_TYPES[kind] - set(SPECIAL_TYPES)
    if unknown:
        raise MusefmError(f"grammar constraints: token types {', '.join(sorted(unknown))} are not modelled")
    missing = [name for name in SPECIAL_TYPES if f"{name}_None" not in vocab]
    if missing:
        raise MusefmError(f"grammar constraints: the tokenizer lacks special tokens {', '.join(missing)}")
    bars = {token for token in vocab if token.startswith("Bar_")}
    if kind is REMI and bars != {"Bar_None"}:
        raise MusefmError(f"grammar constraints: only plain Bar_None bars are modelled, got {sorted(bars)[:3]}")
    return kind is REMI
