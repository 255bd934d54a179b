"""Ranking tasks: metrics on hand-computed cases, melody extraction, pair construction, the recipe."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from symusic import Note, Score, Tempo, TimeSignature, Track

from musefm.data.build import BuildConfig, build_dataset
from musefm.data.dataset import BOS, EOS, open_dataset
from musefm.data.tokenize import encode, make_tokenizer
from musefm.errors import MusefmError
from musefm.recipes.ranking import (OctupleLayout, PairDataset, RankingConfig, RankingTask, main as ranking,
                                    note_times, random_ranker_metrics, rank_of_true, ranking_metrics, skyline)

QUIET = open(os.devnull, "w")
TPQ = 480
pytestmark = pytest.mark.usefixtures("one_thread")


def chorale(seed: int, bars: int = 8) -> Score:
    """A 4/4 three-voice piece at ``seed``'s own tempo: a soprano in quarters (high register), an
    alto in half notes and a bass in whole notes below it; all voices in one track, as the Bach
    chorales come out of the build."""
    rng = np.random.default_rng(seed)
    score = Score(TPQ)
    score.tempos.append(Tempo(0, 60.0 + 10 * seed))
    score.time_signatures.append(TimeSignature(0, 4, 4))
    track = Track(name="choir", program=0, is_drum=False)
    for beat in range(4 * bars):
        track.notes.append(Note(beat * TPQ, TPQ, int(rng.integers(67, 80)), 80))
        if beat % 2 == 0:
            track.notes.append(Note(beat * TPQ, 2 * TPQ, int(rng.integers(55, 64)), 80))
        if beat % 4 == 0:
            track.notes.append(Note(beat * TPQ, 4 * TPQ, int(rng.integers(40, 50)), 80))
    score.tracks.append(track)
    return score


@pytest.fixture(scope="module")
def chorales(tmp_path_factory):
    root = tmp_path_factory.mktemp("chorales")
    for seed in range(12):
        chorale(seed).dump_midi(str(root / f"c{seed:02d}.mid"))
    out = tmp_path_factory.mktemp("chorales-ds") / "octuple"
    build_dataset(BuildConfig(sources=[f"dir:{root}"], out=str(out), workers=1, tokenizer="octuple",
                              valid_fraction=0.15, test_fraction=0.3), stream=QUIET)
    dataset = open_dataset(out)
    splits = [row["split"] for row in dataset.manifest]
    assert splits.count("test") >= 3 and splits.count("train") >= 5, splits  # what the tests below need
    return out


# ---- metrics --------------------------------------------------------------------------------


def test_metrics_equal_hand_computed_values():
    metrics = ranking_metrics([1, 2, 4], num_candidates=10)
    assert metrics["map"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 3)  # one relevant item: MAP = MRR
    assert metrics["hits@1"] == pytest.approx(1 / 3)
    assert metrics["hits@5"] == pytest.approx(1.0)
    assert "hits@10" not in metrics and "hits@25" not in metrics  # k >= K is 1 by construction
    assert metrics["mean_rank"] == pytest.approx(7 / 3) and metrics["queries"] == 3
    assert ranking_metrics([3, 30], 50)["hits@25"] == pytest.approx(0.5)
    with pytest.raises(MusefmError, match="1..10"):
        ranking_metrics([11], 10)

    assert rank_of_true([0.9, 0.1, 0.5]) == 1
    assert rank_of_true([0.5, 0.9, 0.5, 0.1]) == 3  # a tie counts against the true candidate
    assert rank_of_true([0.2, 0.9, 0.7], true_index=2) == 2
    assert rank_of_true([1.0] * 5) == 5  # a constant scorer earns nothing

    random = random_ranker_metrics(4)
    assert random["map"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)  # H_4 / 4 = 25/48
    assert random["hits@1"] == pytest.approx(1 / 4) and random["mean_rank"] == pytest.approx(2.5)
    assert random_ranker_metrics(50)["hits@25"] == pytest.approx(0.5)


def test_random_scores_reach_the_random_ranker_expectation():
    rng = np.random.default_rng(0)
    ranks = [rank_of_true(scores) for scores in rng.random((20000, 10))]
    measured, expected = ranking_metrics(ranks, 10), random_ranker_metrics(10)
    for key in ("map", "hits@1", "hits@5"):
        assert measured[key] == pytest.approx(expected[key], abs=0.01), key


# ---- melody and segments ------------------------------------------------------------------------


def test_skyline_follows_the_top_voice_through_held_notes():
    score = Score(TPQ)
    score.tempos.append(Tempo(0, 100.0))
    score.time_signatures.append(TimeSignature(0, 4, 4))
    track = Track(name="choir", program=0, is_drum=False)
    soprano = [(0, 2, 72), (2, 1, 74), (3, 1, 76), (4, 4, 77)]  # (beat, beats, pitch); bar 2 is one whole note
    inner = [(0, 1, 64), (1, 1, 65), (2, 2, 67), (4, 1, 65), (5, 1, 67), (6, 2, 69), (4, 4, 48)]
    for beat, beats, pitch in soprano + inner:
        track.notes.append(Note(beat * TPQ, beats * TPQ, pitch, 80))
    score.tracks.append(track)
    tokenizer = make_tokenizer("octuple")
    ids = encode(tokenizer, score).astype(np.int64)
    layout = OctupleLayout.from_tokenizer(tokenizer)
    onsets, ends, bars = note_times(ids, layout)
    pitches = layout.pitch[ids[:, layout.column("pitch")]]
    # 8 ticks a quarter: onsets and ends are the notes' own times, bars count from 0.
    notes = sorted((b * 8, (b + n) * 8, p, b // 4) for b, n, p in soprano + inner)
    assert sorted(zip(onsets.tolist(), ends.tolist(), pitches.tolist(), bars.tolist())) == notes
    melody = skyline(onsets, ends, pitches)
    # The alto's moves under a held soprano note (beats 1, 5, 6) are not melody.
    assert sorted(zip(onsets[melody].tolist(), pitches[melody].tolist())) == [(b * 8, p) for b, _, p in soprano]


def test_pairs_are_true_continuations_negatives_are_other_pieces_and_test_is_never_trained(chorales):
    dataset = open_dataset(chorales)
    split_of = {row["id"]: row["split"] for row in dataset.manifest}
    task = RankingTask(dataset, "melody_completion", segment_bars=2)
    examples = task.examples("train")
    # 12 pieces of 8 bars (+ no pickup): 4 segments each, so 3 consecutive pairs per piece.
    assert len(examples) == 3 * sum(1 for s in split_of.values() if s == "train")
    for example in examples:
        segments = task.segments(example.piece)
        following = next(s for s in segments if s.index == example.segment + 1)
        current = next(s for s in segments if s.index == example.segment)
        assert np.array_equal(example.answer, following.melody) and np.array_equal(example.query, current.melody)
        assert len(example.query) == 8  # the soprano's 8 quarter notes of 2 bars, nothing else
    assert {split_of[p] for p in {e.piece for e in examples}} == {"train"}

    # Negatives: other pieces of the same split, never the true answer.
    rng = np.random.default_rng(0)
    pool = task.pool("train")
    assert set(pool.pieces) <= {p for p, s in split_of.items() if s == "train"}
    where = {task.part_key(part): piece for part, piece in zip(pool.parts, pool.pieces)}
    for example in examples[:6]:
        for negative in pool.negatives(example, 5, rng):
            assert where[task.part_key(negative)] != example.piece
            assert task.part_key(negative) != task.part_key(example.answer)

    # Every training pair is made of training pieces only (their queries and their candidates).
    train = PairDataset(task, "train", seq_len=32, seed=0)
    train_parts = {task.part_key(part) for part in pool.parts}
    test_parts = {task.part_key(part) for part in task.pool("test").parts}
    assert train_parts.isdisjoint(test_parts)
    labels = []
    for index in range(len(train)):
        item = train[index]
        ids = item["input_ids"][item["attention_mask"]].numpy()
        separator = int(np.flatnonzero(ids[1:, 0] == EOS)[0]) + 1
        candidate = ids[separator + 1 : -1].copy()
        candidate[:, task.layout.column("bar")] -= 2  # numbered after the query's 2 bars: undo
        assert task.part_key(candidate) in train_parts
        labels.append(int(item["label"]))
    assert labels == [1, 0] * len(examples)


def test_pair_encoding_hides_piece_constants(chorales):
    dataset = open_dataset(chorales)
    task = RankingTask(dataset, "melody_completion", segment_bars=2)
    example = task.examples("train")[0]
    ids, mask = task.encode_pair(example.query, example.answer, seq_len=24)
    assert ids.shape == (24, 8) and int(mask.sum()) == 3 + 8 + 8
    assert (ids[0] == BOS).all() and (ids[9] == EOS).all() and (ids[18] == EOS).all() and (ids[19:] == 0).all()
    bar = task.layout.column("bar")
    assert task.layout.bar_number[ids[1:9, bar]].tolist() == [0] * 4 + [1] * 4
    assert task.layout.bar_number[ids[10:18, bar]].tolist() == [2] * 4 + [3] * 4  # continues the query
    # Tempo (different in every piece) and velocity are one value in every pair.
    pool = task.pool("train")
    for column in (task.layout.column("tempo"), task.layout.column("velocity")):
        assert len({int(v) for part in pool.parts for v in part[:, column]}) == 1
    # Too short a pair: the query keeps its end, the candidate its beginning.
    ids, mask = task.encode_pair(example.query, example.answer, seq_len=9)
    assert torch.equal(ids[1:4], torch.from_numpy(example.query[-3:]))
    assert torch.equal(ids[5:8, 0], torch.from_numpy(example.answer[:3, 0])) and int(mask.sum()) == 9


def test_accompaniment_pairs_a_melody_with_its_own_lower_voices(chorales):
    dataset = open_dataset(chorales)
    task = RankingTask(dataset, "accompaniment", segment_bars=2)
    examples = task.examples("test")
    assert len(examples) == 4 * sum(1 for row in dataset.manifest if row["split"] == "test")
    layout = task.layout
    for example in examples:
        segment = task.segments(example.piece)[example.segment]
        assert np.array_equal(example.answer, segment.accompaniment)
        # 2 bars: 4 alto half notes and 2 bass whole notes, all below every melody note.
        assert len(example.answer) == 6 and len(example.query) == 8
        assert layout.pitch[example.answer[:, 0]].max() < layout.pitch[example.query[:, 0]].min()
    sets = task.candidate_sets("test", num_candidates=5, seed=3)
    again = task.candidate_sets("test", num_candidates=5, seed=3)
    for (example, candidates), (_, repeated) in zip(sets, again):
        assert len(candidates) == 5 and candidates[0] is example.answer
        assert all(np.array_equal(a, b) for a, b in zip(candidates, repeated))
    with pytest.raises(MusefmError, match="needed"):
        task.candidate_sets("test", num_candidates=1000, seed=0)


# ---- the recipe -------------------------------------------------------------------------------


def _save_backbone(dataset_dir: Path, out: Path) -> Path:
    from musefm.models.base import family_class
    from musefm.recipes.pretrain import PretrainConfig, model_config_for

    config = model_config_for(PretrainConfig(model="music-bert", preset="debug"), open_dataset(dataset_dir).tokenizer)
    torch.manual_seed(0)
    family_class("music-bert")(config).save_pretrained(out)
    shutil.copyfile(dataset_dir / "tokenizer.json", out / "tokenizer.json")
    return out


def _config(data, out, **overrides) -> RankingConfig:
    settings = dict(model="scratch", preset="debug", data=str(data), out=str(out), num_candidates=6, steps=6,
                    batch_size=8, lr=1e-3, warmup_steps=1, eval_every=3, eval_batches=1, seed=1, precision="fp32",
                    device="cpu")
    return RankingConfig(**(settings | overrides))


def test_main_ranks_test_queries_and_the_seed_reproduces_it(chorales, tmp_path):
    first = ranking(_config(chorales, tmp_path / "a"), stream=QUIET)
    test_pieces = sum(1 for row in open_dataset(chorales).manifest if row["split"] == "test")
    assert first["queries"] == 3 * test_pieces and first["test_pieces"] == test_pieces
    assert 0.0 <= first["map"] <= 1.0 and 0.0 <= first["hits@1"] <= first["hits@5"] <= 1.0
    assert first["map"] >= 1 / 6  # the worst rank is 6
    assert first["random"]["map"] == pytest.approx(sum(1 / r for r in range(1, 7)) / 6)
    written = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert written["map"] == first["map"]
    ranks = [json.loads(line)["rank"] for line in (tmp_path / "a" / "ranks.jsonl").read_text().splitlines()]
    assert np.mean([1 / r for r in ranks]) == pytest.approx(first["map"])
    assert (tmp_path / "a" / "model" / "model.safetensors").is_file()

    second = ranking(_config(chorales, tmp_path / "b"), stream=QUIET)
    drop = lambda result: {k: v for k, v in result.items() if k != "model_dir"}  # noqa: E731
    assert drop(second) == drop(first)
    with pytest.raises(MusefmError, match="not empty"):
        ranking(_config(chorales, tmp_path / "a"), stream=QUIET)


def test_main_on_a_pretrained_directory_for_accompaniment(chorales, tmp_path):
    backbone = _save_backbone(chorales, tmp_path / "bert")
    result = ranking(_config(chorales, tmp_path / "acc", model=str(backbone), task="accompaniment",
                             max_queries=5), stream=QUIET)
    assert result["queries"] == 5 and result["backbone"] == str(backbone)
    assert 1 / 6 <= result["map"] <= 1.0 and result["task"] == "accompaniment"


def test_bad_settings_fail_with_one_line(chorales, tmp_path):
    with pytest.raises(MusefmError, match="task"):
        RankingConfig(task="harmony").validate()
    with pytest.raises(MusefmError, match="num_candidates"):
        RankingConfig(num_candidates=1).validate()
    with pytest.raises(MusefmError, match="model_settings"):
        RankingConfig(model="runs/x", model_settings={"d_model": 8}).validate()
    with pytest.raises(MusefmError, match="needed"):
        ranking(_config(chorales, tmp_path / "big", num_candidates=500), stream=QUIET)
