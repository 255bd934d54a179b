import numpy as np
import pytest
from scipy import signal as scipy_signal

from musefm.config import from_dict, to_dict
from musefm.audio.augment import (
    AudioAugmentConfig, _biquad, _phase_vocoder, add_noise, add_reverb, apply_gain, augment, detune, pitch_shift,
    random_eq, random_graphic_eq, random_lowpass, time_stretch,
)
from musefm.errors import MusefmError

SR = 16000
NOTES = np.array([[0.10, 0.50, 69.0, 80.0], [0.20, 0.90, 100.0, 64.0], [0.30, 0.40, 22.0, 100.0]])
NO_AUGMENTATION = AudioAugmentConfig(pitch_shift_probability=0.0, time_stretch_probability=0.0, eq_probability=0.0,
                                     reverb_probability=0.0, gain_probability=0.0, noise_probability=0.0,
                                     detune_probability=0.0, lowpass_probability=0.0)
ALWAYS = AudioAugmentConfig(pitch_shift_probability=1.0, time_stretch_probability=1.0, eq_probability=1.0,
                            reverb_probability=1.0, gain_probability=1.0, noise_probability=1.0,
                            detune_probability=1.0, lowpass_probability=1.0, graphic_eq_probability=1.0)


def sine(frequency, seconds, amplitude=0.5):
    return (amplitude * np.sin(2 * np.pi * frequency * np.arange(int(seconds * SR)) / SR)).astype(np.float32)


def peak_frequency(audio):
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return np.argmax(spectrum) * SR / len(audio)


def envelope(audio, width=128):
    return np.sqrt(np.convolve(audio.astype(np.float64) ** 2, np.ones(width) / width, mode="same"))


def test_phase_vocoder_at_rate_one_reconstructs_the_input():
    audio = np.random.default_rng(0).standard_normal(16001)
    np.testing.assert_allclose(_phase_vocoder(audio, SR, 1.0, len(audio)), audio, atol=1e-8)


@pytest.mark.parametrize("semitones", [12, -5, 2])
def test_pitch_shift_moves_the_tone_and_the_notes(semitones):
    audio = sine(440, 1.0)
    shifted, notes = pitch_shift(audio, SR, NOTES, semitones)
    assert shifted.shape == audio.shape and shifted.dtype == np.float32
    assert abs(peak_frequency(shifted) - 440 * 2 ** (semitones / 12)) < 3
    kept = NOTES[(NOTES[:, 2] + semitones >= 21) & (NOTES[:, 2] + semitones <= 108)]
    np.testing.assert_array_equal(notes[:, 2], kept[:, 2] + semitones)
    np.testing.assert_array_equal(notes[:, [0, 1, 3]], kept[:, [0, 1, 3]])
    assert len(notes) == (2 if semitones in (12, -5) else 3)  # 100 + 12 and 22 - 5 leave the piano


def test_pitch_shift_rejects_more_than_an_octave():
    with pytest.raises(MusefmError, match="semitones"):
        pitch_shift(sine(440, 0.1), SR, NOTES, 13)


