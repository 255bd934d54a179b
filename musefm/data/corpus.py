"""Sources of music -> ``Piece``s (a symusic Score plus its metadata).

A source is named by a spec string:

- ``music21:<collection>``: the public-domain corpus shipped inside the music21 package
  (``music21:bach``, ``music21:essenFolksong``, ..., ``music21:all``), or one work of it
  (``music21:bach/bwv66.6``);
- ``dir:<path>``: every .mid .midi .mxl .musicxml .xml .krn .abc file below a folder;
- ``maestro:<path>``: a MAESTRO v2/v3 folder (its metadata CSV or JSON gives split, composer,
  title, MIDI and audio paths).

Listing a source is cheap (``list_items``); reading an item (``load_item``) is the slow part and
runs in worker processes. A notation file may hold many tunes: it yields one Piece per tune.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from symusic import Score

from musefm.data.convert import (
    MIDI_SUFFIXES,
    SUPPORTED_SUFFIXES,
    check_score,
    load_notation_cached,
    read_midi,
)
from musefm.data.music import estimate_key
from musefm.errors import BadInputError, MusefmError

MUSIC21_LICENSE = (
    "music21 corpus: composition out of copyright; encoding distributed with music21 by "
    "permission, commercial use may be restricted (music21/corpus/license.txt)"
)
MAESTRO_LICENSE = "MAESTRO dataset: CC BY-NC-SA 4.0 (non-commercial)"
USER_LICENSE = "user-supplied files: licence unknown"

# Composer of a music21 collection when the files do not name one.
MUSIC21_COLLECTION_COMPOSERS = {
    "bach": "J. S. Bach",
    "beethoven": "L. van Beethoven",
    "essenFolksong": "traditional (Essen folk song)",
    "oneills1850": "traditional (O'Neill's 1850)",
    "ryansMammoth": "traditional (Ryan's Mammoth)",
    "airdsAirs": "traditional (Aird's Airs)",
    "miscFolk": "traditional",
    "nottingham-dataset": "traditional (Nottingham)",
    "palestrina": "G. P. da Palestrina",
    "monteverdi": "C. Monteverdi",
    "trecento": "Trecento (anonymous and various)",
    "josquin": "Josquin des Prez",
    "handel": "G. F. Handel",
    "haydn": "J. Haydn",
    "mozart": "W. A. Mozart",
    "corelli": "A. Corelli",
    "cpebach": "C. P. E. Bach",
    "ciconia": "J. Ciconia",
    "schoenberg": "A. Schoenberg",
    "verdi": "G. Verdi",
    "joplin": "S. Joplin",
    "chopin": "F. Chopin",
    "schubert": "F. Schubert",
    "weber": "C. M. von Weber",
    "webern": "A. Webern",
    "luca": "G. Luca (Gloria)",
}
# Roman-numeral analyses (.rntxt) are analyses, not music to learn from.
MUSIC21_SKIPPED_SUFFIXES = {".rntxt"}


@dataclass
class PieceMeta:
    id: str
    source: str  # the spec the piece came from
    path: str  # the file it was read from
    collection: str
    composer: str | None = None
    title: str | None = None
    key: str | None = None
    key_source: str | None = None
    time_signature: str | None = None
    license: str = USER_LICENSE
    split: str | None = None  # given by the source (MAESTRO); else assigned by the dataset
    audio_path: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Piece:
    score: Score
    meta: PieceMeta


@dataclass
class SourceItem:
    """One file to read, with what the source already knows about it."""

    key: str  # stable id of the file within its source (used for resume)
    path: str
    source: str
    collection: str
    composer: str | None = None
    title: str | None = None
    license: str = USER_LICENSE
    split: str | None = None
    audio_path: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Rejection:
    path: str
    reason: str
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------


def list_items(spec: str) -> list[SourceItem]:
    """The files a source spec names, in a stable order. Raises MusefmError on a bad spec."""
    kind, _, argument = spec.partition(":")
    if kind == "music21":
        return _music21_items(spec, argument)
    if kind == "dir":
        return _dir_items(spec, Path(argument).expanduser())
    if kind == "maestro":
        return _maestro_items(spec, Path(argument).expanduser())
    raise MusefmError(f"unknown source {spec!r}: use music21:<collection>, dir:<path> or maestro:<path>")


def _music21_root() -> Path:
    from music21 import corpus

    return Path(corpus.__file__).parent


def music21_collections() -> list[str]:
    root = _music21_root()
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def _music21_items(spec: str, argument: str) -> list[SourceItem]:
    root = _music21_root()
    collection, _, work = argument.partition("/")
    if collection == "all":
        folders = [root / name for name in music21_collections()]
    elif (root / collection).is_dir() and collection in music21_collections():
        folders = [root / collection]
    else:
        known = ", ".join(music21_collections())
        raise MusefmError(f"unknown music21 collection {collection!r} in {spec!r} (known: all, {known})")
    paths = sorted(
        p
        for folder in folders
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES and p.suffix.lower() not in MUSIC21_SKIPPED_SUFFIXES
    )
    if work:
        paths = [p for p in paths if p.stem == work or p.name == work]
        if not paths:
            raise MusefmError(f"no work {work!r} in music21 collection {collection!r}")
    items = []
    for path in paths:
        relative = path.relative_to(root)
        name = relative.parts[0]
        items.append(
            SourceItem(
                key=f"music21:{relative.with_suffix('').as_posix()}",
                path=str(path),
                source=spec,
                collection=name,
                composer=MUSIC21_COLLECTION_COMPOSERS.get(name),
                license=MUSIC21_LICENSE,
            )
        )
    return items


def _dir_items(spec: str, root: Path) -> list[SourceItem]:
    if not root.is_dir():
        raise MusefmError(f"{root}: not a directory (source {spec!r})")
    items = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in SUPPORTED_SUFFIXES:
            continue
        relative = path.relative_to(root)
        collection = relative.parts[0] if len(relative.parts) > 1 else root.resolve().name
        items.append(
            SourceItem(key=f"dir:{relative.as_posix()}", path=str(path), source=spec, collection=collection)
        )
    return items


_MAESTRO_SPLITS = {"train": "train", "validation": "valid", "valid": "valid", "test": "test"}


def _read_maestro_metadata(root: Path) -> list[dict]:
    """Rows of MAESTRO's metadata, from its CSV or its (column-oriented) JSON."""
    csvs = sorted(root.glob("maestro-v*.csv"))
    jsons = sorted(root.glob("maestro-v*.json"))
    if csvs:
        with open(csvs[-1], newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    if jsons:
        table = json.loads(jsons[-1].read_text(encoding="utf-8"))
        if isinstance(table, list):  # v2 json: a list of row objects
            return table
        columns = list(table)
        row_ids = list(table[columns[0]])
        return [{column: table[column].get(row_id) for column in columns} for row_id in row_ids]
    raise MusefmError(f"{root}: no maestro-v*.csv or maestro-v*.json metadata file (is it a MAESTRO folder?)")


def _maestro_items(spec: str, root: Path) -> list[SourceItem]:
    if not root.is_dir():
        raise MusefmError(f"{root}: not a directory (source {spec!r})")
    items = []
    for row_number, row in enumerate(_read_maestro_metadata(root), start=2):
        midi = row.get("midi_filename")
        if not midi:
            raise MusefmError(f"{root}: metadata row {row_number} has no midi_filename")
        split = _MAESTRO_SPLITS.get(str(row.get("split", "")).strip())
        audio = row.get("audio_filename")
        items.append(
            SourceItem(
                key=f"maestro:{Path(midi).with_suffix('').as_posix()}",
                path=str(root / midi),
                source=spec,
                collection="maestro",
                composer=row.get("canonical_composer") or None,
                title=row.get("canonical_title") or None,
                license=MAESTRO_LICENSE,
                split=split,
                audio_path=str(root / audio) if audio else None,
                extra={k: row[k] for k in ("year", "duration") if row.get(k) not in (None, "")},
            )
        )
    return items


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _midi_key(score: Score) -> tuple[str | None, str | None]:
    """Key label of a MIDI score: its first key signature, or a profile estimate from the notes."""
    import numpy as np

    pitches, durations = [], []
    for track in score.tracks:
        if track.is_drum:
            continue
        arrays = track.notes.numpy()
        pitches.append(arrays["pitch"])
        durations.append(arrays["duration"])
    if not pitches:
        return None, None
    pitches = np.concatenate(pitches)
    durations = np.concatenate(durations).astype(np.float64)
    if len(score.key_signatures):
        signature = score.key_signatures[0]
        if signature.tonality in (0, 1) and -7 <= signature.key <= 7:
            sharps = int(signature.key)
            # MIDI key signatures often say "major" by default: the notes decide the mode.
            return estimate_key(pitches, durations, sharps), "signature+profile"
    return estimate_key(pitches, durations), "profile"


def _time_signature_label(score: Score) -> str | None:
    if len(score.time_signatures):
        first = score.time_signatures[0]
        return f"{first.numerator}/{first.denominator}"
    return None


def _one_line(text: str | None) -> str | None:
    """Metadata as one line: encoders put line breaks inside names ('Philippe de Vitry\n(1291-1361)')."""
    return " ".join(text.split()) or None if text else None


def _composer(named: str | None, collection_composer: str | None) -> str | None:
    """The file's composer, spelled as the collection's when both name the same person."""
    named = _one_line(named)
    if not named:
        return collection_composer
    surname = collection_composer.split()[-1].lower() if collection_composer else None
    if surname and surname in named.replace(",", " ").lower().split():
        return collection_composer
    return named.strip()


def load_item(item: SourceItem, cache_dir: Path | None) -> list[Piece | Rejection]:
    """Read one file into pieces; problems come back as Rejections, never as exceptions."""
    path = Path(item.path)
    try:
        if not path.exists():
            raise BadInputError(path, "file not found")
        if path.suffix.lower() in MIDI_SUFFIXES:
            score = read_midi(path)
            key, key_source = _midi_key(score)
            meta = PieceMeta(
                id=item.key, source=item.source, path=item.path, collection=item.collection,
                composer=item.composer, title=item.title or path.stem, key=key, key_source=key_source,
                time_signature=_time_signature_label(score), license=item.license, split=item.split,
                audio_path=item.audio_path, extra=dict(item.extra),
            )
            return [Piece(score, meta)]
        tunes = load_notation_cached(path, cache_dir)
    except BadInputError as error:
        return [Rejection(item.path, error.reason, item.source)]

    results: list[Piece | Rejection] = []
    multi = len(tunes) > 1
    for score, info in tunes:
        label = f"{item.path}#{info.index}" if multi else item.path
        if info.error:
            results.append(Rejection(label, info.error, item.source))
            continue
        try:
            check_score(score, label)
        except BadInputError as error:
            results.append(Rejection(label, error.reason, item.source))
            continue
        meta = PieceMeta(
            id=f"{item.key}#{info.index}" if multi else item.key, source=item.source, path=item.path,
            collection=item.collection, composer=_composer(info.composer, item.composer),
            title=_one_line(info.title) or item.title or path.stem, key=info.key, key_source=info.key_source,
            time_signature=info.time_signature, license=_one_line(info.license) or item.license, split=item.split,
            audio_path=item.audio_path, extra=dict(item.extra),
        )
        results.append(Piece(score, meta))
    return results


def iter_pieces(spec: str, cache_dir: Path | None = None):
    """Every readable Piece of a source, in order (single process; the builder parallelises)."""
    for item in list_items(spec):
        for result in load_item(item, cache_dir):
            if isinstance(result, Piece):
                yield result


def load_piece(spec: str, cache_dir: Path | None = None) -> Piece:
    """The single piece a spec names (``music21:bach/bwv66.6``, ``dir:song.mid``...).

    A plain file path also works. Raises MusefmError with the reason when it cannot be read.
    """
    path = Path(spec)
    if ":" not in spec or path.exists():
        if not path.is_file():
            raise MusefmError(f"{spec}: file not found")
        items = [SourceItem(key=f"file:{path.name}", path=str(path), source=spec, collection=path.parent.name)]
    else:
        items = list_items(spec)
    for item in items:
        for result in load_item(item, cache_dir):
            if isinstance(result, Piece):
                return result
            raise MusefmError(f"{result.path}: {result.reason}")
    raise MusefmError(f"{spec}: no piece found")
