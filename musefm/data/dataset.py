"""Reading a built dataset: shards as memory maps, splits, and a PyTorch Dataset of windows.

``TokenDataset`` yields fixed-length windows of a split. Each piece is seen as
``[BOS] tokens [EOS]``; a piece of n tokens gives ceil(n / seq_len) windows an epoch, cut at
random offsets (``window="random"``), at bar lines (``"bar"``), consecutively with the last window
ending at the piece's end (``"sequential"``, for evaluation), or as consecutive non-overlapping
segments with the last one padded (``"segments"``, for Transformer-XL memory training).
Randomness comes from (seed, epoch, index) only, so any worker, rank or resumed run sees the same
windows; call ``set_epoch`` as with DistributedSampler.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from musefm.data.augment import AugmentConfig, TokenAugmenter
from musefm.data.build import FORMAT, read_jsonl
from musefm.data.music import key_index, transpose_key
from musefm.data.tokenize import apply_bpe, bar_token_ids, load_tokenizer
from musefm.errors import MusefmError

PAD, BOS, EOS, MASK = 0, 1, 2, 3  # MidiTok's special token ids (in every Octuple vocabulary too)


class ShardStore:
    """Token ids of pieces, read from memory-mapped shards on demand."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._shards: dict[str, np.ndarray] = {}

    def _shard(self, name: str) -> np.ndarray:
        if name not in self._shards:
            self._shards[name] = np.load(self.root / "shards" / f"{name}.npy", mmap_mode="r")
        return self._shards[name]

    def piece_ids(self, row: dict) -> np.ndarray:
        return self._shard(row["shard"])[row["offset"] : row["offset"] + row["length"]]


@dataclass
class MusicDataset:
    """An opened dataset directory: info, manifest, tokenizer and token store."""

    root: Path
    info: dict
    manifest: list[dict]

    def __post_init__(self):
        self.store = ShardStore(self.root)
        self._tokenizer = None
        self._by_id = {row["id"]: i for i, row in enumerate(self.manifest)}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.root / "tokenizer.json")
        return self._tokenizer

    def rows(self, split: str | None = None) -> list[dict]:
        return [row for row in self.manifest if split is None or row["split"] == split]

    def row(self, piece_id: str) -> dict:
        if piece_id not in self._by_id:
            raise MusefmError(f"{self.root}: no piece {piece_id!r} (see manifest.jsonl for ids)")
        return self.manifest[self._by_id[piece_id]]

    def piece_ids(self, row: dict) -> np.ndarray:
        return self.store.piece_ids(row)


def open_dataset(path) -> MusicDataset:
    """Open a dataset directory built by ``musefm data build``; clear errors when it is not one."""
    root = Path(path)
    info_path = root / "dataset.json"
    if not root.is_dir():
        raise MusefmError(f"{root}: dataset directory not found")
    if not info_path.is_file():
        raise MusefmError(f"{root}: not a musefm dataset (no dataset.json; build one with musefm data build)")
    try:
        info = json.loads(info_path.read_text())
    except ValueError:
        raise MusefmError(f"{info_path}: not valid JSON") from None
    if info.get("format") != FORMAT:
        raise MusefmError(f"{root}: not a musefm dataset ({info_path.name} has another format)")
    if info.get("status") != "complete":
        raise MusefmError(f"{root}: the build did not finish (run the same musefm data build again to resume)")
    return MusicDataset(root, info, read_jsonl(root / "manifest.jsonl"))


