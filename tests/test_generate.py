import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from musefm.data.build import BuildConfig, build_dataset
from musefm.data.tokenize import decode, encode, load_tokenizer, make_tokenizer, save_tokenizer
from musefm.errors import MusefmError
from musefm.generation.constraints import scale_pitch_classes
from musefm.models.music_lm import MusicLM, SingleTokenDecoder, config_from_preset
from musefm.data.tokenize import bar_token_ids
from musefm.generation.continuation import generate, music_ids
from musefm.recipes.generate import GenerateConfig, main
from tests.conftest import make_score

QUIET = open(os.devnull, "w")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny REMI dataset, an untrained MusicLM "debug" model dir with its tokenizer, and a prompt file."""
    root = tmp_path_factory.mktemp("gen")
    pieces = root / "pieces"
    pieces.mkdir()
    for index in range(3):
        pitches = tuple(55 + (index * 3 + k * 5) % 20 for k in range(24))
        make_score(pitches=pitches, chord=index == 0).dump_midi(str(pieces / f"p{index}.mid"))
    data = root / "remi"
    build_dataset(BuildConfig(sources=[f"dir:{pieces}"], out=str(data), workers=1, valid_fraction=0.0,
                              test_fraction=0.0), stream=QUIET)
    tokenizer = load_tokenizer(data / "tokenizer.json")
    torch.manual_seed(0)
    model = MusicLM(config_from_preset("debug", vocab_size=len(tokenizer)))
    model_dir = root / "lm"
    model.save_pretrained(model_dir)
    shutil.copyfile(data / "tokenizer.json", model_dir / "tokenizer.json")
    return {"root": root, "model": model_dir, "prompt": pieces / "p0.mid", "tokenizer": tokenizer}


def _config(setup, out, **settings):
    base = dict(model=str(setup["model"]), out=str(out), max_tokens=40, render=False)
    base.update(settings)
    return GenerateConfig(**base)


def _records(paths):
    return [json.loads(Path(p).read_text()) for p in paths]


def test_from_scratch_and_with_prompt_write_decodable_samples(setup, tmp_path, one_thread):
    tokenizer = setup["tokenizer"]
    paths = main(_config(setup, tmp_path / "scratch", num_samples=2), stream=QUIET)
    assert [p.name for p in paths] == ["sample_00.json", "sample_01.json"]
    for record, path in zip(_records(paths), paths):
        for suffix in (".mid", ".png"):
            assert path.with_suffix(suffix).is_file()
        assert record["num_tokens"] == len(record["token_ids"]) == len(record["log_probs"]) > 0
        assert all(p <= 0 for p in record["log_probs"])
        assert record["notes"] > 0 and record["seconds"] > 0 and record["grammar_errors"] == 0
        assert record["prompt"] == {"source": None, "bars": 0, "tokens": 1}
        assert decode(tokenizer, music_ids(tokenizer, record["token_ids"])).note_num() == record["notes"]

    prompted = main(_config(setup, tmp_path / "prompted", prompt=str(setup["prompt"]), prompt_bars=2), stream=QUIET)
    record = _records(prompted)[0]
    from symusic import Score

    whole = encode(tokenizer, Score(str(setup["prompt"])), "p")
    bar_starts = np.flatnonzero(np.isin(whole, bar_token_ids(tokenizer)))
    assert record["prompt"]["tokens"] == 1 + bar_starts[2]  # [BOS] + the first 2 of the 6 bars
    assert record["notes"] > record["generated_notes"] > 0
    assert record["seconds"] > record["generated_seconds"] > 0


def test_same_seed_same_tokens_and_sample_k_reproducible_alone(setup, tmp_path, one_thread):
    first = _records(main(_config(setup, tmp_path / "a", seed=5, num_samples=2), stream=QUIET))
    again = _records(main(_config(setup, tmp_path / "b", seed=5, num_samples=2), stream=QUIET))
    other = _records(main(_config(setup, tmp_path / "c", seed=6), stream=QUIET))
    assert [r["token_ids"] for r in first] == [r["token_ids"] for r in again]
    assert first[0]["token_ids"] != first[1]["token_ids"]
    assert other[0]["token_ids"] == first[1]["token_ids"]  # sample k is drawn with seed + k
    assert first[0]["seed"] == 5 and first[1]["seed"] == 6


def test_bars_and_seconds_targets_run_past_the_context(setup, tmp_path, monkeypatch, one_thread):
    tokenizer = setup["tokenizer"]
    # An untrained model stacks notes on one onset for ever; this one also likes bar lines.
    bar_id = int(bar_token_ids(tokenizer)[0])
    forward = MusicLM.forward

    def forward_liking_bars(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        output.logits[..., bar_id] += 3.0
        return output

    step = SingleTokenDecoder.__call__

    def step_liking_bars(self, *args, **kwargs):  # the decoding steps after the prompt
        logits = step(self, *args, **kwargs)
        logits[..., bar_id] += 3.0
        return logits

    monkeypatch.setattr(MusicLM, "forward", forward_liking_bars)
    monkeypatch.setattr(SingleTokenDecoder, "__call__", step_liking_bars)
    record = _records(main(_config(setup, tmp_path / "bars", max_tokens=0, bars=2, top_k=8), stream=QUIET))[0]
    new = music_ids(tokenizer, record["token_ids"])
    assert record["stopped"] == "bars" and record["new_bars"] == 2
    assert np.isin(new, bar_token_ids(tokenizer)).sum() >= 2
    long = _records(main(_config(setup, tmp_path / "long", max_tokens=0, bars=40), stream=QUIET))[0]
    assert long["stopped"] == "bars" and long["new_bars"] == 40
    assert long["num_tokens"] > 64  # past the debug model's 64-token context, in chunks
    timed = _records(main(_config(setup, tmp_path / "sec", max_tokens=0, seconds=30.0), stream=QUIET))[0]
    assert timed["stopped"] == "seconds" and timed["generated_seconds"] >= 30.0
    # Cut at the shortest prefix: one token fewer lasts less than the target.
    shorter = decode(tokenizer, music_ids(tokenizer, timed["token_ids"][:-1]))
    assert shorter.to("second").end() < 30.0


def test_constraints_hold_on_the_notes(setup, tmp_path, one_thread):
    paths = main(_config(setup, tmp_path / "c", key="D major", pitch_low=60, pitch_high=72, programs=[0],
                         time_signature="3/4", num_samples=2, max_tokens=60), stream=QUIET)
    scale = scale_pitch_classes("D major")
    for path in paths:
        from symusic import Score

        score = Score(str(path.with_suffix(".mid")))
        notes = [(track.program, note.pitch) for track in score.tracks for note in track.notes]
        assert notes and all(program == 0 and 60 <= pitch <= 72 and pitch % 12 in scale for program, pitch in notes)
        assert {(ts.numerator, ts.denominator) for ts in score.time_signatures} == {(3, 4)}


def test_beam_search_is_deterministic(setup, tmp_path, one_thread):
    settings = dict(beam=3, num_samples=2, max_tokens=16, seed=1)
    first = _records(main(_config(setup, tmp_path / "a", **settings), stream=QUIET))
    second = _records(main(_config(setup, tmp_path / "b", **{**settings, "seed": 9}), stream=QUIET))  # seed unused
    assert [r["token_ids"] for r in first] == [r["token_ids"] for r in second]
    assert first[0]["token_ids"] != first[1]["token_ids"]
    means = [r["mean_log_prob"] for r in first]
    assert means[0] >= means[1]  # best beam first (length-normalised)


def test_python_generate_returns_ids_and_score(setup, one_thread):
    from musefm.models.base import load_pretrained

    model, _ = load_pretrained(setup["model"])
    ids, score = generate(model, setup["tokenizer"], [1], max_tokens=30, seed=2)
    assert ids[0] == 1 and 1 < len(ids) <= 31 and score.note_num() >= 0
    with pytest.raises(MusefmError, match="prompt"):
        octuple_ids = encode(make_tokenizer("octuple"), make_score(), "p")  # (T, 8): another vocabulary
        generate(model, setup["tokenizer"], octuple_ids, max_tokens=4)


def test_audio_is_rendered_or_skipped_with_a_note(setup, tmp_path, monkeypatch, one_thread):
    path = main(_config(setup, tmp_path / "wav", max_tokens=24, render=True), stream=QUIET)[0]
    if shutil.which("fluidsynth"):
        assert path.with_suffix(".wav").stat().st_size > 100
    import musefm.audio.render as render

    def missing(*args, **kwargs):
        raise MusefmError("fluidsynth is not installed")

    monkeypatch.setattr(render, "render_midi", missing)
    record = _records(main(_config(setup, tmp_path / "none", max_tokens=24, render=True), stream=QUIET))[0]
    assert record["files"]["audio"] is None and "fluidsynth" in record["audio_note"]
    assert not (tmp_path / "none" / "sample_00.wav").exists()


def _bert_dir(root: Path) -> Path:
    from musefm.models.music_bert import MusicBERT, config_from_preset as bert_preset, octuple_fields

    tokenizer = make_tokenizer("octuple")
    names, sizes = octuple_fields(tokenizer)
    path = MusicBERT(bert_preset("debug", field_names=names, field_vocab_sizes=sizes)).save_pretrained(root / "bert")
    save_tokenizer(tokenizer, path / "tokenizer.json")
    return path


def test_bad_input_fails_in_one_line_before_writing(setup, tmp_path):
    root = tmp_path / "inputs"
    root.mkdir()
    (root / "broken.mid").write_bytes(b"MThd not really")
    wrong_tokenizer = root / "lm-octuple"
    shutil.copytree(setup["model"], wrong_tokenizer)
    save_tokenizer(make_tokenizer("octuple"), wrong_tokenizer / "tokenizer.json")
    out = tmp_path / "out"
    cases = [
        (dict(prompt=str(root / "broken.mid")), "broken.mid"),
        (dict(prompt=str(root / "missing.mid")), "not found"),
        (dict(model=str(_bert_dir(root))), "holds a music-bert model, not a generative music-lm"),
        (dict(model=str(root / "nowhere")), "no such run"),
        (dict(key="H major"), "key"),
        (dict(pitch_low=70, pitch_high=60), "pitch_range"),
        (dict(time_signature="5/16"), "time_signature"),
        (dict(model=str(wrong_tokenizer)), "single token stream"),
        (dict(key="C major", constrained=False), "constrained decoding"),
        (dict(beam=2, num_samples=3), "num_samples"),
        (dict(temperature=0.0), "temperature"),
    ]
    for settings, message in cases:
        with pytest.raises(MusefmError) as caught:
            main(_config(setup, out, **settings), stream=QUIET)
        text = str(caught.value)
        assert message in text and "\n" not in text, (settings, text)
        assert not out.exists(), settings
