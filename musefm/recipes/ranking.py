"""MusicBERT's ranking tasks (Zeng et al. 2021, after PiRhDy): melody completion and accompaniment
suggestion, scored with MAP and HITS@k.

    python -m musefm.recipes.ranking model=runs/bert data=data/bach-octuple out=runs/rank \
        task=melody_completion num_candidates=50

- **Melody completion**: the query is the melody of a segment of ``segment_bars`` bars; the true
  candidate is the melody of the next segment of the same piece.
- **Accompaniment suggestion**: the query is the melody of a segment; the true candidate is the
  accompaniment (every other note) of the same segment.

In both, the other ``num_candidates - 1`` candidates are the same kind of part (melody or
accompaniment) from segments of *other* pieces of the same split, of the same time signature where
enough exist. A pair model scores each (query, candidate) pair, as MusicBERT does for these tasks:
the two Octuple sequences are concatenated as ``[BOS] query [EOS] candidate [EOS]`` and a pretrained
MusicBERT with a two-class head (``PieceClassifier``) is fine-tuned to tell the true candidate
(label 1) from a random negative (label 0), on pairs from training-split pieces only, one positive
and one fresh negative per query and epoch. Ranking is evaluated on test-split pieces, never trained
on: the candidates of a query are sorted by the score logit(true) - logit(other).

Metrics: ``map`` is the mean over queries of the average precision; with one relevant candidate per
query it equals the mean reciprocal rank of the true candidate. ``hits@k`` is the share of queries
whose true candidate ranks within the top k, for k in (1, 5, 10, 25) below ``num_candidates`` (at
k >= num_candidates it is 1 by construction). A tie with the true candidate counts against it, so a
scorer that gives everything the same score earns nothing. A random ranker is expected to score
MAP = H_K / K (H_K the K-th harmonic number) and HITS@k = k / K.

Definitions and deviations from the paper, all made because of how the Bach chorales come out of
``musefm data build --tokenizer octuple`` (all four voices merged in one program):

- The melody is the skyline: at each onset the highest note starting there, unless the melody note
  before it is still sounding at or above its pitch (an inner voice moving under a held soprano).
  The accompaniment is every other note. The paper took the melody from the dataset's tracks.
- Segments are fixed groups of ``segment_bars`` bars (the paper used annotated phrases, which the
  tokens do not carry); a segment counts when its melody (and, for accompaniment, its
  accompaniment) has at least ``min_notes`` notes.
- Nothing outside the music may give the answer away: each segment's bar numbers restart at 0 (the
  candidate of melody completion is numbered as the bars after the query, every candidate alike);
  velocity, tempo and program, constant within a chorale, are set to one value everywhere (their
  most common value in the training split); a negative is never note-for-note equal to the true
  candidate (several chorales harmonise the same tune).
- A pair longer than ``seq_len`` is cut: the query to at most ``(seq_len - 3) // 2`` notes (melody
  completion keeps its end, next to the continuation; accompaniment its beginning), the candidate
  to the room left (its beginning).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from musefm.errors import MusefmError

TASKS = ("melody_completion", "accompaniment")
HITS_AT = (1, 5, 10, 25)
NEUTRAL_FIELDS = ("velocity", "tempo", "program")  # piece-wide constants in a chorale
MODEL_DIR = "model"
LABEL_NAMES = ["other", "true"]  # the pair head's classes: column 1 is "candidate is the answer"


@dataclass
class RankingConfig:
    model: str = ""  # pretrained music-bert model or run directory, or "scratch" (random init of ``preset``)
    preset: str = "small"  # "scratch" only
    model_settings: dict = field(default_factory=dict)  # "scratch" only: overrides of the preset
    data: str = ""  # Octuple dataset (musefm data build --tokenizer octuple)
    out: str = ""
    task: Literal["melody_completion", "accompaniment"] = "melody_completion"
    num_candidates: int = 50  # per query: the true candidate and num_candidates - 1 negatives
    segment_bars: int = 2
    min_notes: int = 2
    max_queries: int = 0  # evaluated queries, drawn with the seed (0 = every test query)
    seq_len: int = 0  # pair length; 0 = the longest pair, at most the backbone's max_seq_len
    pooling: Literal["mean", "first"] = "mean"
    dropout: float = 0.1
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.01
    eval_every: int = 100
    eval_batches: int = 10
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = "auto"

    def validate(self) -> None:
        if self.task not in TASKS:
            raise MusefmError(f"task: must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.pooling not in ("mean", "first"):
            raise MusefmError(f"pooling: must be 'mean' or 'first', got {self.pooling!r}")
        if self.num_candidates < 2:
            raise MusefmError(f"num_candidates: must be >= 2, got {self.num_candidates}")
        for name in ("segment_bars", "min_notes", "steps", "batch_size", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise MusefmError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_queries < 0 or self.seq_len < 0 or self.warmup_steps < 0:
            raise MusefmError("max_queries, seq_len and warmup_steps must be >= 0")
        if self.seq_len and self.seq_len < 5:
            raise MusefmError(f"seq_len: a pair needs at least 5 rows, got {self.seq_len}")
        if self.lr <= 0:
            raise MusefmError(f"lr: must be > 0, got {self.lr}")
        if not 0.0 <= self.dropout < 1.0:
            raise MusefmError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.model_settings and self.model != "scratch":
            raise MusefmError("model_settings only apply to model=scratch (a pretrained model keeps its own)")


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def rank_of_true(scores, true_index: int = 0) -> int:
    """1-based rank of candidate ``true_index`` when ``scores`` are sorted high to low; every other
    candidate scoring at least as high ranks above it (ties count against the true candidate)."""
    scores = np.asarray(scores, dtype=np.float64)
    others = np.delete(scores, true_index)
    return 1 + int((others >= scores[true_index]).sum())


def ranking_metrics(ranks, num_candidates: int, ks=HITS_AT) -> dict:
    """MAP (= MRR: one relevant candidate per query), HITS@k for k < num_candidates, mean rank."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if not len(ranks):
        raise MusefmError("no query to score")
    if ranks.min() < 1 or ranks.max() > num_candidates:
        raise MusefmError(f"ranks must lie in 1..{num_candidates}")
    metrics = {"map": float(np.mean(1.0 / ranks))}
    metrics |= {f"hits@{k}": float(np.mean(ranks <= k)) for k in ks if k < num_candidates}
    return metrics | {"mean_rank": float(ranks.mean()), "queries": int(len(ranks))}


