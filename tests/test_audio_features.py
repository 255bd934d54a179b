import numpy as np
import pytest
import torch

from musefm.config import from_dict, to_dict
from musefm.audio.features import (
    FeatureCache, LogMelSpectrogram, MelConfig, cqt_spectrogram, hz_to_mel, log_mel_for_file, mel_filterbank,
    mel_to_hz, num_frames,
)
from musefm.audio.io import iter_audio_chunks, load_audio, save_audio
from musefm.errors import MusefmError

SMALL = MelConfig(sample_rate=16000, n_fft=512, hop_length=160, n_mels=40, fmin=30.0, fmax=8000.0)


def sine(frequency, seconds, sample_rate, amplitude=0.5):
    return (amplitude * np.sin(2 * np.pi * frequency * np.arange(int(seconds * sample_rate)) / sample_rate)).astype(np.float32)


def test_slaney_mel_scale_hand_values():
    assert hz_to_mel(200.0) == pytest.approx(3.0)
    assert hz_to_mel(1000.0) == pytest.approx(15.0)
    assert hz_to_mel(6400.0) == pytest.approx(42.0)  # 27 mels per factor 6.4 above 1 kHz
    hz = np.array([0.0, 30.0, 999.0, 1000.0, 1001.0, 4000.0, 22050.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(hz)), hz, rtol=1e-12, atol=1e-9)


def test_filterbank_hand_computed_case():
    # 8 kHz, n_fft 32: bins every 250 Hz. One filter from 0 to 1000 Hz (linear part: edges 0, 500,
    # 1000 Hz), so 0.5 at 250 and 750 Hz, 1 at 500 Hz, times the area normalisation 2 / 1000 Hz.
    weights = mel_filterbank(8000, 32, 1, 0.0, 1000.0)
    assert weights.shape == (1, 17)
    expected = np.zeros(17)
    expected[1:4] = [0.001, 0.002, 0.001]
    np.testing.assert_allclose(weights[0].numpy(), expected, atol=1e-9)


def test_filterbank_filters_are_unit_area_triangles_at_rising_centres():
    config = MelConfig()
    weights = mel_filterbank(config.sample_rate, config.n_fft, config.n_mels, config.fmin, config.fmax).double().numpy()
    assert weights.shape == (229, 1025) and (weights >= 0).all()
    bin_hz = config.sample_rate / config.n_fft
    centres_hz = mel_to_hz(np.linspace(hz_to_mel(config.fmin), hz_to_mel(config.fmax), config.n_mels + 2))[1:-1]
    assert (np.diff(centres_hz) > 0).all()
    for row, centre_hz in zip(weights, centres_hz):
        support = np.flatnonzero(row)
        assert len(support) and (np.diff(support) == 1).all()  # one contiguous run
        values = row[support]
        peak = int(np.argmax(values))
        assert (np.diff(values[: peak + 1]) > 0).all() and (np.diff(values[peak:]) < 0).all()  # triangle
        assert abs(support[peak] * bin_hz - centre_hz) <= bin_hz
    wide = weights[(weights > 0).sum(axis=1) >= 20]  # wide enough for the sum to approximate the area
    np.testing.assert_allclose(wide.sum(axis=1) * bin_hz, 1.0, rtol=0.02)


def test_mel_config_round_trip_and_validation():
    assert from_dict(MelConfig, to_dict(SMALL)) == SMALL
    with pytest.raises(MusefmError, match="n_mel"):
        from_dict(MelConfig, {"n_mel": 10})
    with pytest.raises(MusefmError, match="fmax"):
        MelConfig(fmax=9000.0)


@pytest.mark.parametrize("num_samples", [1, 100, 256, 257, 3200, 16001])
def test_frame_count_matches_num_frames(num_samples):
    module = LogMelSpectrogram(SMALL)
    features = module(torch.zeros(2, num_samples))
    assert features.shape == (2, num_frames(num_samples, SMALL.hop_length), SMALL.n_mels)
    assert features.dtype == torch.float32
    assert torch.allclose(features, torch.tensor(np.log(SMALL.log_floor), dtype=torch.float32))  # silence


def test_log_mel_peaks_in_the_band_of_the_tone_and_stores_nothing():
    module = LogMelSpectrogram(SMALL)
    features = module(torch.from_numpy(sine(1000, 0.5, 16000)))  # (frames, n_mels)
    assert features.shape == (num_frames(8000, 160), 40)
    centres_hz = mel_to_hz(np.linspace(hz_to_mel(SMALL.fmin), hz_to_mel(SMALL.fmax), SMALL.n_mels + 2))[1:-1]
    assert int(features[10:-10].mean(0).argmax()) == int(np.argmin(np.abs(centres_hz - 1000)))
    assert module.state_dict() == {}  # window and filterbank derive from the config


