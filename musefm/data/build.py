"""``musefm data build``: sources -> tokenized dataset directory.

Layout of a dataset directory::

    dataset.json        format, settings, status ("building" / "complete") and totals
    tokenizer.json      the MidiTok tokenizer (with its BPE merges when trained)
    shards/NNNNN.npy    base token ids of consecutive pieces, (N,) or (N, F) for Octuple
    shards/NNNNN.json   what the shard holds: pieces (offset, length, metadata, stats), rejections,
                        and the source files it covers; written after its .npy, so it marks the
                        shard complete
    manifest.jsonl      one line per piece: metadata, split, shard, offset, length, stats
    rejected.jsonl      one line per file or tune that could not be used, with the reason
    stats.json, card.md, card/*.png   the dataset card (musefm.data.card)

Files are read and tokenized in worker processes; shards are written as they fill, so a build that
is stopped loses at most one shard of work and a re-run skips every source file already covered.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from musefm.atomic import save_npy_atomic, write_text_atomic
from musefm.data import corpus
from musefm.data.convert import default_cache_dir
from musefm.data.tokenize import (
    apply_bpe,
    encode,
    id_dtype,
    load_tokenizer,
    make_tokenizer,
    save_tokenizer,
    tokenizer_name,
    train_bpe,
)
from musefm.errors import BadInputError, MusefmError
from musefm.progress import Progress

FORMAT = "musefm-dataset"
FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")


@dataclass
class BuildConfig:
    sources: list[str] = field(default_factory=list)
    out: str = ""
    tokenizer: Literal["remi", "tsd", "octuple"] = "remi"
    tokenizer_settings: dict = field(default_factory=dict)  # MidiTok TokenizerConfig overrides
    bpe_vocab_size: int = 0  # 0: no BPE
    valid_fraction: float = 0.05
    test_fraction: float = 0.05
    limit: int = 0  # read only the first N files of each source (0: all)
    workers: int = 0  # 0: one per core
    shard_pieces: int = 256
    cache_dir: str | None = None  # music21 conversion cache (default ~/.cache/musefm)

    def validate(self) -> None:
        if not self.sources:
            raise MusefmError("no source given (e.g. --source music21:bach)")
        if not self.out:
            raise MusefmError("no output directory given (--out)")
        if not (0 <= self.valid_fraction < 1 and 0 <= self.test_fraction < 1):
            raise MusefmError("valid_fraction and test_fraction must be in [0, 1)")
        if self.valid_fraction + self.test_fraction >= 1:
            raise MusefmError("valid_fraction + test_fraction must leave pieces for training")
        if self.bpe_vocab_size < 0 or self.limit < 0 or self.workers < 0 or self.shard_pieces < 1:
            raise MusefmError("bpe_vocab_size, limit and workers must be >= 0, shard_pieces >= 1")

    def identity(self) -> dict:
        """The settings that determine the dataset's content (a resume must match them)."""
        return {
            "sources": list(self.sources), "tokenizer": self.tokenizer,
            "tokenizer_settings": self.tokenizer_settings, "bpe_vocab_size": self.bpe_vocab_size,
            "valid_fraction": self.valid_fraction, "test_fraction": self.test_fraction, "limit": self.limit,
        }


@dataclass
class BuildSummary:
    out: Path
    pieces: int
    rejected: int
    tokens: int
    splits: dict
    resumed_files: int
    seconds: float

    def line(self) -> str:
        splits = ", ".join(f"{name} {count}" for name, count in self.splits.items())
        resumed = f"; {self.resumed_files} files already done" if self.resumed_files else ""
        return (
            f"{self.out}: kept {self.pieces} pieces ({splits}), rejected {self.rejected} "
            f"(see rejected.jsonl), {self.tokens:,} tokens in {self.seconds:.1f}s{resumed}"
        )


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------

_worker_state: dict = {}


def _init_worker(tokenizer_path: str, cache_dir: str | None) -> None:
    _worker_state["tokenizer"] = load_tokenizer(Path(tokenizer_path))
    _worker_state["cache_dir"] = Path(cache_dir) if cache_dir else None