def random_ranker_metrics(num_candidates: int, ks=HITS_AT) -> dict:
    """Expected metrics of a ranker that orders candidates uniformly at random: the true candidate's
    rank is uniform on 1..K, so MAP = (1/K) sum 1/r = H_K / K and HITS@k = k / K."""
    harmonic = sum(1.0 / r for r in range(1, num_candidates + 1))
    metrics = {"map": harmonic / num_candidates}
    metrics |= {f"hits@{k}": k / num_candidates for k in ks if k < num_candidates}
    return metrics | {"mean_rank": (num_candidates + 1) / 2}


# --------------------------------------------------------------------------------------------
# Octuple rows: times, melody, segments
# --------------------------------------------------------------------------------------------


@dataclass
class OctupleLayout:
    """Where each field is, and id -> value tables, read from an Octuple tokenizer.

    Times are in position ticks (``resolution`` per beat of the time signature's denominator, as
    MidiTok counts them): a bar of n/d lasts n * resolution ticks.
    """

    fields: dict[str, int]  # field name -> column
    pitch: np.ndarray  # (V_pitch,) id -> MIDI pitch (-1 for specials)
    position_ticks: np.ndarray  # (V_position,) id -> tick in bar (-1 for specials)
    duration_ticks: np.ndarray  # (V_duration,) id -> ticks
    bar_number: np.ndarray  # (V_bar,) id -> bar number (-1 for specials)
    bar_id: np.ndarray  # (n_bars,) bar number -> id
    bar_ticks: np.ndarray  # (V_timesig,) id -> ticks per bar

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "OctupleLayout":
        from musefm.models.music_bert import octuple_fields

        names, _ = octuple_fields(tokenizer)
        fields = {name: index for index, name in enumerate(names)}
        missing = [name for name in ("pitch", "position", "bar", "duration", "timesig") if name not in fields]
        if missing:
            raise MusefmError(f"the ranking tasks need Octuple fields {missing} (this tokenizer has {names})")
        resolution = max(tokenizer.config.beat_res.values())

        def table(name, value) -> np.ndarray:
            vocabulary = tokenizer.vocab[fields[name]]
            values = np.full(len(vocabulary), -1, dtype=np.int64)
            for token, index in vocabulary.items():
                if not token.endswith("_None"):  # PAD_None, BOS_None ... are specials
                    values[index] = value(token.split("_", 1)[1])
            return values

        def duration(text: str) -> int:  # "beats.ticks.resolution"
            beats, ticks, per_beat = (int(part) for part in text.split("."))
            return beats * resolution + round(ticks * resolution / per_beat)

        def bar_length(text: str) -> int:  # "n/d": n beats of the denominator
            return int(text.split("/")[0]) * resolution

        bar_number = table("bar", int)
        bar_id = np.zeros(int(bar_number.max()) + 1, dtype=np.int64)
        bar_id[bar_number[bar_number >= 0]] = np.flatnonzero(bar_number >= 0)
        return cls(fields, table("pitch", int), table("position", int), table("duration", duration), bar_number, bar_id,
                   table("timesig", bar_length))

    def column(self, name: str) -> int:
        return self.fields[name]


