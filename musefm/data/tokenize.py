"""MidiTok tokenizers as musefm uses them: REMI and TSD for causal models, Octuple for MusicBERT.

Token ids are stored *before* BPE: a dataset keeps base ids on disk and a trained tokenizer applies
its merges when a window is read (``apply_bpe``), so augmentation always works on musical tokens.
Sequences are numpy arrays: (T,) for one-vocabulary tokenizers, (T, F) for Octuple (one column per
element: pitch, position, bar, velocity, duration, program, tempo, time signature).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from miditok import REMI, TSD, MusicTokenizer, Octuple, TokenizerConfig, TokSequence
from symusic import Score

from musefm.data import fast_remi
from musefm.errors import BadInputError, MusefmError

TOKENIZER_CLASSES = {"remi": REMI, "tsd": TSD, "octuple": Octuple}

# Wider than MidiTok's default so folk tunes (2/2, 3/2, 6/4, 9/8 ...) keep their meter.
TIME_SIGNATURE_RANGE = {2: [1, 2, 3, 4, 6], 4: [1, 2, 3, 4, 5, 6, 7, 8], 8: [2, 3, 4, 5, 6, 7, 9, 12]}

DEFAULT_SETTINGS = dict(
    pitch_range=(21, 109),
    beat_res={(0, 4): 8, (4, 12): 4},
    num_velocities=32,
    use_time_signatures=True,
    use_tempos=True,
    num_tempos=32,
    tempo_range=(40, 250),
    use_programs=True,
    time_signature_range=TIME_SIGNATURE_RANGE,
    special_tokens=["PAD", "BOS", "EOS", "MASK"],
)


def make_tokenizer(name: str, **settings) -> MusicTokenizer:
    """A fresh tokenizer by name (``remi``, ``tsd``, ``octuple``) with musefm's defaults."""
    name = name.lower()
    if name not in TOKENIZER_CLASSES:
        raise MusefmError(f"unknown tokenizer {name!r} (choose from {', '.join(TOKENIZER_CLASSES)})")
    config = dict(DEFAULT_SETTINGS)
    config.update(settings)
    return TOKENIZER_CLASSES[name](TokenizerConfig(**config))


def tokenizer_name(tokenizer: MusicTokenizer) -> str:
    for name, cls in TOKENIZER_CLASSES.items():
        if type(tokenizer) is cls:
            return name
    raise MusefmError(f"unsupported tokenizer class {type(tokenizer).__name__}")


def save_tokenizer(tokenizer: MusicTokenizer, path: Path) -> None:
    tokenizer.save(Path(path))


def load_tokenizer(path: Path) -> MusicTokenizer:
    """Load a tokenizer saved by ``save_tokenizer`` (a MidiTok JSON file)."""
    path = Path(path)
    if not path.is_file():
        raise MusefmError(f"{path}: tokenizer file not found")
    try:
        kind = json.loads(path.read_text())["tokenization"]
    except (ValueError, KeyError):
        raise MusefmError(f"{path}: not a MidiTok tokenizer file") from None
    classes = {cls.__name__: cls for cls in TOKENIZER_CLASSES.values()}
    if kind not in classes:
        raise MusefmError(f"{path}: unsupported tokenization {kind!r}")
    return classes[kind](params=path)


def tokenizer_fingerprint(tokenizer: MusicTokenizer) -> dict:
    """What must match between a dataset and a model: the class and the base vocabulary."""
    vocab = tokenizer.vocab if tokenizer.is_multi_voc else tokenizer._vocab_base
    return {"tokenization": type(tokenizer).__name__, "vocab": vocab}


def id_dtype(tokenizer: MusicTokenizer):
    sizes = [len(v) for v in tokenizer.vocab] if tokenizer.is_multi_voc else [len(tokenizer._vocab_base)]
    return np.uint16 if max(sizes) < 2**16 else np.int32


def encode(tokenizer: MusicTokenizer, score: Score, label="score") -> np.ndarray:
    """Base token ids of a score: (T,) or (T, F) for Octuple. Raises BadInputError if empty.

    REMI goes through musefm's fast encoder (same ids as MidiTok, several times faster) when the
    tokenizer's settings allow it; everything else through MidiTok.
    """
    try:
        ids = fast_remi.encode_remi(tokenizer, score) if fast_remi.supports(tokenizer) else None
        if ids is None:
            sequence = tokenizer.encode(score, encode_ids=False)
            if isinstance(sequence, list):  # one stream per track: concatenate (not used by our configs)
                ids = [i for s in sequence for i in s.ids]
            else:
                ids = sequence.ids
    except Exception as error:  # MidiTok raises many kinds on odd files
        raise BadInputError(label, f"cannot tokenize ({type(error).__name__}: {str(error)[:160]})") from None
    ids = np.asarray(ids, dtype=id_dtype(tokenizer))
    if len(ids) == 0 or not _has_notes(tokenizer, ids):
        raise BadInputError(label, "no notes inside the tokenizer's pitch range")
    return ids


