import tracemalloc

import numpy as np
import pytest
import soundfile

from musefm.audio import io
from musefm.audio.io import (
    NOTE_COLUMNS, audio_info, empty_notes, iter_audio_chunks, load_audio, save_audio,
)
from musefm.errors import BadInputError, MusefmError


def sine(frequency, seconds, sample_rate, amplitude=0.5):
    return (amplitude * np.sin(2 * np.pi * frequency * np.arange(int(seconds * sample_rate)) / sample_rate)).astype(np.float32)


def peak_frequency(audio, sample_rate):
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return np.argmax(spectrum) * sample_rate / len(audio)


def test_notes_conventions():
    assert NOTE_COLUMNS == ("onset", "offset", "pitch", "velocity")
    assert empty_notes().shape == (0, 4) and empty_notes().dtype == np.float64
    assert io.TRANSCRIPTION_SAMPLE_RATE == 16000


@pytest.mark.parametrize("suffix,subtype,tolerance", [
    (".wav", "PCM_U8", 2 ** -6), (".wav", "PCM_16", 2 ** -14), (".wav", "PCM_24", 2 ** -22),
    (".wav", "PCM_32", 2 ** -30), (".wav", "FLOAT", 1e-7), (".wav", "DOUBLE", 1e-7),
    (".aiff", "PCM_S8", 2 ** -6), (".aif", "PCM_16", 2 ** -14), (".flac", "PCM_24", 2 ** -22),
])
def test_every_bit_depth_round_trips(tmp_path, suffix, subtype, tolerance):
    audio = sine(440, 0.1, 8000)
    path = save_audio(tmp_path / f"tone{suffix}", audio, 8000, subtype=subtype)
    loaded, rate = load_audio(path)
    assert rate == 8000 and loaded.dtype == np.float32 and loaded.shape == audio.shape
    np.testing.assert_allclose(loaded, audio, atol=tolerance)
    assert audio_info(path).subtype == subtype


@pytest.mark.parametrize("suffix", [".ogg", ".mp3"])
def test_lossy_formats_keep_the_pitch(tmp_path, suffix):
    path = tmp_path / f"tone{suffix}"
    soundfile.write(str(path), sine(440, 1.0, 16000), 16000)  # save_audio does not write mp3
    loaded, rate = load_audio(path)
    assert rate == 16000 and abs(len(loaded) - 16000) < 2000
    assert abs(peak_frequency(loaded, rate) - 440) < 3


@pytest.mark.parametrize("native_rate", [8000, 192000])
def test_extreme_rates_resample_to_the_requested_rate(tmp_path, native_rate):
    path = save_audio(tmp_path / "tone.wav", sine(1000, 0.5, native_rate), native_rate)
    assert audio_info(path).sample_rate == native_rate
    loaded, rate = load_audio(path, sample_rate=16000)
    assert rate == 16000 and len(loaded) == 8000
    assert abs(peak_frequency(loaded, rate) - 1000) < 3


@pytest.mark.parametrize("channels", range(1, 9))
def test_channels_load_and_mix_to_mono_by_mean(tmp_path, channels):
    rng = np.random.default_rng(channels)
    audio = (rng.uniform(-0.5, 0.5, size=(400, channels))).astype(np.float32)
    path = save_audio(tmp_path / "multi.wav", audio, 8000, subtype="FLOAT")
    assert audio_info(path).channels == channels
    every, _ = load_audio(path, mono=False)
    mixed, _ = load_audio(path)
    assert every.shape == (400, channels) and mixed.shape == (400,)
    np.testing.assert_allclose(mixed, audio.mean(axis=1), atol=1e-6)


def test_normalize_and_silence(tmp_path):
    loud = save_audio(tmp_path / "loud.wav", sine(220, 0.2, 8000, amplitude=0.3), 8000, subtype="FLOAT")
    assert np.max(np.abs(load_audio(loud, normalize=True)[0])) == pytest.approx(0.95, abs=1e-6)
    silent = save_audio(tmp_path / "silent.wav", np.zeros(800, dtype=np.float32), 8000)
    audio, _ = load_audio(silent, normalize=True)
    assert audio.shape == (800,) and not audio.any()


def test_max_seconds_reads_only_the_start(tmp_path):
    path = save_audio(tmp_path / "long.wav", sine(220, 2.0, 8000), 8000)
    assert len(load_audio(path, max_seconds=0.5)[0]) == 4000
    assert len(load_audio(path, sample_rate=16000, max_seconds=0.5)[0]) == 8000