def note_times(ids: np.ndarray, layout: OctupleLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(onset, end, bar) of every row of a piece's ids (T, F), in ticks and piece-wide bar numbers.

    Bar ids may wrap around the bar vocabulary, so a bar number is counted along the piece: it grows
    by the difference of consecutive bar ids modulo the vocabulary. A bar lasts what its notes' time
    signature says; a bar without notes as long as the one before it.
    """
    n_bars = len(layout.bar_id)
    raw = layout.bar_number[ids[:, layout.column("bar")]]  # (T,)
    steps = np.mod(np.diff(raw), n_bars)  # (T - 1,)
    bars = raw[0] + np.concatenate([[0], np.cumsum(steps)])  # (T,)
    lengths = np.zeros(int(bars.max()) + 1, dtype=np.int64)  # per bar: ticks
    present, first = np.unique(bars, return_index=True)
    lengths[present] = layout.bar_ticks[ids[first, layout.column("timesig")]]  # its first note's meter
    for bar in range(len(lengths)):
        if lengths[bar] <= 0:
            lengths[bar] = lengths[bar - 1] if bar else int(layout.bar_ticks.max())
    bar_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # (n,)
    onsets = bar_starts[bars] + layout.position_ticks[ids[:, layout.column("position")]]  # (T,)
    ends = onsets + np.maximum(layout.duration_ticks[ids[:, layout.column("duration")]], 1)
    return onsets, ends, bars


def skyline(onsets: np.ndarray, ends: np.ndarray, pitches: np.ndarray) -> np.ndarray:
    """Melody mask (T,): at each onset its highest note, unless the melody note before it still
    sounds at or above that pitch (then the onset belongs to a lower voice)."""
    order = np.lexsort((-pitches, onsets))  # by onset, highest pitch first
    melody = np.zeros(len(onsets), dtype=bool)
    sounding_until, sounding_pitch = -1, -1
    previous_onset = None
    for index in order:
        if onsets[index] == previous_onset:
            continue  # only the highest note of an onset can be melody
        previous_onset = onsets[index]
        if sounding_until > onsets[index] and pitches[index] <= sounding_pitch:
            continue
        melody[index] = True
        sounding_until, sounding_pitch = ends[index], pitches[index]
    return melody


@dataclass
class Segment:
    piece: str  # manifest id
    index: int  # segment number in the piece: bars [index * segment_bars, (index + 1) * segment_bars)
    melody: np.ndarray  # (n, F) rows, bars renumbered from 0
    accompaniment: np.ndarray  # (m, F)
    time_signature: int  # timesig id of its first note


def piece_segments(ids: np.ndarray, layout: OctupleLayout, segment_bars: int, piece: str = "") -> list[Segment]:
    """Every segment of a piece's ids (T, F) that holds at least one note, in order."""
    ids = np.asarray(ids, dtype=np.int64)
    if not len(ids):
        return []
    onsets, ends, bars = note_times(ids, layout)
    melody = skyline(onsets, ends, layout.pitch[ids[:, layout.column("pitch")]])
    numbers = bars // segment_bars  # (T,)
    segments = []
    for number in np.unique(numbers):
        inside = numbers == number
        rows = ids.copy()
        rows[:, layout.column("bar")] = layout.bar_id[(bars - number * segment_bars) % len(layout.bar_id)]
        first = int(np.flatnonzero(inside)[0])
        segments.append(Segment(piece, int(number), rows[inside & melody], rows[inside & ~melody],
                                int(ids[first, layout.column("timesig")])))
    return segments


# --------------------------------------------------------------------------------------------
# Examples, candidates and pairs
# --------------------------------------------------------------------------------------------


@dataclass
class Example:
    piece: str
    segment: int
    query: np.ndarray  # (n, F) melody
    answer: np.ndarray  # (m, F) the true candidate
    time_signature: int


class CandidatePool:
    """The parts negatives are drawn from: answer-kind parts of every usable segment of a split."""

    def __init__(self, parts: list[np.ndarray], pieces: list[str], time_signatures: list[int], key):
        self.parts, self.key = parts, key
        self.pieces = np.asarray(pieces, dtype=object)  # (P,)
        self.time_signatures = np.asarray(time_signatures, dtype=np.int64)  # (P,)
        self.keys = np.asarray([key(part) for part in parts], dtype=object)  # (P,)

    def __len__(self) -> int:
        return len(self.parts)

    def negatives(self, example: Example, count: int, rng: np.random.Generator) -> list[np.ndarray]:
        """``count`` distinct parts of other pieces, none equal to the answer; of the example's time
        signature first, topped up from the others when too few have it."""
        if not len(self.parts):
            eligible = np.zeros(0, dtype=bool)
        else:
            eligible = (self.pieces != example.piece) & (self.keys != self.key(example.answer))  # (P,)
        same = np.flatnonzero(eligible & (self.time_signatures == example.time_signature))
        other = np.flatnonzero(eligible & (self.time_signatures != example.time_signature))
        if len(same) + len(other) < count:
            raise MusefmError(f"piece {example.piece}: only {len(same) + len(other)} candidate parts from other "
                              f"pieces of its split, {count} needed (lower num_candidates or use more pieces)")
        chosen = rng.choice(same, size=min(count, len(same)), replace=False).tolist()
        if len(chosen) < count:
            chosen += rng.choice(other, size=count - len(chosen), replace=False).tolist()
        return [self.parts[index] for index in chosen]


class RankingTask:
    """Examples, candidate pools and pair encoding of one task on one Octuple dataset."""

    def __init__(self, dataset, task: str, segment_bars: int = 2, min_notes: int = 2):
        if task not in TASKS:
            raise MusefmError(f"task: must be one of {', '.join(TASKS)}, got {task!r}")
        tokenizer = dataset.tokenizer
        if not tokenizer.is_multi_voc:
            raise MusefmError(f"{dataset.root}: the ranking tasks need an Octuple dataset "
                              "(musefm data build --tokenizer octuple)")
        self.dataset, self.task, self.segment_bars, self.min_notes = dataset, task, segment_bars, min_notes
        self.layout = OctupleLayout.from_tokenizer(tokenizer)
        if 2 * segment_bars > len(self.layout.bar_id):
            raise MusefmError(f"segment_bars: {segment_bars} is more than half the {len(self.layout.bar_id)} bar tokens")
        self.fields = len(tokenizer.vocab)
        self.neutral = self._neutral_values()
        self._segments: dict[str, list[Segment]] = {}

    def _neutral_values(self) -> dict[int, int]:
        """Column -> id for the piece-wide fields: their most common id in the training split."""
        from musefm.recipes.finetune import neutral_field_ids

        names = [name for name in NEUTRAL_FIELDS if name in self.layout.fields]
        return dict(neutral_field_ids(self.dataset, names))

    def segments(self, piece_id: str) -> list[Segment]:
        if piece_id not in self._segments:
            ids = np.asarray(self.dataset.piece_ids(self.dataset.row(piece_id)), dtype=np.int64).copy()
            for column, value in self.neutral.items():
                ids[:, column] = value
            self._segments[piece_id] = piece_segments(ids, self.layout, self.segment_bars, piece_id)
        return self._segments[piece_id]

    def _usable(self, segment: Segment) -> bool:
        if len(segment.melody) < self.min_notes:
            return False
        return self.task == "melody_completion" or len(segment.accompaniment) >= self.min_notes

    def examples(self, split: str) -> list[Example]:
        """Every (query, true candidate) of the split's pieces, in manifest and segment order."""
        examples = []
        for row in self.dataset.rows(split):
            segments = [s for s in self.segments(row["id"]) if self._usable(s)]
            if self.task == "accompaniment":
                examples += [Example(s.piece, s.index, s.melody, s.accompaniment, s.time_signature) for s in segments]
                continue
            for current, following in zip(segments, segments[1:]):
                if following.index == current.index + 1:
                    examples.append(Example(current.piece, current.index, current.melody, following.melody,
                                            following.time_signature))
        return examples

    def pool(self, split: str) -> CandidatePool:
        parts, pieces, signatures = [], [], []
        for row in self.dataset.rows(split):
            for segment in self.segments(row["id"]):
                if self._usable(segment):
                    parts.append(segment.melody if self.task == "melody_completion" else segment.accompaniment)
                    pieces.append(segment.piece)
                    signatures.append(segment.time_signature)
        return CandidatePool(parts, pieces, signatures, self.part_key)

    def part_key(self, part: np.ndarray) -> bytes:
        """What makes two parts the same music: pitch, position, bar and duration of each note."""
        columns = [self.layout.column(name) for name in ("pitch", "position", "bar", "duration")]
        return np.ascontiguousarray(part[:, columns], dtype=np.int64).tobytes()

    def pair_length(self, examples: list[Example]) -> int:
        """Rows of the longest [BOS] query [EOS] answer [EOS] among ``examples``."""
        return 3 + max((len(e.query) + len(e.answer) for e in examples), default=0)

    def encode_pair(self, query: np.ndarray, candidate: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (L, F) and attention_mask (L,) of ``[BOS] query [EOS] candidate [EOS]``, padded."""
        from musefm.data.dataset import BOS, EOS, PAD

        query_room = (seq_len - 3) // 2
        query = query[-query_room:] if self.task == "melody_completion" else query[:query_room]
        candidate = candidate[: seq_len - 3 - len(query)]  # the room the query leaves
        if self.task == "melody_completion":
            candidate = candidate.copy()
            # The continuation's bars come after the query's, for every candidate alike.
            bars = self.layout.bar_number[candidate[:, self.layout.column("bar")]] + self.segment_bars
            candidate[:, self.layout.column("bar")] = self.layout.bar_id[bars % len(self.layout.bar_id)]
        special = lambda token: np.full((1, self.fields), token, dtype=np.int64)  # noqa: E731
        framed = np.concatenate([special(BOS), query, special(EOS), candidate, special(EOS)])  # (n, F)
        input_ids = np.full((seq_len, self.fields), PAD, dtype=np.int64)
        input_ids[: len(framed)] = framed
        mask = np.zeros(seq_len, dtype=bool)
        mask[: len(framed)] = True
        return torch.from_numpy(input_ids), torch.from_numpy(mask)

    def candidate_sets(self, split: str, num_candidates: int, seed: int, max_queries: int = 0):
        """[(example, candidates)] with the true candidate first, drawn with ``seed``; all the
        split's queries or ``max_queries`` of them (a seeded choice, kept in order)."""
        examples, pool = self.examples(split), self.pool(split)
        rng = np.random.default_rng([seed, 17])
        if max_queries and len(examples) > max_queries:
            examples = [examples[i] for i in sorted(rng.choice(len(examples), max_queries, replace=False))]
        return [(e, [e.answer, *pool.negatives(e, num_candidates - 1, rng)]) for e in examples]


class PairDataset:
    """Training pairs of a split for the trainer: item 2i is query i with its true candidate
    (label 1), item 2i + 1 query i with a negative drawn from (seed, epoch, index) (label 0)."""

    def __init__(self, task: RankingTask, split: str, seq_len: int, seed: int = 0):
        self.task, self.seq_len, self.seed, self.epoch = task, seq_len, seed, 0
        self.examples = task.examples(split)
        self.pool = task.pool(split)
        self.window = "pairs"

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 2 * len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index // 2]
        if index % 2 == 0:
            candidate, label = example.answer, 1
        else:
            rng = np.random.default_rng([self.seed, self.epoch, int(index)])
            candidate, label = self.pool.negatives(example, 1, rng)[0], 0
        input_ids, mask = self.task.encode_pair(example.query, candidate, self.seq_len)
        return {"input_ids": input_ids, "attention_mask": mask, "label": torch.tensor(label)}


@torch.no_grad()
def score_candidates(model, task: RankingTask, candidate_sets, seq_len: int, batch_size: int, device) -> list[np.ndarray]:
    """Per query, the pair model's score of each candidate: logit(true) - logit(other), (K,)."""
    model.eval()
    pairs = [(query_index, candidate) for query_index, (example, candidates) in enumerate(candidate_sets)
             for candidate in candidates]
    scores = []
    for start in range(0, len(pairs), batch_size):
        encoded = [task.encode_pair(candidate_sets[q][0].query, candidate, seq_len)
                   for q, candidate in pairs[start : start + batch_size]]
        mask = torch.stack([m for _, m in encoded])  # (B, L)
        length = int(mask.sum(dim=1).max())  # trailing padding is masked anyway: drop it
        input_ids = torch.stack([ids for ids, _ in encoded])[:, :length].to(device)  # (B, l, F)
        mask = mask[:, :length].to(device)  # (B, l)
        logits = model(input_ids, mask).float()  # (B, 2)
        scores.append((logits[:, 1] - logits[:, 0]).cpu().numpy())
    flat = np.concatenate(scores)
    bounds = np.cumsum([0] + [len(candidates) for _, candidates in candidate_sets])
    return [flat[bounds[i] : bounds[i + 1]] for i in range(len(candidate_sets))]


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


def _backbone(config: RankingConfig, dataset):
    """The MusicBERT to fine-tune: loaded from a run, or randomly initialised (seeded) for scratch."""
    from musefm.data.tokenize import load_tokenizer, tokenizer_fingerprint
    from musefm.models.base import family_class, load_pretrained
    from musefm.recipes.pretrain import PretrainConfig, model_config_for
    from musefm.training.checkpoint import resolve_model_dir
    from musefm.training.seed import seed_everything

    if config.model == "scratch":
        model_config = model_config_for(PretrainConfig(model="music-bert", preset=config.preset,
                                                       model_settings=dict(config.model_settings)), dataset.tokenizer)
        seed_everything(config.seed)
        return family_class("music-bert")(model_config), "scratch"
    directory = resolve_model_dir(config.model)
    backbone, _ = load_pretrained(directory)
    if backbone.family != "music-bert":
        raise MusefmError(f"{directory}: holds a {backbone.family} model; the ranking tasks need music-bert")
    tokenizer_path = directory / "tokenizer.json"
    if tokenizer_path.is_file() and (tokenizer_fingerprint(load_tokenizer(tokenizer_path))
                                     != tokenizer_fingerprint(dataset.tokenizer)):
        raise MusefmError(f"{config.data}: its tokenizer differs from the model's ({directory})")
    return backbone, str(directory)


def main(config: RankingConfig, overwrite: bool = False, stream=None) -> dict:
    """Fine-tune the pair model on training pieces, rank candidates of test pieces; returns the
    metrics (also in ``out/metrics.json``; per-query ranks in ``out/ranks.jsonl``)."""
    from musefm.data.dataset import open_dataset
    from musefm.models.classifier import ClassifierConfig, PieceClassifier
    from musefm.training.distributed import DistributedContext, pick_device
    from musefm.training.seed import seed_everything
    from musefm.training.trainer import TrainConfig, Trainer

    stream = stream or sys.stderr
    config.validate()
    if not config.model or not config.data or not config.out:
        raise MusefmError("ranking needs model (pretrained run, or scratch), data (Octuple dataset) and out")
    out = Path(config.out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MusefmError(f"{out}: is not empty; use overwrite to replace it")

    dataset = open_dataset(config.data)
    task = RankingTask(dataset, config.task, config.segment_bars, config.min_notes)
    backbone, backbone_name = _backbone(config, dataset)
    train_examples, test_examples = task.examples("train"), task.examples("test")
    if not train_examples or not test_examples:
        empty = "train" if not train_examples else "test"
        raise MusefmError(f"{config.data}: the {empty} split has no {config.task} query "
                          f"(segments of {config.segment_bars} bars with >= {config.min_notes} notes)")
    seq_len = config.seq_len or min(backbone.config.max_seq_len, task.pair_length(train_examples + test_examples))
    # Drawn before training, so a split too small for num_candidates fails before any work.
    candidate_sets = task.candidate_sets("test", config.num_candidates, config.seed, config.max_queries)

    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(dataset.root / "tokenizer.json", out / "tokenizer.json")
    seed_everything(config.seed)
    model = PieceClassifier(backbone, ClassifierConfig(label_names=LABEL_NAMES, pooling=config.pooling,
                                                       dropout=config.dropout, seq_len=seq_len))
    train_data = PairDataset(task, "train", seq_len, config.seed)
    valid_data = PairDataset(task, "valid", seq_len, config.seed)
    if not len(valid_data) or len(set(valid_data.pool.pieces)) < 2:
        valid_data = None  # negatives need a second piece
    train_config = TrainConfig(max_steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                               warmup_steps=min(config.warmup_steps, config.steps), weight_decay=config.weight_decay,
                               eval_every=config.eval_every, eval_batches=config.eval_batches,
                               save_every=config.steps, keep_last=1, log_every=max(1, min(10, config.eval_every)),
                               precision=config.precision, device=config.device, seed=config.seed)
    context = DistributedContext(device=pick_device(config.device))  # one process: pairs are cheap
    print(f"ranking {config.task}: {len(train_examples)} training queries from {len(dataset.rows('train'))} pieces, "
          f"pairs of {seq_len} rows, backbone {backbone_name}", file=stream)
    summary = Trainer(model, train_data, valid_data, train_config, out, out / "tokenizer.json", context, stream).fit()
    if (out / "best" / "model.safetensors").is_file():
        model = PieceClassifier.from_pretrained(out / "best", map_location=str(context.device))
    model.save_pretrained(out / MODEL_DIR, out / "tokenizer.json")

    scores = score_candidates(model, task, candidate_sets, seq_len, 4 * config.batch_size, context.device)
    ranks = [rank_of_true(s) for s in scores]
    metrics = ranking_metrics(ranks, config.num_candidates)
    result = {"task": config.task, "split": "test", "num_candidates": config.num_candidates, **metrics,
              "random": random_ranker_metrics(config.num_candidates), "backbone": backbone_name,
              "segment_bars": config.segment_bars, "seq_len": seq_len, "steps": summary["step"],
              "train_queries": len(train_examples), "test_pieces": len({e.piece for e, _ in candidate_sets}),
              "model_dir": str(out / MODEL_DIR)}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    (out / "ranks.jsonl").write_text("".join(json.dumps({"piece": e.piece, "segment": e.segment, "rank": r}) + "\n"
                                             for (e, _), r in zip(candidate_sets, ranks)))
    hits = ", ".join(f"{key.upper()} {value:.3f}" for key, value in metrics.items() if key.startswith("hits@"))
    print(f"test: MAP {metrics['map']:.3f}, {hits} over {metrics['queries']} queries of {config.num_candidates} "
          f"candidates (random: MAP {result['random']['map']:.3f})", file=stream)
    return result


if __name__ == "__main__":
    from musefm.config import apply_overrides

    try:
        main(apply_overrides(RankingConfig(), [a for a in sys.argv[1:] if a != "--overwrite"]),
             overwrite="--overwrite" in sys.argv[1:])
    except MusefmError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