def _has_notes(tokenizer: MusicTokenizer, ids: np.ndarray) -> bool:
    if tokenizer.is_multi_voc:
        return len(ids) > 0
    pitch_ids = pitch_token_ids(tokenizer)
    return bool(np.isin(ids, pitch_ids).any())


def pitch_token_ids(tokenizer: MusicTokenizer) -> np.ndarray:
    cached = getattr(tokenizer, "_musefm_pitch_ids", None)
    if cached is None:
        vocab = tokenizer._vocab_base
        cached = np.array([i for token, i in vocab.items() if token.startswith(("Pitch_", "PitchDrum_"))])
        tokenizer._musefm_pitch_ids = cached
    return cached


def bar_token_ids(tokenizer: MusicTokenizer) -> np.ndarray:
    """Ids of the Bar tokens of a one-vocabulary tokenizer (empty for TSD, which has none)."""
    return np.array([i for token, i in tokenizer._vocab_base.items() if token.startswith("Bar_")], dtype=np.int64)


def decode(tokenizer: MusicTokenizer, ids: np.ndarray) -> Score:
    """Base ids (as stored in a dataset) back to a symusic Score."""
    ids = np.asarray(ids)
    if tokenizer.is_multi_voc:
        sequence = TokSequence(ids=[list(map(int, row)) for row in ids])
    else:
        sequence = TokSequence(ids=list(map(int, ids)))
    tokenizer.complete_sequence(sequence)
    return tokenizer.decode(sequence)


def apply_bpe(tokenizer: MusicTokenizer, ids: np.ndarray) -> np.ndarray:
    """Base ids -> BPE ids (identity for an untrained tokenizer)."""
    if not tokenizer.is_trained:
        return ids
    sequence = TokSequence(ids=list(map(int, ids)))
    tokenizer.encode_token_ids(sequence)
    return np.asarray(sequence.ids, dtype=np.int64)


def undo_bpe(tokenizer: MusicTokenizer, ids: np.ndarray) -> np.ndarray:
    """BPE ids -> base ids (identity for an untrained tokenizer)."""
    if not tokenizer.is_trained:
        return ids
    sequence = TokSequence(ids=list(map(int, ids)), are_ids_encoded=True)
    tokenizer.decode_token_ids(sequence)
    return np.asarray(sequence.ids, dtype=np.int64)


def train_bpe(tokenizer: MusicTokenizer, sequences, vocab_size: int) -> None:
    """Learn BPE merges from base id sequences (an iterable of (T,) arrays), in place."""
    if tokenizer.is_multi_voc:
        raise MusefmError(f"BPE is not available for {type(tokenizer).__name__} (one vocabulary per element)")
    base_size = len(tokenizer._vocab_base)
    if vocab_size <= base_size:
        raise MusefmError(f"bpe_vocab_size={vocab_size} must exceed the base vocabulary ({base_size} tokens)")

    class BarChunks:
        """Per sequence, one unicode "word" per bar, as MidiTok's own training iterator gives."""

        def __init__(self, sequences):
            self.sequences = list(sequences)

        def __len__(self):
            return len(self.sequences)

        def __iter__(self):
            for ids in self.sequences:
                sequence = TokSequence(ids=list(map(int, ids)))
                tokenizer.complete_sequence(sequence)
                bars = [bar.ids for bar in sequence.split_per_bars() if len(bar) > 0]
                yield tokenizer._ids_to_bytes(bars, as_one_str=True) if bars else []

    tokenizer.train(vocab_size=vocab_size, model="BPE", iterator=BarChunks(sequences))


def score_notes(score: Score) -> list[tuple]:
    """Notes as (onset, pitch, duration, velocity, program) in quarter notes, sorted: for round trips."""
    tpq = score.ticks_per_quarter
    return sorted(
        (note.time / tpq, note.pitch, note.duration / tpq, note.velocity, -1 if track.is_drum else track.program)
        for track in score.tracks
        for note in track.notes
    )
