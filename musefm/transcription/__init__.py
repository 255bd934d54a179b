"""Piano transcription without the network: training targets from MIDI (labels.py) and decoding of
frame activations into notes and files (postprocess.py). Notes are float64 (N, 4) arrays: onset s,
offset s, MIDI pitch, velocity."""

from musefm.transcription.labels import MAX_MIDI, MIN_MIDI, NUM_KEYS, notes_from_midi, notes_from_score, notes_to_targets
from musefm.transcription.postprocess import (DecodeConfig, NoteDecoder, activations_to_notes, notes_to_score,
                                              read_notes_csv, write_midi, write_notes_csv)

__all__ = ["MIN_MIDI", "MAX_MIDI", "NUM_KEYS", "notes_to_targets", "notes_from_score", "notes_from_midi",
           "DecodeConfig", "NoteDecoder", "activations_to_notes", "notes_to_score", "write_midi", "write_notes_csv",
           "read_notes_csv"]
