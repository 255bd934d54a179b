"""FAD, FAD-inf and per-song FAD: hand-computed distances, synthetic Gaussians, tiny audio sets."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile

from musefm.audio.features import MelConfig
from musefm.audio.io import load_audio, save_audio
from musefm.errors import MusefmError
from musefm.evaluation.audio import (LogMelStatsEmbedding, TranscriberEmbedding, embed_file, evaluate_audio_sets, fad,
                                     fad_infinity, frechet_distance, per_song_fad)

RATE = 8000


def small_embedding() -> LogMelStatsEmbedding:
    """8 bands at 8 kHz, 0.25 s windows every 0.125 s: dim 16, 8 frames per second."""
    mel = MelConfig(sample_rate=RATE, n_fft=256, hop_length=64, n_mels=8, fmin=30.0, fmax=4000.0)
    return LogMelStatsEmbedding(window_seconds=0.25, hop_seconds=0.125, mel=mel)


def sine(frequency: float, seconds: float = 2.0, rate: int = RATE, amplitude: float = 0.5) -> np.ndarray:
    time = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * time)).astype(np.float32)


def noise(seed: int, seconds: float = 2.0, rate: int = RATE) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(np.float32)


@pytest.fixture(scope="module")
def audio_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fad")
    for frequency in (220, 330, 440):
        save_audio(root / "sines" / f"sine{frequency}.wav", sine(frequency), RATE)
    for seed in (1, 2, 3):
        save_audio(root / "noise" / f"noise{seed}.wav", noise(seed), RATE)
    save_audio(root / "mixed" / "a_sine.wav", sine(277), RATE)
    save_audio(root / "mixed" / "b_noise.wav", noise(4), RATE)
    return root


def test_frechet_distance_hand_computed():
    # 1-D: N(0, 1) vs N(1, 4): (0 - 1)^2 + 1 + 4 - 2 * sqrt(1 * 4) = 2
    assert frechet_distance([0.0], [[1.0]], [1.0], [[4.0]]) == pytest.approx(2.0, abs=1e-9)
    # Diagonal: |(3, 4)|^2 + (1 + 9 - 2*3) + (4 + 1 - 2*2) = 25 + 4 + 1 = 30
    mu1, sigma1, mu2, sigma2 = np.zeros(2), np.diag([1.0, 4.0]), np.array([3.0, 4.0]), np.diag([9.0, 1.0])
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(30.0, abs=1e-9)
    # The same two Gaussians rotated: full covariances, the distance does not change.
    angle = 0.7
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    rotated = (rotation @ mu1, rotation @ sigma1 @ rotation.T, rotation @ mu2, rotation @ sigma2 @ rotation.T)
    assert frechet_distance(*rotated) == pytest.approx(30.0, abs=1e-7)
    assert frechet_distance(*rotated[2:], *rotated[:2]) == pytest.approx(30.0, abs=1e-7)  # symmetric
    # Identical full-rank Gaussians -> 0; zero (singular) covariances leave the mean term only.
    frames = np.random.default_rng(0).normal(size=(50, 5))
    mu, sigma = frames.mean(0), np.cov(frames, rowvar=False)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(np.zeros(2), np.zeros((2, 2)), mu2, np.zeros((2, 2))) == pytest.approx(25.0, abs=1e-4)
    with pytest.raises(MusefmError, match="shapes differ"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_fad_infinity_removes_small_sample_bias():
    """N(0, I) reference vs N(m, diag(s)): the true distance is |m|^2 + sum(1 + s - 2 sqrt(s)). FAD on
    200 frames is biased upwards (~c / N); FAD-inf's mean over seeds lands much nearer the truth."""
    dim = 8
    shift, scales = np.full(dim, 0.25), np.linspace(0.5, 2.0, dim)
    true = shift @ shift + np.sum(1 + scales - 2 * np.sqrt(scales))
    plain, infinity = [], []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        reference = [rng.normal(size=(20000, dim))]
        test = [shift + np.sqrt(scales) * rng.normal(size=(200, dim))]
        plain.append(fad(reference, test))
        result = fad_infinity(reference, test, seed=seed)
        assert result.reason is None and result.slope > 0 and len(result.points) == 15
        assert result.points[-1][1] == pytest.approx(plain[-1])  # the largest subset is the whole set
        infinity.append(result.value)
    assert np.mean(plain) - true > 0.05
    assert abs(np.mean(infinity) - true) < 0.3 * (np.mean(plain) - true)


