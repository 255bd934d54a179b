"""Infilling bars: MusicBERT mask-predict, MusicLM sample-and-rerank, the CLI, and MusicLM.generate."""

import json
import os

import numpy as np
import pytest
import torch

from musefm.data.tokenize import bar_token_ids, decode, encode, make_tokenizer, save_tokenizer, score_notes
from musefm.errors import MusefmError
from musefm.generation.infill import check_bars, notes_between
from musefm.generation.infill_bert import infill_music_bert
from musefm.generation.infill_lm import infill_music_lm
from musefm.models.music_bert import MusicBERT, config_from_preset as bert_preset, octuple_fields
from musefm.models.music_lm import MusicLM, config_from_preset as lm_preset
from tests.conftest import make_score

QUIET = open(os.devnull, "w")
BAR_QUARTERS = 4  # the piece is in 4/4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def piece():
    """Six bars of 4/4: a melody (program 0) and a bass (program 32)."""
    return make_score(pitches=tuple(55 + (k * 5) % 20 for k in range(24)), chord=True)


@pytest.fixture(scope="module")
def remi():
    tokenizer = make_tokenizer("remi")
    torch.manual_seed(0)
    # A context long enough that scoring's sliding window is a plain forward pass.
    model = MusicLM(lm_preset("debug", vocab_size=len(tokenizer), max_seq_len=512)).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def octuple():
    tokenizer = make_tokenizer("octuple")
    names, sizes = octuple_fields(tokenizer)
    torch.manual_seed(0)
    return MusicBERT(bert_preset("debug", field_names=names, field_vocab_sizes=sizes)).eval(), tokenizer


def notes_outside(score, first, last):
    """Notes (onset, pitch, duration, velocity, program) that start outside bars first..last."""
    start, end = first * BAR_QUARTERS, (last + 1) * BAR_QUARTERS
    return [note for note in score_notes(score) if not start <= note[0] < end]


# -- MusicBERT ---------------------------------------------------------------------------------------------


def test_music_bert_infill_keeps_the_rest_and_decodes_into_the_bars(octuple, piece):
    model, tokenizer = octuple
    original = encode(tokenizer, piece).astype(np.int64)
    result = infill_music_bert(model, tokenizer, piece, (2, 3), iterations=4, seed=3)
    start, end = result.span
    bars = original[:, tokenizer.vocab_types_idx["Bar"]] - 4  # Bar_k has id k + 4
    assert (start, end) == (np.searchsorted(bars, 2), np.searchsorted(bars, 3, side="right"))  # one slot per note
    np.testing.assert_array_equal(result.ids[:start], original[:start])
    np.testing.assert_array_equal(result.ids[end:], original[end:])
    filled = result.ids[start:end]
    id_to_name = [{token_id: name for name, token_id in vocabulary.items()} for vocabulary in tokenizer.vocab]
    for row in filled:
        fields = dict(id_to_name[f][int(token_id)].split("_", 1) for f, token_id in enumerate(row))
        assert 2 <= int(fields["Bar"]) <= 3 and 0 <= int(fields["Position"]) < 32  # 32 positions in a 4/4 bar
        assert "Pitch" in fields and int(fields["Program"]) in (0, 32)  # the piece's instruments
        assert fields["TimeSig"] == "4/4"
    # Decodes: the same notes outside bars 2..3, every slot a note inside them.
    reference = decode(tokenizer, original)
    assert notes_outside(result.score, 2, 3) == notes_outside(reference, 2, 3)
    assert notes_between(result.score, 8, 16) == end - start
    assert score_notes(decode(tokenizer, result.ids)) == score_notes(result.score)
    assert len(result.log_probs) == end - start and (result.log_probs <= 0).all()


