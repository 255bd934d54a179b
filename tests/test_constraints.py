import numpy as np
import pytest
import torch
from symusic import Note, Score, Tempo, TimeSignature, Track

from musefm.data import corpus
from musefm.data.tokenize import decode, encode, make_tokenizer
from musefm.errors import MusefmError
from musefm.generation.constraints import GrammarConstraint, scale_pitch_classes
from musefm.generation.sampling import sample, sample_batch
from musefm.models.music_lm import MusicLM, config_from_preset
from tests.conftest import make_score

BOS, EOS = 1, 2
GRAMMARS = ("remi", "tsd")


@pytest.fixture(scope="module")
def tokenizers():
    return {name: make_tokenizer(name) for name in GRAMMARS}


@pytest.fixture(scope="module")
def models(tokenizers):
    """A random-initialised debug MusicLM per tokenizer: nearly uniform logits, the hardest case."""
    built = {}
    for name, tokenizer in tokenizers.items():
        torch.manual_seed(0)
        built[name] = MusicLM(config_from_preset("debug", vocab_size=len(tokenizer)))
    return built


def token_ids(tokenizer, *tokens) -> list[int]:
    return [tokenizer._vocab_base[token] for token in tokens]


def token_names(tokenizer, ids) -> list[str]:
    return [tokenizer[int(i)] for i in ids]


def varied_scores() -> list[Score]:
    """Scores that exercise every grammar path: meter and tempo changes, drums, empty bars, 6/8, chords."""
    scores = [make_score(), make_score(chord=True, numerator=3, qpm=132.0),
              make_score(tpq=384, numerator=6, denominator=8, pitches=(62, 64, 66, 67, 69, 71, 73, 74, 76))]
    changing = Score(480)
    # 4/4 for two bars, 3/4 for two, then 7/8.
    changing.time_signatures.extend([TimeSignature(0, 4, 4), TimeSignature(2 * 1920, 3, 4),
                                     TimeSignature(2 * 1920 + 2 * 1440, 7, 8)])
    changing.tempos.extend([Tempo(0, 90.0), Tempo(1000, 140.0), Tempo(6000, 70.0)])  # 6000: between notes
    melody, drums = Track(program=73), Track(is_drum=True)
    for index in range(24):
        onset = 5 * 1920 + index * 240 if index > 20 else index * 240  # the last notes come after a gap
        melody.notes.append(Note(onset, 240, 60 + index % 12, 90))
        drums.notes.append(Note(index * 480, 120, 36 + index % 3, 100))
    changing.tracks.extend([melody, drums])
    late = Score(480)  # two empty bars before the first note
    late.tracks.append(Track(program=40))
    late.tracks[0].notes.append(Note(2 * 1920 + 120, 960, 67, 64))
    return scores + [changing, late]


@pytest.fixture(scope="module")
def encoded_pieces(tokenizers, good_files, cache_dir):
    """Per tokenizer, [BOS] ids [EOS] of every fixture file, the chorale and ``varied_scores``."""
    scores = [piece.score for piece in corpus.iter_pieces(f"dir:{good_files}", cache_dir)]
    scores.append(corpus.load_piece("music21:bach/bwv66.6", cache_dir).score)
    scores += varied_scores()
    return {name: [np.r_[BOS, encode(tokenizer, score), EOS] for score in scores]
            for name, tokenizer in tokenizers.items()}