class TokenDataset:
    """Fixed-length windows of one split, as dicts of tensors (a map-style torch Dataset).

    Item: ``input_ids`` (L,) or (L, F) int64, ``attention_mask`` (L,) bool (False = padding),
    ``key`` () int64 key class after transposition (-1 unknown), ``transpose`` () int64 semitones,
    ``piece`` () int64 index into the split's rows.
    """

    def __init__(
        self,
        dataset: MusicDataset | str | Path,
        split: str = "train",
        seq_len: int = 512,
        window: Literal["random", "bar", "sequential", "segments"] = "random",
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ):
        self.dataset = dataset if isinstance(dataset, MusicDataset) else open_dataset(dataset)
        if window not in ("random", "bar", "sequential", "segments"):
            raise MusefmError(f"window must be random, bar, sequential or segments, not {window!r}")
        self.rows = self.dataset.rows(split)
        if not self.rows:
            raise MusefmError(f"{self.dataset.root}: split {split!r} has no pieces")
        self.split, self.seq_len, self.window, self.seed, self.epoch = split, seq_len, window, seed, 0
        tokenizer = self.dataset.tokenizer
        self.tokenizer = tokenizer
        self.fields = self.dataset.info.get("fields", 1)
        self.bpe = bool(tokenizer.is_trained) if not tokenizer.is_multi_voc else False
        self.augmenter = TokenAugmenter(tokenizer, augment) if augment is not None and augment.enabled else None
        # With BPE a window is cut from base tokens long enough to fill seq_len after merging.
        ratio = float(self.dataset.info.get("bpe_ratio", 4.0)) if self.bpe else 1.0
        self.base_len = int(math.ceil(seq_len * ratio * 1.25)) + 8 if self.bpe else seq_len
        if window == "bar":  # found once here: __getitem__ is the loader's hot path
            if tokenizer.is_multi_voc:
                self.bar_field = self._octuple_bar_field()
            else:
                self.bar_ids = self._bar_token_ids()
        counts = [max(1, math.ceil((row["length"] + 2) / self.base_len)) for row in self.rows]
        self.piece_of_item = np.repeat(np.arange(len(self.rows)), counts)
        self.chunk_of_item = np.concatenate([np.arange(c) for c in counts])

    def _bar_token_ids(self) -> np.ndarray:
        bars = bar_token_ids(self.tokenizer)
        if not len(bars):
            raise MusefmError(f"window='bar' needs bar tokens; {type(self.tokenizer).__name__} has none (use remi or octuple)")
        return bars

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.piece_of_item)

    def _framed(self, row: dict) -> np.ndarray:
        """The piece as [BOS] ids [EOS], int64, (n + 2,) or (n + 2, F)."""
        ids = np.asarray(self.dataset.piece_ids(row), dtype=np.int64)
        if self.fields > 1:
            bos, eos = np.full((1, self.fields), BOS), np.full((1, self.fields), EOS)
        else:
            bos, eos = np.array([BOS]), np.array([EOS])
        return np.concatenate([bos, ids, eos])

    def _bar_starts(self, framed: np.ndarray) -> np.ndarray:
        if self.fields > 1:
            bars = framed[:, self.bar_field]
            return np.flatnonzero(np.r_[True, bars[1:] != bars[:-1]])
        return np.r_[0, np.flatnonzero(np.isin(framed, self.bar_ids))]

    def _octuple_bar_field(self) -> int:
        for index, vocab in enumerate(self.tokenizer.vocab):
            if any(token.startswith("Bar_") for token in vocab):
                return index
        raise MusefmError("this Octuple tokenizer has no bar field")

    def __getitem__(self, index: int) -> dict:
        import torch

        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        piece = int(self.piece_of_item[index])
        row = self.rows[piece]
        framed = self._framed(row)
        length = len(framed)
        span = self.base_len
        if self.window == "segments":
            # Transformer-XL training: consecutive, non-overlapping segments (the last one padded),
            # so that each segment's memory is exactly the segment before it.
            start = int(self.chunk_of_item[index]) * span
            # One augmentation per piece and epoch: every segment of a piece is shifted alike.
            rng = np.random.default_rng([self.seed, self.epoch, piece, 1])
        elif length <= span:
            start = 0
        elif self.window == "sequential":
            start = min(int(self.chunk_of_item[index]) * span, length - span)
        elif self.window == "bar":
            starts = self._bar_starts(framed)
            starts = starts[starts <= length - span // 2] if len(starts) else starts
            start = int(rng.choice(starts)) if len(starts) else int(rng.integers(0, length - span + 1))
        else:
            start = int(rng.integers(0, length - span + 1))
        window = framed[start : start + span]

        semitones = 0
        if self.augmenter is not None:
            window, semitones = self.augmenter(window, rng)
        if self.bpe:
            window = apply_bpe(self.tokenizer, window)[: self.seq_len]

        real = len(window)
        shape = (self.seq_len, self.fields) if self.fields > 1 else (self.seq_len,)
        input_ids = np.full(shape, PAD, dtype=np.int64)
        input_ids[:real] = window
        attention_mask = np.zeros(self.seq_len, dtype=bool)
        attention_mask[:real] = True
        key = key_index(transpose_key(row.get("key"), semitones))
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "key": torch.tensor(key),
            "transpose": torch.tensor(semitones),
            "piece": torch.tensor(piece),
        }


def make_loader(dataset: TokenDataset, batch_size: int, shuffle: bool = True, seed: int = 0, num_workers: int = 0,
                drop_last: bool = False):
    """A DataLoader over ``dataset``; under torch.distributed each rank gets its own shard of items."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last)