def test_cqt_tone_peaks_in_its_bin():
    features = cqt_spectrogram(sine(440, 1.0, 16000), 16000, hop_length=320)  # numpy input
    assert features.shape == (num_frames(16000, 320), 264)
    assert int(features.mean(0).argmax()) == 144  # A4 = 27.5 Hz * 2 ** (144 / 36)
    with pytest.raises(MusefmError, match="Nyquist"):
        cqt_spectrogram(np.zeros(100), 8000, 80)


def test_feature_cache_computes_once_per_content_and_config(tmp_path):
    path = save_audio(tmp_path / "a.wav", sine(440, 0.2, 16000), 16000)
    calls = []

    def compute(audio_path, config):
        calls.append(config.n_mels)
        return np.full((3, config.n_mels), float(len(calls)), dtype=np.float32)

    cache = FeatureCache(tmp_path / "cache")
    first = cache.get(path, SMALL, compute)
    again = cache.get(path, SMALL, compute)
    assert calls == [40] and np.array_equal(first, again) and again.dtype == np.float32
    other = from_dict(MelConfig, {**to_dict(SMALL), "n_mels": 20})
    assert cache.get(path, other, compute).shape == (3, 20) and calls == [40, 20]
    save_audio(path, sine(220, 0.2, 16000), 16000)  # new content, same name
    assert cache.get(path, SMALL, compute)[0, 0] == 3.0 and len(calls) == 3
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 3
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    for entry in (tmp_path / "cache").rglob("*.npy"):
        entry.write_bytes(b"garbage")  # a damaged entry is recomputed, not an error
    assert cache.get(path, SMALL, compute)[0, 0] == 4.0


def test_streamed_log_mel_equals_whole_file(tmp_path):
    rng = np.random.default_rng(0)
    audio = (0.3 * rng.standard_normal(int(1.3 * 22050))).astype(np.float32)
    path = save_audio(tmp_path / "noise.wav", audio, 22050, subtype="FLOAT")  # resampled to 16 kHz
    whole_audio, _ = load_audio(path, sample_rate=SMALL.sample_rate)
    whole = LogMelSpectrogram(SMALL)(torch.from_numpy(whole_audio)).numpy()
    streamed = log_mel_for_file(path, SMALL, chunk_seconds=0.07)  # ~19 chunks, not hop multiples
    assert streamed.shape == whole.shape == (num_frames(len(whole_audio), 160), 40)
    np.testing.assert_allclose(streamed, whole, atol=1e-5)
    cache = FeatureCache(tmp_path / "cache")
    cached = log_mel_for_file(path, SMALL, cache=cache, chunk_seconds=0.07)
    assert np.array_equal(cached, log_mel_for_file(path, SMALL, cache=cache)) and cached.dtype == np.float32


def test_log_mel_blocks_come_as_the_audio_streams_in(tmp_path, monkeypatch):
    """The first frames arrive after two chunks of audio have been read, not the whole file."""
    import musefm.audio.features as features

    audio = (0.3 * np.random.default_rng(1).standard_normal(16000 * 3)).astype(np.float32)
    path = save_audio(tmp_path / "noise.wav", audio, 16000, subtype="FLOAT")
    read = []

    def counted_chunks(*args, **kwargs):
        for chunk in iter_audio_chunks(*args, **kwargs):
            read.append(len(chunk))
            yield chunk

    monkeypatch.setattr(features, "iter_audio_chunks", counted_chunks)
    blocks = features.iter_log_mel(path, SMALL, chunk_seconds=0.25)  # 12 chunks
    first = next(blocks)
    assert len(read) == 2 and first.shape[1] == SMALL.n_mels
    rest = list(blocks)
    assert len(read) == 12 and len(rest) == 11
    np.testing.assert_array_equal(np.concatenate([first, *rest]), log_mel_for_file(path, SMALL, chunk_seconds=0.25))


def test_log_mel_stays_on_its_device_and_in_float32():
    module = LogMelSpectrogram(SMALL)
    audio = torch.from_numpy(sine(440, 0.25, 16000))
    reference = module(audio)
    # Meta tensors have no data: any host round trip (numpy, .item()) inside forward would fail.
    assert module.to("meta")(audio.to("meta")).shape == reference.shape
    module = LogMelSpectrogram(SMALL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = module(audio.to(torch.bfloat16))
    assert under_autocast.dtype == torch.float32
    assert torch.allclose(under_autocast, LogMelSpectrogram(SMALL)(audio.to(torch.bfloat16).float()), atol=1e-5)