def test_too_few_frames_give_nan_with_reason():
    rng = np.random.default_rng(0)
    reference, small = [rng.normal(size=(100, 4))], [rng.normal(size=(3, 4))]  # 3 frames <= 4 dims
    assert math.isnan(fad(reference, small)) and math.isnan(fad(small, reference))
    result = fad_infinity(reference, small)
    assert math.isnan(result.value) and "singular" in result.reason
    assert "at least 2" in fad_infinity(reference, [rng.normal(size=(1, 4))]).reason
    assert "subset sizes" in fad_infinity(reference, [rng.normal(size=(6, 4))]).reason  # sizes 5..6 only
    songs = per_song_fad(reference, [rng.normal(size=(1, 4)), small[0], rng.normal(size=(50, 4))])
    assert math.isnan(songs[0]) and np.isfinite(songs[1:]).all()
    assert all(math.isnan(value) for value in per_song_fad(small, [rng.normal(size=(50, 4))]))


def test_log_mel_stats_embedding_frames_and_streaming(tmp_path):
    embedding = small_embedding()
    audio = sine(440, seconds=1.3)  # 10400 samples: 1 + (10400 - 2000) // 1000 = 9 windows
    frames = embedding.embed(audio)
    assert frames.shape == (9, 16) and frames.dtype == np.float32
    np.testing.assert_array_equal(frames, embedding.embed(audio))  # deterministic
    assert embedding.embed(audio[:1000]).shape == (1, 16)  # shorter than a window: one frame
    assert (frames[:, 8:] >= 0).all()  # the std half
    path = save_audio(tmp_path / "long.wav", sine(440, seconds=3.1) + noise(0, seconds=3.1), RATE)
    whole = embedding.embed(load_audio(path, RATE)[0])
    for chunk_seconds in (0.1, 0.7):  # chunks shorter than a window, and not a multiple of the hop
        np.testing.assert_allclose(embed_file(embedding, path, chunk_seconds=chunk_seconds), whole, atol=1e-4)


def test_resampling_resolves_mismatched_sample_rates(tmp_path):
    """The same tone stored at 8 kHz and at 44.1 kHz embeds alike; an octave higher does not."""
    embedding = small_embedding()
    low = embed_file(embedding, save_audio(tmp_path / "low.wav", sine(440, rate=8000), 8000))
    high = embed_file(embedding, save_audio(tmp_path / "high.wav", sine(440, rate=44100), 44100))
    octave = embed_file(embedding, save_audio(tmp_path / "octave.wav", sine(880, rate=8000), 8000))
    assert low.shape == high.shape
    assert np.abs(low - high).mean() < 0.1 * np.abs(low - octave).mean()


def test_fad_sines_against_sines_and_noise(audio_sets, tmp_path):
    embedding = small_embedding()
    same = evaluate_audio_sets(audio_sets / "sines", audio_sets / "sines", embedding=embedding)
    different = evaluate_audio_sets(audio_sets / "noise", audio_sets / "sines", embedding=embedding, out=tmp_path)
    assert same.fad == pytest.approx(0.0, abs=1e-6)
    assert different.fad > 10.0 and np.isfinite(different.fad_inf)
    assert same.files == {"generated": 3, "reference": 3} and same.frames == {"generated": 45, "reference": 45}
    assert same.sample_rates == {"generated": {RATE: 3}, "reference": {RATE: 3}} and not same.notes
    assert same.embedding == "logmel-stats-8" and not same.rejected and not same.reasons
    report = json.loads((tmp_path / "audio_report.json").read_text())
    assert report["fad"] == pytest.approx(different.fad) and len(report["per_song"]) == 3
    assert "FAD-inf" in (tmp_path / "audio_report.md").read_text()


def test_per_song_fad_ranks_noise_further_than_a_sine(audio_sets):
    result = evaluate_audio_sets(audio_sets / "mixed", audio_sets / "sines", embedding=small_embedding())
    by_name = {name.rsplit("/", 1)[-1]: value for name, value in result.per_song.items()}
    assert by_name["b_noise.wav"] > 5 * by_name["a_sine.wav"] > 0