def note_fingerprint(score) -> str:
    """Hash of the notes' (onset, pitch) in quarter notes: equal for duplicate encodings."""
    tpq = score.ticks_per_quarter
    parts = []
    for track in score.tracks:
        arrays = track.notes.numpy()
        onsets = np.round(arrays["time"].astype(np.float64) / tpq * 48).astype(np.int64)
        parts.append(np.stack([onsets, arrays["pitch"].astype(np.int64)], axis=1))
    notes = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    notes = notes[np.lexsort((notes[:, 1], notes[:, 0]))]
    return hashlib.sha1(notes.tobytes()).hexdigest()[:16]


def piece_stats(score) -> tuple[dict, np.ndarray]:
    """Per-piece numbers for the card, and the piece's pitch histogram (128,)."""
    pitches = [track.notes.numpy()["pitch"] for track in score.tracks if not track.is_drum]
    pitches = np.concatenate(pitches).astype(np.int64) if pitches else np.zeros(0, np.int64)
    histogram = np.bincount(pitches, minlength=128)[:128]
    stats = {
        "notes": int(score.note_num()),
        "tracks": len(score.tracks),
        "pitch_min": int(pitches.min()) if len(pitches) else None,
        "pitch_max": int(pitches.max()) if len(pitches) else None,
        "quarters": round(score.end() / score.ticks_per_quarter, 3),
        "seconds": round(float(score.to("second").end()), 3),
    }
    return stats, histogram


def process_item(item: corpus.SourceItem):
    """Read and tokenize one source file: (item key, [(meta, ids, stats, fingerprint, hist)], [rejections])."""
    tokenizer = _worker_state["tokenizer"]
    kept, rejected = [], []
    try:
        results = corpus.load_item(item, _worker_state["cache_dir"])
    except Exception as error:  # a reader bug must not stop the batch: record it and go on
        results = [corpus.Rejection(item.path, f"unexpected error {type(error).__name__}: {error}", item.source)]
    for result in results:
        if isinstance(result, corpus.Rejection):
            rejected.append(result.to_dict())
            continue
        label = result.meta.path if "#" not in result.meta.id else f"{result.meta.path}#{result.meta.id.rsplit('#', 1)[1]}"
        try:
            ids = encode(tokenizer, result.score, label)
            stats, histogram = piece_stats(result.score)
            stats["tokens"] = int(len(ids))
            kept.append((result.meta.to_dict(), ids, stats, note_fingerprint(result.score), histogram))
        except BadInputError as error:
            rejected.append(corpus.Rejection(label, error.reason, item.source).to_dict())
        except Exception as error:
            rejected.append(corpus.Rejection(label, f"unexpected error {type(error).__name__}: {error}", item.source).to_dict())
    return item.key, kept, rejected


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class ShardWriter:
    """Collects worker results and writes them out ``shard_pieces`` at a time."""

    def __init__(self, shard_dir: Path, first_index: int, shard_pieces: int, dtype, fields: int):
        self.shard_dir, self.index, self.shard_pieces = shard_dir, first_index, shard_pieces
        self.dtype, self.fields = dtype, fields
        self._reset()

    def _reset(self):
        self.arrays, self.pieces, self.rejected, self.items = [], [], [], []
        self.histogram = np.zeros(128, np.int64)
        self.offset = 0

    def add(self, item_key: str, kept, rejected) -> None:
        self.items.append(item_key)
        self.rejected.extend(rejected)
        for meta, ids, stats, fingerprint, histogram in kept:
            self.pieces.append({"id": meta["id"], "offset": self.offset, "length": int(len(ids)),
                                "fingerprint": fingerprint, "meta": meta, "stats": stats})
            self.arrays.append(ids)
            self.offset += len(ids)
            self.histogram += histogram
        if len(self.pieces) >= self.shard_pieces:
            self.flush()

    def flush(self) -> None:
        if not self.items:
            return
        name = f"{self.index:05d}"
        shape = (0, self.fields) if self.fields > 1 else (0,)
        array = np.concatenate(self.arrays) if self.arrays else np.zeros(shape, self.dtype)
        save_npy_atomic(self.shard_dir / f"{name}.npy", array.astype(self.dtype, copy=False))
        record = {"shard": name, "items": self.items, "pieces": self.pieces, "rejected": self.rejected,
                  "pitch_histogram": self.histogram.tolist()}
        write_text_atomic(self.shard_dir / f"{name}.json", json.dumps(record, ensure_ascii=False))
        self.index += 1
        self._reset()


