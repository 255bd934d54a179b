"""Label-true augmentation of token windows: transposition, tempo scaling, velocity scaling.

Works directly on base token ids through lookup tables built from the tokenizer's vocabulary, so
it costs a few numpy gathers per window. Transposition only draws shifts that keep every pitch of
the window inside the tokenizer's pitch range (drum tokens are never moved), and reports the
shift so labels such as the key can move with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from miditok import MusicTokenizer


@dataclass
class AugmentConfig:
    transpose: int = 0  # shift drawn uniformly from [-transpose, transpose] semitones
    tempo: float = 0.0  # tempo scaled by a factor drawn from [1 - tempo, 1 + tempo]
    velocity: float = 0.0  # velocities scaled by a factor drawn from [1 - velocity, 1 + velocity]

    def validate(self) -> None:
        if self.transpose < 0 or not 0 <= self.tempo < 1 or not 0 <= self.velocity < 1:
            raise ValueError("augment: transpose >= 0, 0 <= tempo < 1, 0 <= velocity < 1")

    @property
    def enabled(self) -> bool:
        return bool(self.transpose or self.tempo or self.velocity)


class _FieldTables:
    """For one vocabulary: the value of each id per token type, and the id of each value."""

    def __init__(self, vocab: dict[str, int], token_type: str):
        size = max(vocab.values()) + 1
        self.value_of_id = np.full(size, np.nan)
        values, ids = [], []
        for token, token_id in vocab.items():
            kind, _, value = token.partition("_")
            if kind == token_type:
                try:
                    number = float(value)
                except ValueError:
                    continue
                self.value_of_id[token_id] = number
                values.append(number)
                ids.append(token_id)
        order = np.argsort(values)
        self.values = np.asarray(values, dtype=np.float64)[order]  # sorted token values
        self.ids = np.asarray(ids, dtype=np.int64)[order]

    @property
    def present(self) -> bool:
        return len(self.values) > 0

    def nearest_ids(self, targets: np.ndarray) -> np.ndarray:
        """Id of the token whose value is nearest to each target."""
        right = np.clip(np.searchsorted(self.values, targets), 1, len(self.values) - 1)
        left = right - 1
        take_left = np.abs(targets - self.values[left]) <= np.abs(self.values[right] - targets)
        return self.ids[np.where(take_left, left, right)]


class TokenAugmenter:
    """``augmenter(ids, rng) -> (new_ids, semitones)`` for (T,) or (T, F) base id arrays."""

    def __init__(self, tokenizer: MusicTokenizer, config: AugmentConfig):
        config.validate()
        self.config = config
        vocabs = tokenizer.vocab if tokenizer.is_multi_voc else [tokenizer._vocab_base]
        self.tables = {kind: [] for kind in ("Pitch", "Velocity", "Tempo")}
        for field_index, vocab in enumerate(vocabs):
            for kind in self.tables:
                table = _FieldTables(vocab, kind)
                if table.present:
                    self.tables[kind].append((field_index, table))
        self.multi = tokenizer.is_multi_voc

    def _columns(self, ids: np.ndarray, field_index: int) -> np.ndarray:
        return ids[:, field_index] if self.multi else ids

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        ids = np.array(ids, dtype=np.int64, copy=True)
        semitones = 0
        if self.config.transpose:
            semitones = self._transpose(ids, rng)
        if self.config.velocity:
            self._scale(ids, "Velocity", rng.uniform(1 - self.config.velocity, 1 + self.config.velocity))
        if self.config.tempo:
            self._scale(ids, "Tempo", rng.uniform(1 - self.config.tempo, 1 + self.config.tempo))
        return ids, semitones

    def _transpose(self, ids: np.ndarray, rng: np.random.Generator) -> int:
        low, high = -self.config.transpose, self.config.transpose
        found = []
        for field_index, table in self.tables["Pitch"]:
            column = self._columns(ids, field_index)
            values = table.value_of_id[column] if len(column) else np.zeros(0)
            is_pitch = ~np.isnan(values)
            if is_pitch.any():
                low = max(low, int(table.values[0] - values[is_pitch].min()))
                high = min(high, int(table.values[-1] - values[is_pitch].max()))
            found.append((field_index, table, column, values, is_pitch))
        if low > high:
            return 0
        semitones = int(rng.integers(low, high + 1))
        if semitones:
            for field_index, table, column, values, is_pitch in found:
                column[is_pitch] = table.nearest_ids(values[is_pitch] + semitones)
        return semitones

    def _scale(self, ids: np.ndarray, kind: str, factor: float) -> None:
        for field_index, table in self.tables[kind]:
            column = self._columns(ids, field_index)
            values = table.value_of_id[column]
            present = ~np.isnan(values)
            if present.any():
                column[present] = table.nearest_ids(values[present] * factor)