@pytest.mark.parametrize("rate", [0.8, 1.25])
def test_time_stretch_scales_time_not_pitch(rate):
    # Silence, then a tone from 1.0 s to 2.0 s, then silence.
    audio = np.concatenate([np.zeros(SR), sine(440, 1.0), np.zeros(SR // 2)]).astype(np.float32)
    stretched, notes = time_stretch(audio, SR, NOTES, rate)
    assert len(stretched) == round(len(audio) / rate)
    np.testing.assert_allclose(notes[:, :2], NOTES[:, :2] / rate)
    np.testing.assert_array_equal(notes[:, 2:], NOTES[:, 2:])
    tone = stretched[int(1.2 * SR / rate): int(1.8 * SR / rate)]
    assert abs(peak_frequency(tone) - 440) < 3
    level = envelope(stretched)
    loud = level > 0.5 * level[int(1.5 * SR / rate)]
    onset, offset = np.argmax(loud) / SR, (len(loud) - np.argmax(loud[::-1])) / SR
    hop_seconds = 256 / SR  # the vocoder's hop at 16 kHz
    assert abs(onset - 1.0 / rate) < hop_seconds and abs(offset - 2.0 / rate) < hop_seconds


def test_gain_and_its_clipping_guard():
    audio = sine(440, 0.1, amplitude=0.1)
    np.testing.assert_allclose(apply_gain(audio, 6.0), audio * 10 ** (6 / 20), rtol=1e-6)
    loud = apply_gain(audio, 40.0)  # x100 would clip: rescaled to peak 1 instead
    assert np.max(np.abs(loud)) == pytest.approx(1.0) and np.allclose(loud / np.max(loud), audio / np.max(audio), atol=1e-6)


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 30.0])
def test_noise_has_the_requested_snr(snr_db):
    audio = sine(440, 0.5, amplitude=0.1)
    noisy = add_noise(audio, snr_db, np.random.default_rng(1))
    noise = noisy.astype(np.float64) - audio
    measured = 10 * np.log10(np.mean(audio.astype(np.float64) ** 2) / np.mean(noise ** 2))
    assert abs(measured - snr_db) < 0.1
    assert not add_noise(np.zeros(100, np.float32), 10.0, np.random.default_rng(1)).any()  # silence stays silent


def test_biquads_have_the_cookbook_gains():
    def gain_at(section, hz):
        _, response = scipy_signal.sosfreqz(section[None], worN=[hz], fs=SR)
        return 20 * np.log10(abs(response[0]))

    peaking = _biquad("peaking", 1000.0, 6.0, 1.0, SR)
    assert gain_at(peaking, 1000.0) == pytest.approx(6.0, abs=1e-6) and abs(gain_at(peaking, 60.0)) < 0.1
    low = _biquad("lowshelf", 300.0, -6.0, 0.707, SR)
    assert gain_at(low, 10.0) == pytest.approx(-6.0, abs=0.05) and abs(gain_at(low, 6000.0)) < 0.05
    high = _biquad("highshelf", 2000.0, 4.0, 0.707, SR)
    assert gain_at(high, 7900.0) == pytest.approx(4.0, abs=0.1) and abs(gain_at(high, 50.0)) < 0.05


def test_random_eq_is_seeded_and_bounded():
    audio = np.random.default_rng(0).uniform(-1, 1, SR // 2).astype(np.float32)
    first = random_eq(audio, SR, np.random.default_rng(3))
    assert np.array_equal(first, random_eq(audio, SR, np.random.default_rng(3)))
    assert not np.array_equal(first, random_eq(audio, SR, np.random.default_rng(4)))
    assert first.shape == audio.shape and np.isfinite(first).all() and np.max(np.abs(first)) <= 1.0


def test_random_graphic_eq_sets_each_partial_to_its_band_gain():
    # A 160 Hz tone and its octave, each at a third-octave band centre (40 Hz * 2^(k/3), k = 6, 9):
    # each comes out scaled by its own band's drawn gain, so their balance changes.
    low, high = 40.0 * 2 ** 2, 40.0 * 2 ** 3
    audio = sine(low, 2.0, 0.05) + sine(high, 2.0, 0.05)
    shaped = random_graphic_eq(audio, SR, np.random.default_rng(3))
    assert np.array_equal(shaped, random_graphic_eq(audio, SR, np.random.default_rng(3)))
    gains_db = np.random.default_rng(3).uniform(-6.0, 6.0, 24)  # the 24 band gains (40 Hz..8 kHz), drawn in order
    middle = slice(SR // 2, 3 * SR // 2)  # a whole number of both tones' periods
    times = np.arange(2 * SR)[middle] / SR
    for band, frequency in ((6, low), (9, high)):
        amplitude = 2 * np.hypot(np.mean(shaped[middle] * np.sin(2 * np.pi * frequency * times)),
                                 np.mean(shaped[middle] * np.cos(2 * np.pi * frequency * times)))
        assert 20 * np.log10(amplitude / 0.05) == pytest.approx(gains_db[band], abs=0.2)
    assert shaped.shape == audio.shape and shaped.dtype == np.float32


@pytest.mark.parametrize("cents", [30.0, -45.0])
def test_detune_moves_the_tone_by_cents_and_rescales_time_not_keys(cents):
    audio = sine(440, 2.0)
    retuned, notes = detune(audio, SR, NOTES, cents)
    factor = 2 ** (cents / 1200)
    assert retuned.shape == audio.shape and retuned.dtype == np.float32
    assert abs(peak_frequency(retuned[: int(1.9 * SR)]) - 440 * factor) < 1.0  # 0.5 Hz bins; 30 cents = 7.7 Hz
    np.testing.assert_allclose(notes[:, :2], NOTES[:, :2] / factor)
    np.testing.assert_array_equal(notes[:, 2:], NOTES[:, 2:])  # same keys, same velocities
    # A click at 1 s is heard at 1 / factor seconds, where the notes' times moved.
    click = np.zeros(SR * 2, dtype=np.float32)
    click[SR] = 1.0
    moved, _ = detune(click, SR, NOTES, cents)
    assert abs(np.argmax(np.abs(moved)) / SR - 1.0 / factor) < 2e-4
    with pytest.raises(MusefmError, match="cents"):
        detune(audio, SR, NOTES, 60.0)


def test_random_lowpass_removes_what_lies_above_its_cutoff():
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, SR * 2).astype(np.float32)
    dull = random_lowpass(noise, SR, np.random.default_rng(3), cutoff_hz=(1000.0, 1000.0))
    assert np.array_equal(dull, random_lowpass(noise, SR, np.random.default_rng(3), cutoff_hz=(1000.0, 1000.0)))
    spectrum_in, spectrum_out = (np.abs(np.fft.rfft(x.astype(np.float64))) ** 2 for x in (noise, dull))
    freqs = np.fft.rfftfreq(len(noise), 1 / SR)

    def gain_db(low, high):
        band = (freqs >= low) & (freqs < high)
        return 10 * np.log10(spectrum_out[band].sum() / spectrum_in[band].sum())

    assert gain_db(100, 600) > -1.0  # the pass band is kept
    assert gain_db(3000, 7000) < -40.0  # order 4 or 8: at least 24 dB/octave past 1 kHz
    assert dull.shape == noise.shape and np.max(np.abs(dull)) <= 1.0


def test_reverb_decays_at_the_requested_rt60():
    impulse = np.zeros(SR, dtype=np.float32)
    impulse[1600] = 1.0
    wet = add_reverb(impulse, SR, np.random.default_rng(0), rt60_range=(0.5, 0.5), wet_range=(1.0, 1.0))
    assert wet.shape == impulse.shape and np.max(np.abs(wet)) <= 1.0 and np.abs(wet[:1600]).max() < 1e-9  # causal

    def energy(start_seconds):
        start = 1600 + int(start_seconds * SR)
        return np.sum(wet[start: start + SR // 10].astype(np.float64) ** 2)

    decay_db = 10 * np.log10(energy(0.05) / energy(0.25))
    assert decay_db == pytest.approx(60 * 0.2 / 0.5, abs=2.0)  # -60 dB per rt60


def test_augment_is_seeded_and_identity_when_off():
    audio = sine(440, 0.5)
    first = augment(audio, SR, NOTES, ALWAYS, np.random.default_rng(7))
    second = augment(audio, SR, NOTES, ALWAYS, np.random.default_rng(7))
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert np.isfinite(first[0]).all() and np.max(np.abs(first[0])) <= 1.0 and first[0].dtype == np.float32
    untouched, notes = augment(audio, SR, NOTES, NO_AUGMENTATION, np.random.default_rng(7))
    assert np.array_equal(untouched, audio) and np.array_equal(notes, NOTES)


def test_augment_config_validation_and_round_trip():
    assert from_dict(AudioAugmentConfig, to_dict(ALWAYS)) == ALWAYS
    assert AudioAugmentConfig(gain_db=[-3, 3]).gain_db == (-3, 3)  # YAML lists become tuples
    with pytest.raises(MusefmError, match="noise_probability"):
        AudioAugmentConfig(noise_probability=1.5)
    with pytest.raises(MusefmError, match="pitch_shift_semitones"):
        AudioAugmentConfig(pitch_shift_semitones=(-13, 2))
    with pytest.raises(MusefmError, match="time_stretch_rate"):
        AudioAugmentConfig(time_stretch_rate=(1.2, 0.9))
    # A window reader fetches enough audio for the fastest stretch and the sharpest detune together.
    assert AudioAugmentConfig(time_stretch_rate=(0.9, 1.1), detune_cents=(-30, 30)).max_speedup() == pytest.approx(
        1.1 * 2 ** (30 / 1200))
    assert AudioAugmentConfig(time_stretch_rate=(0.8, 0.9), detune_cents=(-30, -10)).max_speedup() == 1.0
    with pytest.raises(MusefmError, match="detune_cents"):
        AudioAugmentConfig(detune_cents=(-60.0, 10.0))
    with pytest.raises(MusefmError, match="lowpass_cutoff_hz"):
        AudioAugmentConfig(lowpass_cutoff_hz=(0.0, 1000.0))


def test_mix_sums_at_unit_gain_keeps_both_notes_and_rescales_only_past_full_scale():
    from musefm.audio.augment import mix

    quiet, loud = np.full(100, 0.2, np.float32), np.linspace(0.0, 0.9, 100, dtype=np.float32)
    notes, other = np.array([[0.0, 0.5, 60, 80]]), np.array([[0.1, 0.3, 64, 50]])
    audio, both = mix(quiet, notes, quiet, other)
    assert np.allclose(audio, 0.4) and both.tolist() == notes.tolist() + other.tolist()
    audio, _ = mix(loud, notes, loud, other)
    assert np.allclose(audio, np.linspace(0.0, 1.0, 100))  # a 1.8 peak rescaled to full scale, not clipped
    with pytest.raises(MusefmError, match="one length"):
        mix(quiet, notes, quiet[:50], other)