def read_shard_records(shard_dir: Path) -> list[dict]:
    """Complete shards (those whose JSON exists), in order."""
    records = []
    for path in sorted(shard_dir.glob("*.json")):
        if (shard_dir / f"{path.stem}.npy").exists():
            records.append(json.loads(path.read_text(encoding="utf-8")))
    return records


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------


def split_of(fingerprint: str, valid_fraction: float, test_fraction: float) -> str:
    """Deterministic split from a note fingerprint: duplicates always land in the same split."""
    position = int(hashlib.sha1(("split:" + fingerprint).encode()).hexdigest()[:12], 16) / 16**12
    if position < test_fraction:
        return "test"
    if position < test_fraction + valid_fraction:
        return "valid"
    return "train"


def prepare_output(out: Path, identity: dict, overwrite: bool) -> None:
    """An output directory for a dataset build: new, ``overwrite``-n, or holding a build with the
    same settings (to resume); anything else is refused before any work."""
    info_path = out / "dataset.json"
    if out.exists() and overwrite:
        shutil.rmtree(out)
    if out.exists() and any(out.iterdir()):
        if not info_path.exists():
            raise MusefmError(f"{out}: exists, is not empty and holds no musefm dataset (use --overwrite to replace it)")
        info = json.loads(info_path.read_text())
        if info.get("identity") != identity:
            raise MusefmError(f"{out}: holds a dataset built with other settings (use --overwrite to rebuild)")
    out.mkdir(parents=True, exist_ok=True)


def select_items(sources: list[str], limit: int = 0) -> list[corpus.SourceItem]:
    """The files of ``sources`` (the first ``limit`` of each), each key once: the same file named by
    two sources, or one music21 work in two encodings (bwv281.krn and bwv281.mxl share a key), is
    read once, so one piece never lands in two splits or overwrites its own audio."""
    items, seen = [], set()
    for spec in sources:
        listed = corpus.list_items(spec)
        if limit:
            listed = listed[:limit]
        for item in listed:
            if item.key not in seen:
                seen.add(item.key)
                items.append(item)
    if not items:
        raise MusefmError(f"no music files found in {', '.join(sources)}")
    return items


def build_dataset(config: BuildConfig, overwrite: bool = False, stream=None) -> BuildSummary:
    """Build (or resume building) a dataset directory; returns what was kept and rejected."""
    config.validate()
    stream = stream or sys.stderr
    started = time.monotonic()
    out = Path(config.out)
    items = select_items(config.sources, config.limit)  # bad source specs fail here, before any file is touched
    prepare_output(out, config.identity(), overwrite)
    shard_dir = out / "shards"
    shard_dir.mkdir(exist_ok=True)

    base_tokenizer_path = out / "tokenizer.base.json"
    if not base_tokenizer_path.exists():
        save_tokenizer(make_tokenizer(config.tokenizer, **config.tokenizer_settings), base_tokenizer_path)
    tokenizer = load_tokenizer(base_tokenizer_path)
    if config.bpe_vocab_size:  # fail now, not after hours of reading files
        if tokenizer.is_multi_voc:
            raise MusefmError(f"BPE is not available for the {config.tokenizer} tokenizer (one vocabulary per element)")
        if config.bpe_vocab_size <= len(tokenizer._vocab_base):
            raise MusefmError(f"bpe_vocab_size={config.bpe_vocab_size} must exceed the base vocabulary "
                              f"({len(tokenizer._vocab_base)} tokens)")
    fields = len(tokenizer.vocab) if tokenizer.is_multi_voc else 1
    records = read_shard_records(shard_dir)
    done = {key for record in records for key in record["items"]}
    pending = [item for item in items if item.key not in done]
    previous = json.loads((out / "dataset.json").read_text()) if (out / "dataset.json").exists() else {}
    if not pending and previous.get("status") == "complete":
        # Everything is built already: report it without rewriting a single file.
        return BuildSummary(out, previous["pieces"], previous["rejected"], previous["tokens"], previous["splits"],
                            len(items), time.monotonic() - started)
    info = {"format": FORMAT, "version": FORMAT_VERSION, "identity": config.identity(), "status": "building",
            "tokenizer": tokenizer_name(tokenizer), "id_dtype": np.dtype(id_dtype(tokenizer)).name, "fields": fields}
    write_text_atomic(out / "dataset.json", json.dumps(info, indent=2))

    next_index = max((int(r["shard"]) for r in records), default=-1) + 1
    writer = ShardWriter(shard_dir, next_index, config.shard_pieces, id_dtype(tokenizer), fields)
    cache_dir = config.cache_dir or str(default_cache_dir())
    workers = min(config.workers or os.cpu_count() or 1, max(1, len(pending)))

    kept_count = rejected_count = 0
    with Progress(len(pending), "data build", stream=stream) as progress:
        def consume(results):
            nonlocal kept_count, rejected_count
            for key, kept, rejected in results:
                writer.add(key, kept, rejected)
                kept_count += len(kept)
                rejected_count += len(rejected)
                progress.update(1, kept=kept_count, rejected=rejected_count)

        if workers <= 1:
            _init_worker(str(base_tokenizer_path), cache_dir)
            consume(process_item(item) for item in pending)
        else:
            # fork: workers inherit the imported libraries instead of importing them again.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            context = multiprocessing.get_context(method)
            with context.Pool(workers, _init_worker, (str(base_tokenizer_path), cache_dir)) as pool:
                consume(pool.imap(process_item, pending, chunksize=1))
        writer.flush()

    return _finalize(out, config, tokenizer, info, len(done & {i.key for i in items}), started)