def test_bad_inputs_name_the_problem(tmp_path):
    text = tmp_path / "words.wav"
    text.write_text("this is not audio at all, just words " * 20)
    midi = tmp_path / "song.wav"
    midi.write_bytes(b"MThd\x00\x00\x00\x06\x00\x00\x00\x01\x01\xe0MTrk\x00\x00\x00\x04\x00\xff\x2f\x00")
    empty = tmp_path / "empty.wav"
    soundfile.write(str(empty), np.zeros(0), 8000)
    nan = tmp_path / "nan.wav"
    soundfile.write(str(nan), np.array([0.1, np.nan, 0.2, np.inf]), 8000, subtype="FLOAT")
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    cases = {tmp_path / "missing.wav": "not found", text: "not a readable audio file",
             midi: "not a readable audio file", empty: "0 frames", nan: "NaN or infinite",
             notes: "unsupported audio extension"}
    for path, reason in cases.items():
        readers = [load_audio, lambda p: list(iter_audio_chunks(p, 16000))]
        if path != nan:  # audio_info reads the header only, not the samples
            readers.append(audio_info)
        for read in readers:
            with pytest.raises(BadInputError, match=reason) as caught:
                read(path)
            assert caught.value.path == str(path) and "\n" not in str(caught.value)


def test_nan_found_in_a_late_streamed_block(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "READ_BLOCK_FRAMES", 100)
    audio = sine(220, 0.5, 8000)
    audio[3000] = np.nan
    path = tmp_path / "late_nan.wav"
    soundfile.write(str(path), audio, 8000, subtype="FLOAT")
    with pytest.raises(BadInputError, match=r"NaN or infinite samples \(first at 0.375 s\)"):
        for _ in iter_audio_chunks(path, 16000, chunk_seconds=0.1):
            pass


def test_save_is_atomic_and_picks_the_container(tmp_path):
    audio = sine(330, 0.1, 8000)
    for suffix, container in ((".wav", "WAV"), (".flac", "FLAC"), (".ogg", "OGG")):
        path = save_audio(tmp_path / "out" / f"a{suffix}", audio, 8000)
        assert audio_info(path).format == container
    path = save_audio(tmp_path / "out" / "a.wav", audio * 0, 8000)  # replaces the old file
    assert not load_audio(path)[0].any()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.flac", "a.ogg", "a.wav"]
    with pytest.raises(MusefmError, match="cannot write"):
        save_audio(tmp_path / "a.txt", audio, 8000)
    with pytest.raises(MusefmError, match="NaN"):
        save_audio(tmp_path / "b.wav", np.array([np.nan], dtype=np.float32), 8000)
    assert not (tmp_path / "b.wav").exists()


@pytest.mark.parametrize("native_rate,target_rate,channels", [(44100, 16000, 2), (16000, 16000, 1), (8000, 22050, 3)])
def test_streamed_chunks_equal_the_whole_file(tmp_path, monkeypatch, native_rate, target_rate, channels):
    monkeypatch.setattr(io, "READ_BLOCK_FRAMES", 1234)  # many block boundaries inside each chunk
    rng = np.random.default_rng(0)
    audio = rng.uniform(-0.5, 0.5, size=(int(2.3 * native_rate), channels)).astype(np.float32)
    path = save_audio(tmp_path / "noise.wav", audio, native_rate, subtype="FLOAT")
    chunks = list(iter_audio_chunks(path, target_rate, chunk_seconds=0.5))
    chunk_samples = int(0.5 * target_rate)
    assert all(len(chunk) == chunk_samples for chunk in chunks[:-1]) and 0 < len(chunks[-1]) <= chunk_samples
    assert all(chunk.dtype == np.float32 and chunk.ndim == 1 for chunk in chunks)
    whole, _ = load_audio(path, sample_rate=target_rate)
    np.testing.assert_allclose(np.concatenate(chunks), whole, atol=1e-6)


def test_ten_minute_file_streams_in_bounded_memory(tmp_path):
    path = tmp_path / "ten_minutes.wav"
    with soundfile.SoundFile(str(path), "w", samplerate=8000, channels=1, subtype="PCM_16") as handle:
        for _ in range(10):
            handle.write(sine(440, 60.0, 8000))
    tracemalloc.start()
    try:
        lengths = [len(chunk) for chunk in iter_audio_chunks(path, 16000, chunk_seconds=10.0)]
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lengths == [160000] * 60
    # The whole file at 16 kHz is 38 MB of float32; streaming holds about a chunk (0.64 MB).
    assert peak_bytes < 4_000_000