def test_music_bert_mask_predict_schedule_and_seed(octuple, piece, monkeypatch):
    model, tokenizer = octuple
    calls = []
    forward = MusicBERT.forward
    monkeypatch.setattr(MusicBERT, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    once = infill_music_bert(model, tokenizer, piece, (1, 1), iterations=1, seed=0, num_notes=5)
    assert len(calls) == 1 and once.details["remasked"] == [5 * 6]  # 5 slots x 6 note fields, predicted once
    assert once.span[1] - once.span[0] == 5 and notes_between(once.score, 4, 8) == 5

    calls.clear()
    result = infill_music_bert(model, tokenizer, piece, (1, 2), iterations=5, seed=0)
    remasked, total = result.details["remasked"], result.details["remasked"][0]
    assert len(calls) == result.details["passes"] == 5 == len(remasked)
    # Linearly fewer entries re-masked each pass (coupled fields may add a few).
    for k, count in enumerate(remasked[1:], start=1):
        assert total * (5 - k) // 5 <= count < total
    assert remasked[-1] < remasked[1]

    again = infill_music_bert(model, tokenizer, piece, (1, 2), iterations=5, seed=0)
    other = infill_music_bert(model, tokenizer, piece, (1, 2), iterations=5, seed=1)
    np.testing.assert_array_equal(again.ids, result.ids)
    assert not np.array_equal(other.ids, result.ids)
    greedy = [infill_music_bert(model, tokenizer, piece, (1, 2), iterations=3, seed=s, greedy=True).ids for s in (0, 1)]
    np.testing.assert_array_equal(*greedy)


# -- MusicLM -----------------------------------------------------------------------------------------------


def full_forward_scores(model, prompt, candidates, right):
    """log p(candidate + right | prompt) per candidate, from one uncached forward pass each."""
    totals = []
    with torch.no_grad():
        for candidate in candidates:
            sequence = torch.as_tensor(np.concatenate([prompt, candidate, right]))
            log_probs = torch.log_softmax(model(sequence[None]).logits[0, :-1].float(), -1)  # (T - 1, V)
            token_log_probs = log_probs.gather(-1, sequence[1:, None])[:, 0]
            totals.append(float(token_log_probs[len(prompt) - 1 :].sum()))
    return np.array(totals)


def test_music_lm_infill_keeps_the_rest_and_picks_the_best_candidate(remi, piece):
    model, tokenizer = remi
    original = encode(tokenizer, piece).astype(np.int64)
    starts = np.flatnonzero(np.isin(original, bar_token_ids(tokenizer)))
    result = infill_music_lm(model, tokenizer, piece, (2, 3), num_candidates=4, seed=0)
    start, end = result.span
    np.testing.assert_array_equal(result.ids[:start], original[: starts[2]])
    np.testing.assert_array_equal(result.ids[end:], original[starts[4] :])
    new = result.ids[start:end]
    new_bars = np.flatnonzero(np.isin(new, bar_token_ids(tokenizer)))
    assert len(new_bars) == 2 and new_bars[0] == 0  # exactly bars 2 and 3
    assert all(tokenizer[int(new[b + 1])] == "TimeSig_4/4" for b in new_bars)
    assert not any(tokenizer[int(t)].startswith("Tempo_") for t in new)
    reference = decode(tokenizer, original)
    assert notes_outside(result.score, 2, 3) == notes_outside(reference, 2, 3)
    assert score_notes(decode(tokenizer, result.ids)) == score_notes(result.score)

    # The chosen candidate has the best log p(candidate | left) + log p(right | left, candidate).
    prompt = np.concatenate([[1], original[: starts[2]]])  # BOS + left
    right = np.concatenate([original[starts[4] :], [2]])  # right + EOS
    totals = full_forward_scores(model, prompt, result.candidates, right)
    np.testing.assert_allclose(totals, result.details["scores"], atol=2e-3)
    assert result.details["chosen"] == int(np.argmax(totals))
    np.testing.assert_array_equal(new, result.candidates[result.details["chosen"]])
    assert len(result.log_probs) == len(new) and (result.log_probs <= 0).all()

    again = infill_music_lm(model, tokenizer, piece, (2, 3), num_candidates=4, seed=0)
    other = infill_music_lm(model, tokenizer, piece, (2, 3), num_candidates=4, seed=1)
    np.testing.assert_array_equal(again.ids, result.ids)
    assert not np.array_equal(other.ids, result.ids)


def test_music_lm_infill_first_and_last_bars(remi, piece):
    model, tokenizer = remi
    reference = decode(tokenizer, encode(tokenizer, piece))
    opening = infill_music_lm(model, tokenizer, piece, (0, 0), num_candidates=2, seed=0, max_bar_tokens=16)
    # The piece still states its tempo where MidiTok writes it.
    assert [tokenizer[int(t)] for t in opening.ids[:4]] == ["Bar_None", "TimeSig_4/4", "Position_0", "Tempo_100.97"]
    assert notes_outside(opening.score, 0, 0) == notes_outside(reference, 0, 0)
    assert [t.qpm for t in opening.score.tempos] == [t.qpm for t in reference.tempos]
    ending = infill_music_lm(model, tokenizer, piece, (5, 5), num_candidates=2, seed=0, max_bar_tokens=16)
    assert notes_outside(ending.score, 5, 5) == notes_outside(reference, 5, 5)
    assert ending.details["right_context_tokens"] == 1  # only the EOS is left to score


def test_bad_bars_and_tokenizers_fail_in_one_line(remi, octuple, piece):
    model, tokenizer = remi
    cases = [
        (lambda: check_bars((3, 2), 6), "comes after"),
        (lambda: check_bars((0, 6), 6), "outside"),
        (lambda: check_bars((-1, 0), 6), "outside"),
        (lambda: infill_music_lm(model, make_tokenizer("tsd"), piece, (0, 0)), "no Bar tokens"),
        (lambda: infill_music_bert(octuple[0], tokenizer, piece, (0, 0)), "Octuple"),
        (lambda: infill_music_lm(model, tokenizer, piece, (0, 0), num_candidates=0), "num_candidates"),
        (lambda: infill_music_bert(*octuple, piece, (0, 0), iterations=0), "iterations"),
    ]
    for call, message in cases:
        with pytest.raises(MusefmError) as caught:
            call()
        assert message in str(caught.value) and "\n" not in str(caught.value)


def test_music_lm_generate_returns_ids_and_score(remi):
    model, tokenizer = remi
    ids, score = model.generate(tokenizer, max_new_tokens=30, seed=4)
    again, _ = model.generate(tokenizer, max_new_tokens=30, seed=4)
    assert ids[0] == 1 and 1 < len(ids) <= 31
    np.testing.assert_array_equal(ids, again)
    body = ids[~np.isin(ids, tokenizer.special_tokens_ids)]
    assert score.note_num() == decode(tokenizer, body).note_num() > 0  # constrained: every note group decodes
    continued, _ = model.generate(tokenizer, ids, max_new_tokens=5, seed=4)
    np.testing.assert_array_equal(continued[: len(ids)], ids)


# -- musefm generate --infill ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, remi, octuple, piece):
    root = tmp_path_factory.mktemp("infill")
    piece.dump_midi(str(root / "piece.mid"))
    dirs = {}
    for name, (model, tokenizer) in (("lm", remi), ("bert", octuple)):
        dirs[name] = model.save_pretrained(root / name)
        save_tokenizer(tokenizer, dirs[name] / "tokenizer.json")
    return root, dirs


@pytest.mark.parametrize("family", ["lm", "bert"])
def test_generate_infill_writes_files(model_dirs, family, tmp_path):
    from musefm.cli import main as cli

    root, dirs = model_dirs
    out = tmp_path / "out"
    code = cli(["generate", "--model", str(dirs[family]), "--prompt", str(root / "piece.mid"), "--infill", "3:4",
                "--out", str(out), "--num-samples", "2", "--infill-candidates", "2", "--infill-iterations", "3",
                "--no-audio"])
    assert code == 0
    records = [json.loads((out / f"sample_{k:02d}.json").read_text()) for k in range(2)]
    for record in records:
        assert (out / record["files"]["midi"]).is_file() and (out / record["files"]["pianoroll"]).is_file()
        assert record["infill"]["bars"] == [3, 4] and record["infill"]["quarters"] == [8.0, 16.0]  # 1-based bars
        assert record["num_tokens"] == len(record["token_ids"]) and record["generated_notes"] > 0
        assert record["model_family"] == ("music-lm" if family == "lm" else "music-bert")
    assert records[0]["seed"] == 0 and records[1]["seed"] == 1 and records[0]["token_ids"] != records[1]["token_ids"]
    from symusic import Score

    written = Score(str(out / "sample_00.mid"))
    original = Score(str(root / "piece.mid"))
    # Bars 1-2 and 5-6 as they were (compared in quarter notes; MIDI keeps the pitches and onsets).
    assert [n[:2] for n in notes_outside(written, 2, 3)] == [n[:2] for n in notes_outside(original, 2, 3)]


def test_generate_infill_bad_input_fails_in_one_line_before_writing(model_dirs, tmp_path):
    from musefm.recipes.generate import GenerateConfig, main

    root, dirs = model_dirs
    out = tmp_path / "out"
    prompt = str(root / "piece.mid")
    cases = [
        (dict(model=str(dirs["lm"]), infill="2:3"), "needs --prompt"),
        (dict(model=str(dirs["lm"]), prompt=prompt, infill="4:3"), "not a range"),
        (dict(model=str(dirs["lm"]), prompt=prompt, infill="0:1"), "numbered from 1"),
        (dict(model=str(dirs["lm"]), prompt=prompt, infill="three"), "expected I:J"),
        (dict(model=str(dirs["bert"]), prompt=prompt, infill="6:7"), "has bars 1..6"),
        (dict(model=str(dirs["lm"]), prompt=prompt, infill="6:7"), "has bars 1..6"),
        (dict(model=str(dirs["lm"]), prompt=prompt, infill="1:1", prompt_bars=0, max_tokens=10), "max_tokens"),
        (dict(model=str(dirs["lm"]), prompt=prompt, infill="1:1", constrained=False), "token grammar"),
        (dict(model=str(dirs["bert"]), prompt=prompt), "can only infill"),
    ]
    for settings, message in cases:
        with pytest.raises(MusefmError) as caught:
            main(GenerateConfig(out=str(out), render=False, **settings), stream=QUIET)
        text = str(caught.value)
        assert message in text and "\n" not in text, (settings, text)
        assert not out.exists(), settings