def test_bad_files_are_skipped_and_counted(audio_sets, tmp_path):
    folder = tmp_path / "generated"
    folder.mkdir()
    (folder / "text.wav").write_text("not audio")
    soundfile.write(folder / "nan.wav", np.array([0.1, np.nan, 0.2] * 1000, dtype=np.float32), RATE, subtype="FLOAT")
    save_audio(folder / "silent.wav", np.zeros(2 * RATE, dtype=np.float32), RATE)
    save_audio(folder / "tone8k.wav", sine(300, rate=8000), 8000)
    save_audio(folder / "tone44k.wav", sine(500, rate=44100), 44100)
    result = evaluate_audio_sets(folder, audio_sets / "sines", embedding=small_embedding(), out=tmp_path / "out")
    reasons = {item["path"].rsplit("/", 1)[-1]: item["reason"] for item in result.rejected}
    assert set(reasons) == {"text.wav", "nan.wav"}
    assert "not a readable audio file" in reasons["text.wav"] and "NaN" in reasons["nan.wav"]
    assert result.files["generated"] == 3 and result.sample_rates["generated"] == {8000: 2, 44100: 1}
    assert np.isfinite(result.fad) and np.isfinite(list(result.per_song.values())).all()  # silence included
    assert "resampled to 8000 Hz" in result.notes[0]
    assert len((tmp_path / "out" / "audio_rejected.jsonl").read_text().splitlines()) == 2
    assert "Rejected files (2)" in (tmp_path / "out" / "audio_report.md").read_text()
    with pytest.raises(MusefmError, match="generated set has no readable audio files"):
        evaluate_audio_sets([folder / "text.wav"], audio_sets / "sines", embedding=small_embedding())
    with pytest.raises(MusefmError, match="unknown embedding"):
        evaluate_audio_sets(folder, audio_sets / "sines", embedding="vggish")


def test_short_generated_set_reports_nan_with_reason(audio_sets, tmp_path):
    path = save_audio(tmp_path / "short.wav", sine(330, seconds=0.5), RATE)  # 3 frames for 16 dims
    result = evaluate_audio_sets([path], audio_sets / "sines", embedding=small_embedding(), out=tmp_path / "out")
    assert math.isnan(result.fad) and math.isnan(result.fad_inf) and "singular" in result.reasons["fad"]
    assert np.isfinite(result.per_song[str(path)])  # a song needs only 2 frames
    report = json.loads((tmp_path / "out" / "audio_report.json").read_text())  # strict JSON: NaN -> null
    assert report["fad"] is None and "fad_inf" in report["reasons"]


def test_transcriber_embedding_gives_conv_features(one_thread):
    import torch

    from musefm.models.transcriber import Transcriber, config_from_preset

    torch.manual_seed(0)
    embedding = TranscriberEmbedding(Transcriber(config_from_preset("debug")))
    audio = sine(440, seconds=1.6, rate=16000)  # 1 + (25600 - 16000) // 8000 = 2 windows
    frames = embedding.embed(audio)
    assert frames.shape == (2, 16) and np.isfinite(frames).all()
    assert embedding.embed(audio[:4000]).shape == (1, 16) and embedding.name == "transcriber-conv-16"


def test_evaluate_audio_cli_reports_fad(tmp_path, capsys):
    from musefm.cli import main as cli

    rng = np.random.default_rng(0)
    seconds = np.arange(16000 * 40) / 16000
    for number in range(3):  # 3 x 40 s: 240 frames per set, more than the 128 dimensions
        save_audio(tmp_path / "ref" / f"{number}.wav", (0.3 * np.sin(2 * np.pi * (220 + 55 * number) * seconds)).astype(np.float32), 16000)
        save_audio(tmp_path / "gen" / f"{number}.wav", (0.1 * rng.standard_normal(len(seconds))).astype(np.float32), 16000)
    assert cli(["evaluate", "audio", "--generated", str(tmp_path / "gen"), "--reference", str(tmp_path / "ref"),
                "--out", str(tmp_path / "out"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fad"] > 10 and result["files"]["generated"] == 3
    assert (tmp_path / "out" / "audio_report.md").is_file()