def _finalize(out: Path, config: BuildConfig, tokenizer, info: dict, resumed: int, started: float) -> BuildSummary:
    """Splits, manifest, rejections, BPE and the card, from the complete shards."""
    records = read_shard_records(out / "shards")
    pieces = [dict(piece, shard=record["shard"]) for record in records for piece in record["pieces"]]
    rejected = [row for record in records for row in record["rejected"]]
    _write_jsonl(out / "rejected.jsonl", rejected)
    if not pieces:
        reasons = sorted({row["reason"] for row in rejected})
        detail = f": {reasons[0]}" if len(reasons) == 1 else f" ({len(rejected)} files rejected, see {out / 'rejected.jsonl'})"
        raise MusefmError(f"nothing could be read from {', '.join(config.sources)}{detail}")

    copies: dict[str, int] = {}
    for piece in pieces:
        copies[piece["fingerprint"]] = copies.get(piece["fingerprint"], 0) + 1
    manifest = []
    for piece in pieces:
        meta = piece["meta"]
        split = meta.get("split") or split_of(piece["fingerprint"], config.valid_fraction, config.test_fraction)
        row = dict(meta, split=split, shard=piece["shard"], offset=piece["offset"], length=piece["length"],
                   fingerprint=piece["fingerprint"], copies=copies[piece["fingerprint"]], stats=piece["stats"])
        manifest.append(row)
    _write_jsonl(out / "manifest.jsonl", manifest)

    if config.bpe_vocab_size:
        from musefm.data.dataset import ShardStore

        store = ShardStore(out)
        train_rows = [row for row in manifest if row["split"] == "train"] or manifest
        train_bpe(tokenizer, (store.piece_ids(row) for row in train_rows), config.bpe_vocab_size)
        # How many base tokens one BPE token stands for: the loader cuts base windows by it.
        sample = train_rows[:: max(1, len(train_rows) // 64)]
        base = sum(len(store.piece_ids(row)) for row in sample)
        merged = sum(len(apply_bpe(tokenizer, np.asarray(store.piece_ids(row), np.int64))) for row in sample)
        info["bpe_ratio"] = round(base / max(1, merged), 4)
    save_tokenizer(tokenizer, out / "tokenizer.json")

    from musefm.data.card import compute_stats, write_card

    histogram = np.sum([record["pitch_histogram"] for record in records], axis=0)
    stats = compute_stats(manifest, rejected, histogram, info)
    write_card(out, stats, manifest)

    splits = {name: sum(1 for row in manifest if row["split"] == name) for name in SPLITS}
    tokens = int(sum(row["length"] for row in manifest))
    info.update(status="complete", pieces=len(manifest), rejected=len(rejected), tokens=tokens, splits=splits,
                bpe_vocab_size=config.bpe_vocab_size)
    write_text_atomic(out / "dataset.json", json.dumps(info, indent=2))
    return BuildSummary(out, len(manifest), len(rejected), tokens, splits, resumed, time.monotonic() - started)
