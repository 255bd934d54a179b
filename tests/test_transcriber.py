"""The transcriber: shapes, save/load, windowed inference, learning, the recipe (incl. resume),
``musefm transcribe`` / ``evaluate transcription`` and the shipped model."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from musefm.cli import main as cli
from musefm.errors import MusefmError
from musefm.models.base import average_pretrained
from musefm.models.transcriber import PRESETS, Transcriber, config_from_preset
from musefm.transcription.transcribe import SHIPPED_MODEL, load_transcriber, transcribe_file
from tests.conftest import make_score
from tests.test_audio_build import write_pieces

needs_fluidsynth = pytest.mark.skipif(shutil.which("fluidsynth") is None, reason="fluidsynth is not installed")


def tiny_model(seed=0) -> Transcriber:
    torch.manual_seed(seed)
    return Transcriber(config_from_preset("debug"))


def test_forward_gives_one_frame_per_hop_for_every_head():
    model = tiny_model().eval()
    audio = torch.randn(2, 16000)
    logits = model(audio)
    assert set(logits) == {"onset", "offset", "frame", "velocity"}
    for value in logits.values():
        assert value.shape == (2, 16000 // 320 + 1, 88)


def test_save_and_load_give_the_same_outputs(tmp_path):
    model = tiny_model().eval()
    model.save_pretrained(tmp_path / "m")
    loaded = load_transcriber(tmp_path / "m")
    audio = torch.randn(1, 8000)
    with torch.no_grad():
        assert torch.allclose(model(audio)["frame"], loaded(audio)["frame"])


def test_averaged_weights_are_the_mean_and_need_the_same_model(tmp_path):
    first, second = tiny_model(0), tiny_model(1)
    with torch.no_grad():  # batch-norm step counts differ, as after two fine-tunes
        first.acoustic.convs[1].num_batches_tracked.fill_(5)
        second.acoustic.convs[1].num_batches_tracked.fill_(9)
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    soup = average_pretrained([tmp_path / "a", tmp_path / "b"]).state_dict()
    for name, tensor in first.state_dict().items():
        if tensor.is_floating_point():
            assert torch.allclose(soup[name], (tensor + second.state_dict()[name]) / 2, atol=1e-7), name
    assert soup["acoustic.convs.1.num_batches_tracked"].item() == 5  # integers come from the first
    same = average_pretrained([tmp_path / "a", tmp_path / "a"]).eval()
    audio = torch.randn(1, 8000)
    with torch.no_grad():
        assert torch.allclose(same(audio)["onset"], first.eval()(audio)["onset"], atol=1e-6)
    Transcriber(config_from_preset("debug", d_model=8)).save_pretrained(tmp_path / "narrow")
    with pytest.raises(MusefmError, match="narrow: a different model"):
        average_pretrained([tmp_path / "a", tmp_path / "narrow"])
    with pytest.raises(MusefmError, match="at least two"):
        average_pretrained([tmp_path / "a"])


def test_a_model_saved_in_float16_keeps_integer_buffers_and_loads_as_float32(tmp_path):
    from safetensors.torch import load_file

    model = tiny_model(0)
    model.save_pretrained(tmp_path / "half", torch.float16)
    stored = load_file(str(tmp_path / "half" / "model.safetensors"))
    assert stored["acoustic.convs.1.num_batches_tracked"].dtype == torch.int64
    loaded = load_transcriber(tmp_path / "half")
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            assert stored[name].dtype == torch.float16, name
            assert loaded.state_dict()[name].dtype == torch.float32, name
            assert torch.equal(loaded.state_dict()[name], tensor.half().float()), name


def test_windowed_activations_cover_every_frame():
    model = tiny_model().eval()
    with torch.no_grad():
        mel = model.mel(torch.randn(16000 * 3))  # (151, n_mels)
        whole = {name: torch.sigmoid(value[0]).numpy() for name, value in model(mel=mel.unsqueeze(0)).items()}
    one_window = model.activations(mel, window_frames=1000)
    assert np.allclose(one_window["frame"], whole["frame"], atol=1e-6)
    windowed = model.activations(mel, window_frames=60, overlap_frames=20)
    for name in whole:  # every frame written (no zero gaps), and close to the whole-input result
        assert windowed[name].shape == whole[name].shape
        assert np.abs(windowed[name] - whole[name]).max() < 0.05


def test_streamed_activations_equal_the_whole_whatever_the_blocks():
    model = tiny_model().eval()
    with torch.no_grad():
        mel = model.mel(torch.randn(16000 * 4))  # (201, n_mels), column-major as the STFT leaves it
    whole = model.activations(mel, window_frames=60, overlap_frames=10)
    edges = [0, 1, 7, 7, 80, 81, 150, len(mel)]
    blocks = list(model.iter_activations((mel[low:high].contiguous() for low, high in zip(edges[:-1], edges[1:])),
                                         window_frames=60, overlap_frames=10))
    assert [len(block["onset"]) for block in blocks] == [40] * 5 + [1]  # one block per window
    for name in whole:
        np.testing.assert_allclose(np.concatenate([block[name] for block in blocks]), whole[name], atol=1e-6)


def test_transcribe_file_streams_and_gives_the_notes_of_the_whole(tmp_path):
    """Audio in 7.3 s chunks, two network windows: the notes computed as the audio streams in equal
    those of the whole file's log-mel decoded at once."""
    from musefm.audio.features import log_mel_for_file
    from musefm.audio.io import save_audio
    from musefm.transcription.postprocess import DecodeConfig, activations_to_notes

    model = tiny_model().eval()
    audio = np.random.default_rng(0).standard_normal(16000 * 50).astype(np.float32) * 0.3
    save_audio(tmp_path / "noise.wav", audio, 16000, subtype="FLOAT")
    decode = DecodeConfig(onset_threshold=0.5, frame_threshold=0.5, frame_onset_threshold=0.2)
    with torch.no_grad():  # an untrained model: shift its onsets and frames to about half on
        model.onset_head.bias.fill_(0.0)
    streamed = transcribe_file(model, tmp_path / "noise.wav", decode=decode, chunk_seconds=7.3)
    mel = log_mel_for_file(tmp_path / "noise.wav", model.config.mel_config())
    heads = model.activations(torch.from_numpy(mel))
    whole = activations_to_notes(heads["onset"], heads["frame"], model.config.frame_rate, velocity=heads["velocity"],
                                 config=decode)
    assert len(whole) > 10 and streamed.audio_seconds == pytest.approx(50.0, abs=0.03)
    np.testing.assert_array_equal(streamed.notes, whole)


