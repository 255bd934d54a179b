"""Training windows of a paired audio dataset (``musefm data build --render``): audio + frame targets.

Each example is cut into ``segment_seconds`` windows; item ``i`` of epoch ``e`` is one window with a
start jitter and augmentations drawn from (seed, epoch, i), so a resumed run sees exactly the windows
the uninterrupted one would. Audio is read per window (soundfile seeks; recordings at another rate
are resampled with soxr), so memory does not grow with the dataset. Augmentations move the labels
with the audio (pitch shift moves the notes, time stretch scales their times); mixing adds a window
of another piece in the same timbre and its notes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from musefm.errors import MusefmError


@dataclass
class AudioDataset:
    """A built paired audio dataset: its manifest rows and their notes."""

    root: Path
    info: dict
    rows: list[dict] = field(default_factory=list)

    def split(self, name: str) -> list[dict]:
        return [row for row in self.rows if row["split"] == name]

    def path(self, relative: str) -> Path:
        path = Path(relative)
        return path if path.is_absolute() else self.root / path


def open_audio_dataset(path) -> AudioDataset:
    root = Path(path)
    info_path = root / "dataset.json"
    if not info_path.is_file():
        raise MusefmError(f"{root}: not a musefm audio dataset (no dataset.json; build one with musefm data build --render)")
    info = json.loads(info_path.read_text())
    if info.get("format") != "musefm-audio-dataset":
        raise MusefmError(f"{root}: holds a {info.get('format', 'unknown')} dataset, not audio with notes (use --render)")
    if info.get("status") != "complete":
        raise MusefmError(f"{root}: the build did not finish; run the same musefm data build again to complete it")
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return AudioDataset(root, info, rows)


def open_audio_datasets(paths: str | list) -> AudioDataset:
    """One dataset, or several (a list, or one comma-separated string) as one: e.g. the same pieces
    rendered with other soundfonts in a second build. Paths become absolute; an example found in
    two of them (same id) is kept once. A piece whose splits differ between them is refused: trained
    on in one and held out in another, it would leak held-out music into training."""
    parts = [part.strip() for part in paths.split(",")] if isinstance(paths, str) else [str(part) for part in paths]
    datasets = [open_audio_dataset(part) for part in parts if part]
    if len(datasets) == 1:
        return datasets[0]
    if not datasets:
        raise MusefmError("no audio dataset given")
    splits_of_piece: dict[str, tuple[set, Path]] = {}  # piece -> its splits in the first dataset that has it
    for dataset in datasets:
        splits = {}
        for row in dataset.rows:
            splits.setdefault(row["piece"], set()).add(row["split"])
        for piece, found in splits.items():
            known, where = splits_of_piece.setdefault(piece, (found, dataset.root))
            if known != found:
                raise MusefmError(f"piece {piece} is in the {'/'.join(sorted(known))} split of {where} but the "
                                  f"{'/'.join(sorted(found))} split of {dataset.root}: build the datasets with the same "
                                  "sources and fractions")
    rows, seen_ids = [], set()
    for dataset in datasets:
        for row in dataset.rows:
            if row["id"] in seen_ids:
                continue
            seen_ids.add(row["id"])
            rows.append({**row, **{key: str(dataset.path(row[key]).resolve()) for key in ("audio", "midi", "notes") if key in row}})
    info = {**datasets[0].info, "parts": [str(dataset.root) for dataset in datasets]}
    return AudioDataset(datasets[0].root, info, rows)


def read_segment(path: Path, start_seconds: float, seconds: float, sample_rate: int) -> np.ndarray:
    """Mono float32 audio of [start, start + seconds) at ``sample_rate``, zero-padded past the end."""
    import soundfile
    import soxr

    with soundfile.SoundFile(str(path)) as handle:
        rate = handle.samplerate
        first = max(0, int(round(start_seconds * rate)))
        handle.seek(min(first, handle.frames))
        audio = handle.read(int(math.ceil(seconds * rate)), dtype="float32", always_2d=True).mean(axis=1)
    if rate != sample_rate and len(audio):
        audio = soxr.resample(audio, rate, sample_rate).astype(np.float32)
    wanted = int(round(seconds * sample_rate))
    return np.pad(audio[:wanted], (0, max(0, wanted - len(audio))))


class TranscriptionWindows:
    """Windows of one split as training items: ``audio`` (samples,), and ``onset``, ``offset``,
    ``frame``, ``velocity`` targets (frames, 88) with frames = samples // hop_length + 1; with
    ``masked_note_weight`` != 1 also ``loss_weight`` (frames, 88), that weight on the frames of
    harmonically masked notes (``musefm.transcription.labels.masked_note_weights``). With
    ``augment.mix_probability`` > 0 an item may be the sum of its window and another piece's."""

    def __init__(self, dataset: AudioDataset, split: str, segment_seconds: float, sample_rate: int, hop_length: int,
                 augment=None, seed: int = 0, jitter: bool = True, masked_note_weight: float = 1.0):
        from musefm.transcription.postprocess import read_notes_csv

        self.dataset, self.split = dataset, split
        self.segment_seconds, self.sample_rate, self.hop_length = segment_seconds, sample_rate, hop_length
        self.augment, self.seed, self.jitter, self.epoch = augment, seed, jitter, 0
        self.masked_note_weight = masked_note_weight
        self.rows = [row for row in dataset.split(split) if row["seconds"] > 0]
        self.notes = [read_notes_csv(dataset.path(row["notes"])) for row in self.rows]
        self.items: list[tuple[int, float]] = []  # (row index, window start in seconds)
        for number, row in enumerate(self.rows):
            count = max(1, math.ceil(row["seconds"] / segment_seconds))
            self.items += [(number, k * segment_seconds) for k in range(count)]
        # For mixing: soundfont -> its item indices, and where each row's items lie in that list (one
        # block: a row's items are consecutive, and a piece has one row per soundfont).
        self.items_by_timbre: dict[str, list[int]] = {}
        self.row_block: dict[int, tuple[int, int]] = {}  # row number -> (first position, count)
        for item_index, (number, _) in enumerate(self.items):
            timbre_items = self.items_by_timbre.setdefault(self.rows[number].get("soundfont"), [])
            first, count = self.row_block.get(number, (len(timbre_items), 0))
            self.row_block[number] = (first, count + 1)
            timbre_items.append(item_index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        from musefm.transcription.labels import masked_note_weights, notes_to_targets

        audio, notes = self._window(index, np.random.default_rng([self.seed, self.epoch, index]))
        if self.augment is not None and self.augment.mix_probability > 0:
            mix_rng = np.random.default_rng([self.seed, self.epoch, index, 1])  # its own: mixing never moves other draws
            partner = self._mix_partner(index, mix_rng) if mix_rng.random() < self.augment.mix_probability else None
            if partner is not None:
                from musefm.audio.augment import mix

                audio, notes = mix(audio, notes, *self._window(partner, mix_rng))
        rate = self.sample_rate / self.hop_length
        targets = notes_to_targets(notes, len(audio) // self.hop_length + 1, rate)
        item = {"audio": torch.from_numpy(audio)}
        item.update({name: torch.from_numpy(np.ascontiguousarray(targets[name], dtype=np.float32))
                     for name in ("onset", "offset", "frame", "velocity")})
        if self.masked_note_weight != 1.0:
            weights = masked_note_weights(notes, targets["frame"], rate, self.masked_note_weight)
            item["loss_weight"] = torch.from_numpy(weights)
        return item

    def _window(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Item ``index``'s audio (segment samples,) and its notes in window time, augmented."""
        number, start = self.items[index]
        row = self.rows[number]
        if self.jitter:  # a random phase per epoch, so window edges fall on different notes each time
            start = max(0.0, min(start + rng.uniform(-0.5, 0.5) * self.segment_seconds, row["seconds"] - self.segment_seconds))
        # A window sped up by time stretching or detuning must still fill the segment: read enough audio.
        speedup = self.augment.max_speedup() if self.augment is not None else 1.0
        read_seconds = self.segment_seconds * speedup + 0.1
        audio = read_segment(self.dataset.path(row["audio"]), start, read_seconds, self.sample_rate)
        notes = self.notes[number]
        inside = (notes[:, 0] < start + read_seconds) & (notes[:, 1] > start) if len(notes) else np.zeros(0, bool)
        notes = notes[inside].copy()
        notes[:, :2] -= start  # window time; onsets before 0 belong to notes already sounding
        if self.augment is not None:
            from musefm.audio.augment import augment

            audio, notes = augment(audio, self.sample_rate, notes, self.augment, rng)
        samples = int(round(self.segment_seconds * self.sample_rate))
        return np.pad(audio[:samples], (0, max(0, samples - len(audio)))).astype(np.float32), notes

    def _mix_partner(self, index: int, rng: np.random.Generator) -> int | None:
        """A random item of another piece in the same timbre (None when there is none): a mix of
        two pianos would be a sound no piano makes."""
        number = self.items[index][0]
        candidates = self.items_by_timbre[self.rows[number].get("soundfont")]
        first, count = self.row_block[number]
        if len(candidates) == count:
            return None
        drawn = int(rng.integers(len(candidates) - count))  # among the others: skip this row's block
        return candidates[drawn if drawn < first else drawn + count]