@pytest.fixture(scope="module")
def unconstrained_and_constrained(tokenizers, models):
    """Per tokenizer: 100 free samples and 100 grammar-constrained samples of up to 120 tokens."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is as fast and immune to busy shared cores
    results = {}
    try:
        for name in GRAMMARS:
            constraint = GrammarConstraint(tokenizers[name])
            free, constrained = [], []
            for seed in (0, 1):
                free += sample_batch(models[name], torch.tensor([BOS]), 50, 120, top_p=0.95, seed=seed)
                constrained += sample_batch(models[name], torch.tensor([BOS]), 50, 120, top_p=0.95, seed=seed,
                                            constraint=constraint)
            results[name] = free, constrained
    finally:
        torch.set_num_threads(threads)
    return results


def bars_of_notes_by_tokens(names: list[str]) -> list[int]:
    """REMI: the bar of each complete note, counted in Bar tokens."""
    bars, bar = [], -1
    for token in names:
        bar += token == "Bar_None"
        if token.startswith("Duration_"):
            bars.append(bar)
    return sorted(bars)


def bars_of_notes_by_time(score: Score) -> list[int]:
    """The bar each decoded note starts in, from its onset and the decoded time signatures."""
    signatures = sorted(score.time_signatures, key=lambda signature: signature.time)
    onsets = sorted(note.time for track in score.tracks for note in track.notes)
    bars, bar, bar_start = [], 0, 0
    for onset in onsets:
        while True:
            active = [s for s in signatures if s.time <= bar_start][-1]
            bar_length = active.numerator * score.ticks_per_quarter * 4 // active.denominator
            if onset < bar_start + bar_length:
                break
            bar, bar_start = bar + 1, bar_start + bar_length
        bars.append(bar)
    return bars


@pytest.mark.parametrize("name", GRAMMARS)
def test_every_constrained_sample_is_well_formed(name, tokenizers, unconstrained_and_constrained):
    tokenizer = tokenizers[name]
    free, constrained = unconstrained_and_constrained[name]
    # Without the constraint a random model breaks MidiTok's grammar almost every time...
    assert sum(tokenizer.tokens_errors(np.r_[BOS, tokens.numpy()]) > 0 for tokens, _ in free) > 90
    # ... with it, never: every sample checks clean and decodes every complete note it holds.
    assert len(constrained) == 100
    for tokens, log_probs in constrained:
        sequence = np.r_[BOS, tokens.numpy()]
        assert tokenizer.tokens_errors(sequence) == 0
        assert len(tokens) == 120 or tokens[-1] == EOS
        assert torch.isfinite(log_probs).all()
        names = token_names(tokenizer, tokens)
        complete_notes = sum(token.startswith("Duration_") for token in names)
        score = decode(tokenizer, sequence)
        assert sum(len(track.notes) for track in score.tracks) == complete_notes > 0
        if name == "remi":  # no Position overflows its bar: each note sounds in the bar that holds it
            assert bars_of_notes_by_time(score) == bars_of_notes_by_tokens(names)
        assert not {"PAD_None", "BOS_None", "MASK_None"} & set(names)


@pytest.mark.parametrize("name", GRAMMARS)
def test_every_encoded_piece_is_accepted_token_by_token(name, tokenizers, encoded_pieces):
    constraint = GrammarConstraint(tokenizers[name])
    for ids in encoded_pieces[name]:
        state = constraint.start([BOS])
        for token in ids[1:]:
            assert constraint.allowed(state)[token], (token_names(tokenizers[name], [token]), state)
            state = constraint.advance(state, token)
        assert state.kind == "EOS"


def test_encoded_windows_are_accepted_as_prompts(tokenizers, encoded_pieces):
    """A prompt without BOS resumes mid-piece: REMI from any bar line, TSD from any note boundary."""
    remi, tsd = (GrammarConstraint(tokenizers[name]) for name in GRAMMARS)
    bar = tokenizers["remi"]._vocab_base["Bar_None"]
    for ids in encoded_pieces["remi"]:
        bar_starts = np.flatnonzero(ids == bar)
        remi.start(ids[bar_starts[len(bar_starts) // 2] : -1])
    program_ids = np.flatnonzero(GrammarConstraint(tokenizers["tsd"]).type_masks["Program"])
    for ids in encoded_pieces["tsd"]:
        note_starts = np.flatnonzero(np.isin(ids, program_ids))
        tsd.start(ids[note_starts[len(note_starts) // 2] : -1])


def test_remi_rejects_what_breaks_its_grammar(tokenizers):
    tokenizer = tokenizers["remi"]
    constraint = GrammarConstraint(tokenizer)
    opening = ["Bar_None", "TimeSig_3/4", "Position_8", "Program_0", "Pitch_60", "Velocity_79", "Duration_1.0.8"]
    constraint.start([BOS] + token_ids(tokenizer, *opening))  # accepted
    wrong = {
        "a note before its bar": ["Position_0"],
        "a bar without its time signature": ["Bar_None", "Position_0"],
        "a position going back": opening + ["Position_4"],
        "the same position again": opening + ["Position_8"],
        "a position past a 3/4 bar (24 positions)": opening[:2] + ["Position_24"],
        "a tempo straight after the time signature": opening[:2] + ["Tempo_121.29"],
        "a time signature inside a bar": opening + ["TimeSig_4/4"],
        "a pitch without its program": opening[:3] + ["Pitch_60"],
        "a velocity before the pitch": opening[:4] + ["Velocity_79"],
        "a drum pitch for a melodic program": opening[:4] + ["PitchDrum_36"],
        "a melodic pitch for drums": opening[:3] + ["Program_-1", "Pitch_60"],
        "EOS inside a note": opening[:5] + ["EOS_None"],
        "EOS before any note": opening[:3] + ["EOS_None"],
        "padding": opening + ["PAD_None"],
        "a second BOS": opening + ["BOS_None"],
        "a mask token": opening + ["MASK_None"],
        "anything after EOS": opening + ["EOS_None", "Bar_None"],
    }
    for reason, tokens in wrong.items():
        with pytest.raises(MusefmError, match="cannot follow"):
            constraint.start([BOS] + token_ids(tokenizer, *tokens))
            pytest.fail(reason)
    # The last position of a 3/4 bar is 23; a 4/4 bar reaches 31.
    constraint.start([BOS] + token_ids(tokenizer, "Bar_None", "TimeSig_3/4", "Position_23"))
    constraint.start([BOS] + token_ids(tokenizer, "Bar_None", "TimeSig_4/4", "Position_31"))


def test_tsd_rejects_what_breaks_its_grammar(tokenizers):
    tokenizer = tokenizers["tsd"]
    constraint = GrammarConstraint(tokenizer)
    note = ["Program_0", "Pitch_60", "Velocity_79", "Duration_1.0.8"]
    constraint.start([BOS] + token_ids(tokenizer, "TimeSig_4/4", "Tempo_121.29", *note, "TimeShift_1.0.8", *note))
    wrong = {
        "a note before the time signature": note,
        "a tempo after a note at the same time": ["TimeSig_4/4"] + note + ["Tempo_121.29"],
        "a time signature after a note at the same time": ["TimeSig_4/4"] + note + ["TimeSig_3/4"],
        "a time shift inside a note": ["TimeSig_4/4"] + note[:2] + ["TimeShift_1.0.8"],
        "EOS inside a note": ["TimeSig_4/4"] + note[:3] + ["EOS_None"],
    }
    for reason, tokens in wrong.items():
        with pytest.raises(MusefmError, match="cannot follow"):
            constraint.start([BOS] + token_ids(tokenizer, *tokens))
            pytest.fail(reason)


@pytest.mark.parametrize("name", GRAMMARS)
def test_key_range_program_and_meter_hold_on_every_note(name, tokenizers, models):
    tokenizer = tokenizers[name]
    constraint = GrammarConstraint(tokenizer, key="G major", pitch_range=(55, 79), programs=[0, 40, -1],
                                   time_signature="3/4")
    g_major = scale_pitch_classes("G major")
    assert g_major == {7, 9, 11, 0, 2, 4, 6}
    rows = sample_batch(models[name], torch.tensor([BOS]), 40, 120, seed=3, constraint=constraint)
    pitched = drummed = 0
    for tokens, _ in rows:
        sequence = np.r_[BOS, tokens.numpy()]
        assert tokenizer.tokens_errors(sequence) == 0
        score = decode(tokenizer, sequence)
        assert [(signature.numerator, signature.denominator) for signature in score.time_signatures] == [(3, 4)]
        for track in score.tracks:
            assert (-1 if track.is_drum else track.program) in (0, 40, -1)
            for note in track.notes:
                if track.is_drum:  # drum "pitches" name instruments: key and range do not apply
                    drummed += 1
                    continue
                pitched += 1
                assert 55 <= note.pitch <= 79 and note.pitch % 12 in g_major
        assert all(token == "TimeSig_3/4" for token in token_names(tokenizer, tokens) if token.startswith("TimeSig"))
    assert pitched > 40 and drummed > 20


def test_impossible_constraints_fail_at_construction_with_one_line(tokenizers):
    remi = tokenizers["remi"]
    impossible = {
        "empty scale": dict(key=[]),
        "cannot read": dict(key="H major"),
        "no Pitch token lies in 0..10": dict(pitch_range=(0, 10)),
        "above": dict(pitch_range=(80, 60)),
        "no Pitch token of 'C major'": dict(key="C major", pitch_range=(61, 61)),
        "none of \\[200, 300\\]": dict(programs=[200, 300]),
        "not a TimeSig token": dict(time_signature="5/16"),
    }
    for message, settings in impossible.items():
        with pytest.raises(MusefmError, match=message) as error:
            GrammarConstraint(remi, **settings)
        assert "\n" not in str(error.value)
    with pytest.raises(MusefmError, match="Octuple .* not token by token"):
        GrammarConstraint(make_tokenizer("octuple"))
    with pytest.raises(MusefmError, match="Chord"):
        GrammarConstraint(make_tokenizer("remi", use_chords=True))
    # Drums alone need no pitch, so an empty range with drums only is fine.
    GrammarConstraint(remi, pitch_range=(100, 100), key="C major", programs=[-1])


def test_seeds_reproduce_and_prompts_are_continued(tokenizers, models, encoded_pieces, one_thread):
    tokenizer, model = tokenizers["remi"], models["remi"]
    constraint = GrammarConstraint(tokenizer, key="D minor")
    chorale = encoded_pieces["remi"][-len(varied_scores()) - 1]
    bar = tokenizer._vocab_base["Bar_None"]
    prompt = torch.from_numpy(chorale[: np.flatnonzero(chorale == bar)[2]].astype(np.int64))  # BOS + 2 bars
    first = sample(model, prompt, 60, top_p=0.95, seed=5, constraint=constraint)
    again = sample(model, prompt, 60, top_p=0.95, seed=5, constraint=constraint)
    other = sample(model, prompt, 60, top_p=0.95, seed=6, constraint=constraint)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    # The continuation picks up where the prompt's grammar state left off.
    constraint.start(torch.cat([prompt, first[0]]))
    assert tokenizer.tokens_errors(torch.cat([prompt, first[0]]).numpy()) == 0
    # One row of a batch is the single-sample path, draw for draw.
    batched = sample_batch(model, prompt, 1, 60, top_p=0.95, seed=5, constraint=constraint)[0]
    assert torch.equal(batched[0], first[0])


@pytest.mark.parametrize("name", ["remi", "tsd"])
def test_max_notes_per_onset_caps_every_onset(name, tokenizers, models):
    tokenizer = tokenizers[name]
    constraint = GrammarConstraint(tokenizer, max_notes_per_onset=2)
    rows = sample_batch(models[name], torch.tensor([BOS]), 20, 150, seed=5, constraint=constraint)
    time_tokens = ("Position", "TimeShift", "Bar")
    largest = 0
    for tokens, _ in rows:
        assert tokenizer.tokens_errors(np.r_[BOS, tokens.numpy()]) == 0
        at_onset = 0
        for token in token_names(tokenizer, tokens):
            if token.startswith(time_tokens):
                at_onset = 0
            elif token.startswith("Duration"):
                at_onset += 1
                largest = max(largest, at_onset)
    assert largest == 2  # reached, never exceeded
    with pytest.raises(MusefmError, match="max_notes_per_onset"):
        GrammarConstraint(tokenizer, max_notes_per_onset=0)