def test_inference_folds_batch_norm_without_changing_the_outputs():
    model = tiny_model()
    torch.manual_seed(1)
    for layer in model.acoustic.convs:  # batch norm statistics far from the identity they start at
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.uniform_(-1, 1), layer.running_var.uniform_(0.2, 3)
            layer.weight.data.uniform_(0.5, 2), layer.bias.data.uniform_(-1, 1)
    with pytest.raises(MusefmError, match="eval mode"):
        model.acoustic.folded_convs()
    model.eval()
    folded = model.acoustic.folded_convs()
    assert not any(isinstance(layer, (torch.nn.BatchNorm2d, torch.nn.Dropout)) for layer in folded)
    with torch.no_grad():
        mel = model.mel(torch.randn(16000 * 2))  # (101, n_mels)
    unfolded = model.acoustic(mel.unsqueeze(0)).detach()  # autograd on: the real layers run
    whole = torch.sigmoid(model(mel=mel.unsqueeze(0))["onset"][0]).detach().numpy()
    with torch.no_grad():  # pure inference: the folded layers run
        assert torch.allclose(model.acoustic(mel.unsqueeze(0)), unfolded, atol=1e-5)
    assert np.allclose(model.activations(mel)["onset"], whole, atol=1e-5)


def test_a_grown_onset_stack_starts_as_the_shared_one_then_trains_apart():
    model = tiny_model().eval()
    grown = model.with_onset_stack().eval()
    assert grown.config.onset_stack and not model.config.onset_stack
    with torch.no_grad():
        mel = model.mel(torch.randn(16000))  # (51, n_mels)
        before, after = model(mel=mel.unsqueeze(0)), grown(mel=mel.unsqueeze(0))
    for name in before:
        assert torch.allclose(before[name], after[name], atol=1e-6), name
    assert np.allclose(grown.activations(mel)["onset"], torch.sigmoid(after["onset"][0]).numpy(), atol=1e-5)
    with pytest.raises(MusefmError, match="already has"):
        grown.with_onset_stack()
    # The onset head now reads its own stack only: a step on the onset loss moves it, not the shared one.
    grown.train()
    shared = [p.detach().clone() for p in grown.acoustic.parameters()]
    onset_stack = [p.detach().clone() for p in grown.onset_acoustic.parameters()]
    grown(mel=mel.unsqueeze(0))["onset"].sum().backward()
    torch.optim.SGD(grown.parameters(), lr=0.1).step()
    assert all(torch.equal(a, b) for a, b in zip(shared, grown.acoustic.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(onset_stack, grown.onset_acoustic.parameters()))


@pytest.mark.parametrize("kind,onset_stack", [("gru", True), ("gru", False), ("lstm", True)])
def test_a_widened_model_starts_as_the_narrow_one_then_its_new_units_train(kind, onset_stack):
    torch.manual_seed(0)
    model = Transcriber(config_from_preset("debug", sequence_model=kind, onset_stack=onset_stack)).eval()
    grown = model.widened(d_model=24, rnn_hidden=12).eval()
    assert (grown.config.d_model, grown.config.rnn_hidden) == (24, 12)
    assert grown.num_parameters() > model.num_parameters()
    with torch.no_grad():
        mel = model.mel(torch.randn(16000))  # (51, n_mels)
        before, after = model(mel=mel.unsqueeze(0)), grown(mel=mel.unsqueeze(0))
        assert grown.onset_rnn(grown.acoustic(mel[None]) if not onset_stack else
                               grown.onset_acoustic(mel[None]))[..., 8:12].abs().sum() > 0  # new units compute
    for name in before:
        assert torch.allclose(before[name], after[name], atol=1e-6), name
    with pytest.raises(MusefmError, match="only grow"):
        grown.widened(d_model=16)
    # One step on every head's loss moves the weights that read the new units off zero.
    grown.train()
    sum(value.sum() for value in grown(mel=mel.unsqueeze(0)).values()).backward()
    torch.optim.SGD(grown.parameters(), lr=0.1).step()
    assert grown.onset_head.weight[:, 8:12].abs().sum() > 0 and grown.velocity_head.weight[:, 16:].abs().sum() > 0


def test_harmonic_stacking_puts_the_band_at_each_multiple_beside_each_band():
    from musefm.audio.features import hz_to_mel, mel_band_edges_hz, mel_filterbank
    from musefm.models.transcriber import HarmonicStack

    config = config_from_preset("debug", harmonics=(0.5, 2, 3))
    stack = HarmonicStack(config.mel_config(), config.harmonics)
    centres = mel_band_edges_hz(config.n_mels, config.fmin, config.fmax)[1:-1]  # (n_mels,) Hz
    # They are the filterbank's peaks (to the nearest FFT bin).
    bank = mel_filterbank(config.sample_rate, config.n_fft, config.n_mels, config.fmin, config.fmax)
    bin_hz = config.sample_rate / config.n_fft
    assert np.all(np.abs(bank.argmax(dim=1).numpy() * bin_hz - centres) <= bin_hz)
    mel = torch.arange(config.n_mels, dtype=torch.float32).expand(1, 3, -1)  # band b holds the value b
    stacked = stack(mel)  # (1, 3, n_mels, 4)
    assert stacked.shape == (1, 3, config.n_mels, 4) and torch.equal(stacked[..., 0], mel)
    centres_mel = hz_to_mel(centres)
    half_step = 0.5 * (centres_mel[1] - centres_mel[0])
    for channel, harmonic in enumerate(config.harmonics, start=1):
        for band in range(config.n_mels):
            target = hz_to_mel(harmonic * centres[band])
            if centres_mel[0] - half_step < target < centres_mel[-1] + half_step:  # the nearest band's value
                expected = float(np.abs(centres_mel - target).argmin())
            else:  # past the filterbank: silence
                expected = stack.silence
            assert stacked[0, 0, band, channel].item() == pytest.approx(expected), (band, harmonic)
    assert (stacked[0, 0, :, 3] < 0).sum() > config.n_mels // 4  # 3x of the top bands: silence
    with pytest.raises(MusefmError, match="harmonics"):
        config_from_preset("debug", harmonics=(2, 1))


@pytest.mark.parametrize("onset_stack", [False, True])
def test_a_model_grown_to_read_harmonics_starts_as_before_then_learns_from_them(onset_stack, tmp_path):
    torch.manual_seed(0)
    model = Transcriber(config_from_preset("debug", onset_stack=onset_stack)).eval()
    grown = model.with_harmonics([0.5, 2, 3]).eval()
    assert grown.config.harmonics == (0.5, 2.0, 3.0)
    mel = model.mel(torch.randn(16000))[None]  # (1, 51, n_mels)
    with torch.no_grad():
        before, after = model(mel=mel), grown(mel=mel)
    for name in before:
        assert torch.allclose(before[name], after[name], atol=1e-6), name
    with pytest.raises(MusefmError, match="already reads"):
        grown.with_harmonics([2])
    grown.save_pretrained(tmp_path / "m")  # the harmonics survive config.json
    loaded = load_transcriber(tmp_path / "m").eval()
    assert loaded.config.harmonics == (0.5, 2.0, 3.0)
    with torch.no_grad():
        assert torch.allclose(loaded(mel=mel)["onset"], after["onset"])
    # One step moves the new input channels' weights off zero.
    grown.train()
    grown(mel=mel)["onset"].sum().backward()
    torch.optim.SGD(grown.parameters(), lr=0.1).step()
    stack = grown.onset_acoustic if onset_stack else grown.acoustic
    assert stack.convs[0].weight[:, 1:].abs().sum() > 0


def test_the_model_learns_a_batch():
    from musefm.transcription.labels import notes_to_targets

    model = tiny_model(1)
    time = np.arange(8000) / 16000
    audio = (0.5 * np.sin(2 * np.pi * 261.63 * time) * (time > 0.1)).astype(np.float32)  # C4 from 0.1 s
    targets = notes_to_targets(np.array([[0.1, 0.4, 60, 90]]), 8000 // 320 + 1, 50.0)
    batch = {"audio": torch.from_numpy(audio)[None]} | {k: torch.from_numpy(v)[None] for k, v in targets.items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss, metrics, _ = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]


def test_loss_weight_scales_onset_and_frame_losses_per_frame():
    from musefm.transcription.labels import notes_to_targets

    model = tiny_model(2)
    audio = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 8000)).astype(np.float32) * 0.1)
    targets = notes_to_targets(np.array([[0.1, 0.4, 60, 90]]), 8000 // 320 + 1, 50.0)
    batch = {"audio": audio} | {k: torch.from_numpy(v)[None].expand(2, -1, -1) for k, v in targets.items()}
    _, plain, _ = model.loss(batch)
    _, ones, _ = model.loss(batch | {"loss_weight": torch.ones_like(batch["onset"])})
    _, doubled, _ = model.loss(batch | {"loss_weight": torch.full_like(batch["onset"], 2.0)})
    for name in ("onset_loss", "frame_loss", "offset_loss", "velocity_loss"):
        assert torch.allclose(plain[name], ones[name])
    assert torch.allclose(doubled["onset_loss"], 2 * plain["onset_loss"])
    assert torch.allclose(doubled["frame_loss"], 2 * plain["frame_loss"])
    assert torch.allclose(doubled["offset_loss"], plain["offset_loss"])  # offsets are not weighted


def test_presets_validate_and_bad_settings_are_named():
    from musefm.errors import MusefmError

    for name in PRESETS:
        config_from_preset(name)
    with pytest.raises(MusefmError, match="fmax"):
        config_from_preset("debug", fmax=20000.0)
    with pytest.raises(MusefmError, match="no_such_key"):
        config_from_preset("debug", no_such_key=1)


@pytest.mark.parametrize("name", ["transcriber_debug", "transcriber_small"])
def test_shipped_transcriber_configs_are_valid(name):
    from musefm.recipes.train_transcriber import load_config

    config = load_config(name, {"data": "unused", "out": "unused"}, [])
    config.validate()
    config_from_preset(config.preset, **config.model_settings)


@pytest.fixture(scope="module")
def audio_data(tmp_path_factory):
    from musefm.data.audio_build import AudioBuildConfig, build_audio_dataset

    root = tmp_path_factory.mktemp("transcriber")
    config = AudioBuildConfig(sources=[f"dir:{write_pieces(root / 'midi', 4)}"], out=str(root / "data"),
                              soundfonts=["timgm6mb"], valid_fraction=0.5, test_fraction=0.0, workers=1)
    build_audio_dataset(config)
    return root


@needs_fluidsynth
def test_recipe_trains_scores_and_resumes_exactly(audio_data, capsys):
    run = audio_data / "run"
    args = ["train-transcriber", "--config", "transcriber_debug", "--data", str(audio_data / "data"), "--out", str(run)]
    assert cli(args) == 0
    scores = json.loads((run / "eval.json").read_text())
    assert scores["split"] == "valid" and 0.0 <= scores["note_f1"] <= 1.0
    assert (run / "best" / "model.safetensors").is_file()

    # Stop at step 3 and resume: the weights equal those of the uninterrupted 6-step run.
    half = audio_data / "half"
    assert cli(args[:-1] + [str(half), "train.max_steps=3", "final_split="]) == 0
    run_config = json.loads((half / "run.json").read_text())
    run_config["config"]["train"]["max_steps"] = 6
    (half / "run.json").write_text(json.dumps(run_config))
    assert cli(["train-transcriber", "--out", str(half), "--resume"]) == 0
    from safetensors.torch import load_file

    full = load_file(str(run / "checkpoints" / "step-00000006" / "model.safetensors"))
    resumed = load_file(str(half / "checkpoints" / "step-00000006" / "model.safetensors"))
    for name in full:
        assert torch.allclose(full[name], resumed[name], atol=1e-6), name


@needs_fluidsynth
def test_transcribe_cli_writes_outputs_and_goes_past_bad_files(audio_data, tmp_path, capsys):
    from musefm.audio.io import save_audio

    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    good = tmp_path / "tone.wav"
    save_audio(good, 0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000).astype(np.float32), 16000)
    bad = tmp_path / "notes.wav"
    bad.write_text("this is not audio")
    out = tmp_path / "out"
    code = cli(["transcribe", str(good), str(bad), "-o", str(out), "--model", str(model_dir), "--sonify"])
    assert code == 1  # one file skipped
    for suffix in (".mid", ".csv", ".png"):
        assert (out / f"tone{suffix}").is_file()
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert rejected[0]["path"].endswith("notes.wav")
    # A single bad file: exit 2 and one line naming it.
    capsys.readouterr()
    assert cli(["transcribe", str(bad), "-o", str(out), "--model", str(model_dir)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "notes.wav" in error


def test_evaluate_transcription_cli_scores_identical_notes_perfectly(tmp_path, capsys):
    from musefm.transcription.postprocess import write_midi

    notes = np.array([[0.5, 1.0, 60, 80], [1.0, 1.5, 64, 70], [1.5, 2.5, 67, 90]], dtype=np.float64)
    write_midi(notes, tmp_path / "pred" / "a.mid")
    write_midi(notes, tmp_path / "ref" / "a.mid")
    assert cli(["evaluate", "transcription", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert json.dumps(report).count("note_f1") >= 1
    assert (tmp_path / "report" / "report.md").is_file()
    flat = json.dumps(report)
    assert '"note_offset_f1": 1.0' in flat


@needs_fluidsynth
@pytest.mark.skipif(not (SHIPPED_MODEL / "model.safetensors").is_file(), reason="shipped model not built yet")
def test_shipped_model_transcribes_a_rendered_piano_piece(tmp_path):
    """The model inside the package, on a piece and soundfont it never saw: most notes right."""
    from musefm.audio.render import render_midi
    from musefm.evaluation.transcription import score_notes
    from musefm.transcription.labels import notes_from_midi

    from symusic import Note

    score = make_score(pitches=(60, 64, 67, 72, 71, 67, 65, 62, 60, 55, 57, 59, 60), qpm=132.0)
    melody = score.tracks[0]
    for note, lower in zip(list(melody.notes), (52, 55, 60, 64, 62, 59, 57, 55, 52, 48, 53, 55, 52)):
        melody.notes.append(Note(note.time, note.duration, lower, 70))  # a second voice, chorale register
    score.dump_midi(str(tmp_path / "piece.mid"))
    render_midi(tmp_path / "piece.mid", tmp_path / "piece.wav", "musescore", 16000)
    result = transcribe_file(load_transcriber(), tmp_path / "piece.wav")
    scores = score_notes(notes_from_midi(tmp_path / "piece.mid"), result.notes)
    assert scores["note_f1"] > 0.8


def test_transcribe_handles_odd_but_valid_audio_and_rejects_broken_audio(tmp_path):
    """Silence gives no notes; 8 kHz and 192 kHz, 24-bit, 6 channels all work; NaN samples and an
    empty file are rejected with their reason while the batch goes on."""
    import soundfile

    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    tone = lambda rate: 0.3 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)  # noqa: E731 (1 s of A4)
    files = {"silence.wav": (np.zeros(16000), 16000, "PCM_16"), "low.wav": (tone(8000), 8000, "PCM_16"),
             "high24.wav": (tone(192000), 192000, "PCM_24"),
             "surround.flac": (np.tile(tone(16000)[:, None], (1, 6)), 16000, "PCM_16"),
             "nan.wav": (np.full(16000, np.nan), 16000, "FLOAT")}
    for name, (audio, rate, subtype) in files.items():
        soundfile.write(tmp_path / name, audio, rate, subtype=subtype)
    soundfile.write(tmp_path / "empty.wav", np.zeros(0), 16000)
    names = list(files) + ["empty.wav"]
    out = tmp_path / "out"
    assert cli(["transcribe", *(str(tmp_path / n) for n in names), "-o", str(out), "--model", str(model_dir)]) == 1
    done = {Path(row["input"]).name: row for row in json.loads((out / "transcriptions.json").read_text())}
    assert set(done) == {"silence.wav", "low.wav", "high24.wav", "surround.flac"}
    assert done["low.wav"]["audio_seconds"] == pytest.approx(1.0, abs=0.05)
    assert done["high24.wav"]["audio_seconds"] == pytest.approx(1.0, abs=0.05)
    reasons = {Path(row["path"]).name: row["reason"] for row in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}
    assert "NaN" in reasons["nan.wav"] and "no samples" in reasons["empty.wav"]


@needs_fluidsynth
def test_decoding_thresholds_are_tuned_on_validation_and_saved(audio_data):
    from musefm.data.audio_dataset import open_audio_dataset
    from musefm.recipes.train_transcriber import tune_split
    from musefm.transcription.transcribe import DECODE_FILE

    model_dir = audio_data / "tuned"
    tiny_model().save_pretrained(model_dir)
    chosen = tune_split(model_dir, open_audio_dataset(audio_data / "data"), "valid")
    saved = json.loads((model_dir / DECODE_FILE).read_text())
    assert saved["onset_threshold"] == chosen["onset_threshold"] and 0.0 <= chosen["note_f1"] <= 1.0
    assert load_transcriber(model_dir).decode_config.onset_threshold == chosen["onset_threshold"]


@needs_fluidsynth
def test_fine_tuning_starts_from_the_given_model(audio_data, tmp_path):
    from musefm.recipes.train_transcriber import TranscriberTrainConfig, main
    from musefm.training.trainer import TrainConfig

    start = tmp_path / "start"
    tiny_model(seed=5).save_pretrained(start)
    config = TranscriberTrainConfig(init_from=str(start), data=str(audio_data / "data"), out=str(tmp_path / "run"),
                                    segment_seconds=1.0, use_augment=False, final_split="", tune_decoding=False,
                                    train=TrainConfig(max_steps=1, batch_size=2, lr=1e-12, warmup_steps=0,
                                                      eval_every=1, save_every=1))
    main(config, stream=open(os.devnull, "w"))
    before, after = load_transcriber(start), load_transcriber(tmp_path / "run" / "checkpoints" / "step-00000001")
    for (name, a), b in zip(before.state_dict().items(), after.state_dict().values()):
        if a.is_floating_point() and "running" not in name:  # batch-norm statistics move in train mode
            assert torch.allclose(a, b, atol=1e-6), name

    # Growing an onset conv stack while fine-tuning: it starts as a copy of the shared stack.
    grown = dataclasses.replace(config, out=str(tmp_path / "grown"), model_settings={"onset_stack": True})
    main(grown, stream=open(os.devnull, "w"))
    after = load_transcriber(tmp_path / "grown" / "checkpoints" / "step-00000001")
    assert after.config.onset_stack
    for name, value in before.acoustic.convs.state_dict().items():
        if value.is_floating_point() and "running" not in name:
            assert torch.allclose(value, after.onset_acoustic.convs.state_dict()[name], atol=1e-6), name
    # Widening while fine-tuning: the old weights sit in the first rows/columns of the wider ones.
    wide = dataclasses.replace(config, out=str(tmp_path / "wide"), model_settings={"d_model": 24, "rnn_hidden": 12})
    main(wide, stream=open(os.devnull, "w"))
    after = load_transcriber(tmp_path / "wide" / "checkpoints" / "step-00000001")
    assert (after.config.d_model, after.config.rnn_hidden) == (24, 12)
    # The grown starting point is kept beside the run, to average the fine-tune back toward it.
    grown_start = load_transcriber(tmp_path / "wide" / "start")
    assert (grown_start.config.d_model, grown_start.config.rnn_hidden) == (24, 12)
    assert torch.equal(grown_start.acoustic.project[0].weight[:16], before.acoustic.project[0].weight)
    assert torch.allclose(grown_start.acoustic.project[0].weight, after.acoustic.project[0].weight, atol=1e-6)
    assert torch.allclose(after.acoustic.project[0].weight[:16], before.acoustic.project[0].weight, atol=1e-6)
    # Harmonic stacking while fine-tuning: the first convs gain zero-weighted channels.
    stacked = dataclasses.replace(config, out=str(tmp_path / "harmonics"), model_settings={"harmonics": [0.5, 2]})
    main(stacked, stream=open(os.devnull, "w"))
    after = load_transcriber(tmp_path / "harmonics" / "checkpoints" / "step-00000001")
    assert after.config.harmonics == (0.5, 2.0)
    assert torch.allclose(after.acoustic.convs[0].weight[:, :1], before.acoustic.convs[0].weight, atol=1e-6)
    with pytest.raises(MusefmError, match="only onset_stack"):
        dataclasses.replace(config, model_settings={"conv_channels": 32}).validate()
    with pytest.raises(MusefmError, match="masked_note_weight"):
        dataclasses.replace(config, masked_note_weight=0.0).validate()
