"""Audio augmentation that keeps note labels true.

Pitch shift and time stretch move the notes with the audio; detuning (less than half a semitone)
rescales their times only; gain, noise, EQ, low-pass and reverb leave them as they are. Every
function is deterministic given its arguments (randomness only through the ``np.random.Generator``
passed in), returns float32 within [-1, 1] (rescaled, never clipped), and never produces NaN.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import soxr
import torch
from scipy import signal as scipy_signal

from musefm.errors import MusefmError

PIANO_LOWEST_PITCH, PIANO_HIGHEST_PITCH = 21, 108  # A0..C8: notes shifted outside are dropped
MAX_SEMITONES = 12
MAX_DETUNE_CENTS = 49.0  # beyond half a semitone the nearest key, hence the label, would change
STRETCH_RATE_LIMITS = (0.25, 4.0)


def _check(audio: np.ndarray, notes: np.ndarray | None = None) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise MusefmError(f"augmentation takes mono audio (samples,), got shape {audio.shape}")
    if not np.isfinite(audio).all():
        raise MusefmError("augmentation input contains NaN or infinite samples")
    if notes is not None and (np.ndim(notes) != 2 or np.shape(notes)[1] != 4):
        raise MusefmError(f"notes must be an (N, 4) array (onset, offset, pitch, velocity), got {np.shape(notes)}")
    return audio


def _keep_in_range(audio: np.ndarray) -> np.ndarray:
    """Rescale (not clip) into [-1, 1] so the waveform's shape, hence the labels, stay true."""
    audio = np.nan_to_num(np.asarray(audio, dtype=np.float64))
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak > 1.0:
        audio = audio / peak
    return np.clip(audio, -1.0, 1.0).astype(np.float32)  # clip only guards float rounding


def _fit_length(audio: np.ndarray, length: int) -> np.ndarray:
    return audio[:length] if len(audio) >= length else np.pad(audio, (0, length - len(audio)))


def _vocoder_sizes(sample_rate: int) -> tuple[int, int]:
    """About 64 ms windows (1024 at 16 kHz, 2048 at 44.1 kHz) with 75% overlap."""
    n_fft = 2 ** round(math.log2(sample_rate * 0.064))
    return n_fft, n_fft // 4


def _phase_vocoder(audio: np.ndarray, sample_rate: int, rate: float, length: int) -> np.ndarray:
    """Time-stretch by ``rate`` (>1 faster) keeping pitch: STFT frames are read at fractional steps
    of ``rate``, magnitudes interpolated, and phases advanced by each bin's measured frequency so
    partials stay continuous. Returns ``length`` samples (float64)."""
    n_fft, hop = _vocoder_sizes(sample_rate)
    window = torch.hann_window(n_fft, dtype=torch.float64)
    source = torch.from_numpy(np.asarray(audio, dtype=np.float64))
    if len(source) <= n_fft // 2:  # too short for reflect padding: pad with silence first
        source = torch.nn.functional.pad(source, (0, n_fft // 2 + 1 - len(source)))
    spectrum = torch.stft(source, n_fft, hop, window=window, center=True, return_complex=True).numpy()  # (bins, frames)
    steps = np.arange(0.0, spectrum.shape[1], rate)  # (out_frames,) fractional input frame per output frame
    padded = np.pad(spectrum, ((0, 0), (0, 2)))  # (bins, frames + 2): reads past the end see silence
    left, right = padded[:, steps.astype(int)], padded[:, steps.astype(int) + 1]  # (bins, out_frames)
    fraction = steps % 1.0
    magnitude = (1.0 - fraction) * np.abs(left) + fraction * np.abs(right)
    expected_advance = np.linspace(0.0, np.pi * hop, spectrum.shape[0])[:, None]  # 2 pi k hop / n_fft
    deviation = np.angle(right) - np.angle(left) - expected_advance
    deviation -= 2.0 * np.pi * np.round(deviation / (2.0 * np.pi))  # wrap to [-pi, pi]
    advance = expected_advance + deviation  # (bins, out_frames)
    phase = np.angle(spectrum[:, :1]) + np.concatenate([np.zeros_like(advance[:, :1]), np.cumsum(advance[:, :-1], axis=1)], axis=1)
    stretched = torch.from_numpy(magnitude * np.exp(1j * phase))
    # Without ``length`` istft stops at the last frame's centre, dropping up to a hop at the end.
    reachable = (stretched.shape[1] - 1) * hop + n_fft // 2
    output = torch.istft(stretched, n_fft, hop, window=window, center=True, length=min(length, reachable)).numpy()
    return _fit_length(output, length)


def time_stretch(audio: np.ndarray, sample_rate: int, notes: np.ndarray, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Play ``rate`` times faster (rate > 1 shortens) at the same pitch: output length is
    round(len / rate); note onsets and offsets are divided by ``rate``."""
    audio = _check(audio, notes)
    if not STRETCH_RATE_LIMITS[0] <= rate <= STRETCH_RATE_LIMITS[1]:
        raise MusefmError(f"time_stretch rate must be within {STRETCH_RATE_LIMITS}, got {rate}")
    notes = np.array(notes, dtype=np.float64)
    if rate == 1.0:
        return audio.copy(), notes
    stretched = _phase_vocoder(audio, sample_rate, rate, int(round(len(audio) / rate)))
    notes[:, :2] /= rate
    return _keep_in_range(stretched), notes


def pitch_shift(audio: np.ndarray, sample_rate: int, notes: np.ndarray, semitones: int) -> tuple[np.ndarray, np.ndarray]:
    """Shift by whole semitones at the same tempo and length: stretch the audio by the pitch
    factor, then resample it back to its length (which raises the pitch by that factor). Note
    pitches move by ``semitones``; notes leaving the piano range 21..108 are dropped."""
    audio = _check(audio, notes)
    if int(semitones) != semitones or abs(semitones) > MAX_SEMITONES:
        raise MusefmError(f"pitch_shift takes whole semitones within +-{MAX_SEMITONES}, got {semitones}")
    notes = np.array(notes, dtype=np.float64)
    if semitones == 0:
        return audio.copy(), notes
    factor = 2.0 ** (semitones / 12.0)
    longer = _phase_vocoder(audio, sample_rate, 1.0 / factor, int(round(len(audio) * factor)))
    # Read as if recorded at sample_rate * factor: resampling to sample_rate scales frequencies by factor.
    shifted = soxr.resample(longer, sample_rate * factor, sample_rate, quality="HQ")
    notes[:, 2] += semitones
    in_range = (notes[:, 2] >= PIANO_LOWEST_PITCH) & (notes[:, 2] <= PIANO_HIGHEST_PITCH)
    return _keep_in_range(_fit_length(shifted, len(audio))), notes[in_range]


def detune(audio: np.ndarray, sample_rate: int, notes: np.ndarray, cents: float) -> tuple[np.ndarray, np.ndarray]:
    """Retune by a fraction of a semitone, as a piano tuned to another A or a tape played a little
    fast or slow: the audio is read as if recorded at ``sample_rate * factor``, which raises every
    frequency by ``cents`` and shortens time by the same factor. Pitches keep their keys; onsets and
    offsets are divided by the factor. The output has the input's length (padded with silence)."""
    audio = _check(audio, notes)
    if abs(cents) > MAX_DETUNE_CENTS:
        raise MusefmError(f"detune takes at most +-{MAX_DETUNE_CENTS:g} cents (the labels would change key), got {cents}")
    notes = np.array(notes, dtype=np.float64)
    if cents == 0:
        return audio.copy(), notes
    factor = 2.0 ** (cents / 1200.0)
    retuned = soxr.resample(audio, sample_rate * factor, sample_rate, quality="HQ")
    notes[:, :2] /= factor
    return _keep_in_range(_fit_length(retuned, len(audio))), notes


def random_lowpass(audio: np.ndarray, sample_rate: int, rng: np.random.Generator,
                   cutoff_hz: tuple[float, float] = (800.0, 4000.0)) -> np.ndarray:
    """A steep Butterworth low-pass (order 4 or 8) at a log-uniform cutoff: a duller piano or
    microphone whose high notes are nearly pure tones, so that a model must find them by their
    fundamentals rather than by the harmonics that other instruments give them."""
    audio = _check(audio)
    nyquist_guard = 0.45 * sample_rate
    low, high = min(cutoff_hz[0], nyquist_guard), min(cutoff_hz[1], nyquist_guard)
    cutoff = math.exp(rng.uniform(math.log(low), math.log(high)))
    order = int(rng.choice([4, 8]))
    sections = scipy_signal.butter(order, cutoff, fs=sample_rate, output="sos")
    return _keep_in_range(scipy_signal.sosfilt(sections, audio.astype(np.float64)))


def apply_gain(audio: np.ndarray, gain_db: float) -> np.ndarray:
    """Louder or quieter by ``gain_db``; a gain that would clip is reduced to reach peak 1."""
    return _keep_in_range(_check(audio).astype(np.float64) * 10.0 ** (gain_db / 20.0))


def mix(audio: np.ndarray, notes: np.ndarray, other_audio: np.ndarray, other_notes: np.ndarray
        ) -> tuple[np.ndarray, np.ndarray]:
    """Two excerpts of one length played together, and both their notes. Summed at unit gain, each
    note stays as loud as it was (its velocity label stays true); only a peak past full scale
    rescales the whole mix, as a gain change would."""
    audio, other_audio = _check(audio, notes), _check(other_audio, other_notes)
    if len(audio) != len(other_audio):
        raise MusefmError(f"mix takes excerpts of one length, got {len(audio)} and {len(other_audio)} samples")
    return _keep_in_range(audio.astype(np.float64) + other_audio), np.concatenate([notes, other_notes])


def add_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White Gaussian noise scaled so signal power / noise power is exactly ``snr_db``. Silence
    has no signal power to be relative to, so it is returned unchanged."""
    audio = _check(audio).astype(np.float64)
    signal_power = float(np.mean(audio ** 2)) if audio.size else 0.0
    if signal_power == 0.0:
        return audio.astype(np.float32)
    noise = rng.standard_normal(len(audio))
    noise *= math.sqrt(signal_power / 10.0 ** (snr_db / 10.0) / np.mean(noise ** 2))
    return _keep_in_range(audio + noise)


def _biquad(kind: str, frequency: float, gain_db: float, q: float, sample_rate: int) -> np.ndarray:
    """One RBJ Audio EQ Cookbook biquad as a second-order section [b0 b1 b2 a0 a1 a2]."""
    amplitude = 10.0 ** (gain_db / 40.0)
    w0 = 2.0 * math.pi * frequency / sample_rate
    cos_w0, alpha = math.cos(w0), math.sin(w0) / (2.0 * q)
    if kind == "peaking":
        b = [1 + alpha * amplitude, -2 * cos_w0, 1 - alpha * amplitude]
        a = [1 + alpha / amplitude, -2 * cos_w0, 1 - alpha / amplitude]
    else:  # shelves; q here is the cookbook's Q (0.707 = no overshoot)
        root = 2.0 * math.sqrt(amplitude) * alpha
        plus, minus = amplitude + 1, amplitude - 1
        sign = 1.0 if kind == "lowshelf" else -1.0
        b = [amplitude * (plus - sign * minus * cos_w0 + root), sign * 2 * amplitude * (minus - sign * plus * cos_w0),
             amplitude * (plus - sign * minus * cos_w0 - root)]
        a = [plus + sign * minus * cos_w0 + root, -sign * 2 * (minus + sign * plus * cos_w0),
             plus + sign * minus * cos_w0 - root]
    return np.array(b + a) / a[0]


def random_eq(audio: np.ndarray, sample_rate: int, rng: np.random.Generator, max_gain_db: float = 6.0) -> np.ndarray:
    """A low shelf, a peaking band and a high shelf with random frequencies and gains within
    +-``max_gain_db``: the colour of a different microphone, room or piano."""
    audio = _check(audio).astype(np.float64)
    nyquist_guard = 0.45 * sample_rate
    bands = [("lowshelf", rng.uniform(60.0, 400.0), 0.707),
             ("peaking", math.exp(rng.uniform(math.log(200.0), math.log(min(6000.0, nyquist_guard)))), rng.uniform(0.5, 3.0)),
             ("highshelf", rng.uniform(min(2000.0, nyquist_guard / 2), min(8000.0, nyquist_guard)), 0.707)]
    sections = np.stack([_biquad(kind, frequency, rng.uniform(-max_gain_db, max_gain_db), q, sample_rate)
                         for kind, frequency, q in bands])  # (3, 6)
    return _keep_in_range(scipy_signal.sosfilt(sections, audio))


def random_graphic_eq(audio: np.ndarray, sample_rate: int, rng: np.random.Generator, max_gain_db: float = 6.0,
                      bands_per_octave: int = 3) -> np.ndarray:
    """A graphic EQ: an independent gain within +-``max_gain_db`` for every 1/``bands_per_octave``-octave
    band from 40 Hz up, linear in dB between band centres, applied with zero phase. Unlike the
    three broad bands of ``random_eq``, a note's partials land in different bands, so their balance
    changes (the second partial of a piano note lies three third-octave bands above the first):
    the spectra of other pianos, which a model must not mistake for other notes."""
    audio = _check(audio).astype(np.float64)
    if audio.size == 0:
        return audio.astype(np.float32)
    lowest, nyquist = 40.0, sample_rate / 2.0
    centres = lowest * 2.0 ** (np.arange(int(math.log2(nyquist / lowest) * bands_per_octave) + 2) / bands_per_octave)
    gains_db = rng.uniform(-max_gain_db, max_gain_db, len(centres))
    # The filter's impulse response lasts about as long as its narrowest band (a few tens of ms at
    # 40 Hz); padding by 0.25 s keeps the FFT's circular convolution from wrapping the end onto the start.
    padded = len(audio) + int(0.25 * sample_rate)
    spectrum = np.fft.rfft(audio, n=padded)
    frequencies = np.fft.rfftfreq(padded, 1.0 / sample_rate)
    log_frequencies = np.log2(np.maximum(frequencies, lowest))  # below 40 Hz: the lowest band's gain
    curve_db = np.interp(log_frequencies, np.log2(centres), gains_db)
    return _keep_in_range(np.fft.irfft(spectrum * 10.0 ** (curve_db / 20.0), n=padded)[: len(audio)])


def add_reverb(audio: np.ndarray, sample_rate: int, rng: np.random.Generator,
               rt60_range: tuple[float, float] = (0.2, 1.0), wet_range: tuple[float, float] = (0.1, 0.4)) -> np.ndarray:
    """Mix in the audio convolved with a synthetic room: Gaussian noise under an exponential decay
    reaching -60 dB at rt60 seconds. Length is kept (the tail past the end is cut)."""
    audio = _check(audio).astype(np.float64)
    rt60 = rng.uniform(*rt60_range)
    wet_share = rng.uniform(*wet_range)
    times = np.arange(max(1, int(rt60 * sample_rate))) / sample_rate
    impulse_response = rng.standard_normal(len(times)) * np.exp(-math.log(1000.0) * times / rt60)
    wet = scipy_signal.fftconvolve(audio, impulse_response)[: len(audio)]
    wet_rms, dry_rms = np.sqrt(np.mean(wet ** 2)), np.sqrt(np.mean(audio ** 2))
    if wet_rms > 0:
        wet *= dry_rms / wet_rms  # the wet share, not the room's size, sets how loud the reverb is
    return _keep_in_range((1.0 - wet_share) * audio + wet_share * wet)


@dataclass
class AudioAugmentConfig:
    """Probabilities and ranges of each augmentation; ranges are (low, high), drawn uniformly
    (semitones as whole numbers, both ends included)."""

    pitch_shift_probability: float = 0.3
    pitch_shift_semitones: tuple[int, int] = (-2, 2)
    detune_probability: float = 0.3
    detune_cents: tuple[float, float] = (-30.0, 30.0)
    time_stretch_probability: float = 0.3
    time_stretch_rate: tuple[float, float] = (0.9, 1.1)
    eq_probability: float = 0.3
    eq_max_gain_db: float = 6.0
    # Off by default, so that the recipe's earlier stages train as they did; stage 14 of the shipped
    # model turned it on.
    graphic_eq_probability: float = 0.0
    graphic_eq_max_gain_db: float = 6.0
    lowpass_probability: float = 0.15
    lowpass_cutoff_hz: tuple[float, float] = (800.0, 4000.0)
    reverb_probability: float = 0.2
    reverb_rt60_seconds: tuple[float, float] = (0.2, 1.0)
    reverb_wet: tuple[float, float] = (0.1, 0.4)
    gain_probability: float = 0.5
    gain_db: tuple[float, float] = (-6.0, 6.0)
    noise_probability: float = 0.3
    noise_snr_db: tuple[float, float] = (15.0, 40.0)
    # With this probability a second window (another piece in the same timbre, augmented on its own)
    # is added to the window, and its notes to the labels: denser chords, and more soft notes under
    # loud ones, than the sources hold, with labels still true. The window reader applies it
    # (data.audio_dataset.TranscriptionWindows), since it needs another window; augment() does not.
    mix_probability: float = 0.0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.endswith("_probability") and not 0.0 <= value <= 1.0:
                raise MusefmError(f"AudioAugmentConfig.{field.name} must be within [0, 1], got {value}")
            if isinstance(value, (list, tuple)):  # YAML and JSON give lists
                if len(value) != 2 or value[0] > value[1]:
                    raise MusefmError(f"AudioAugmentConfig.{field.name} must be (low, high) with low <= high, got {value}")
                setattr(self, field.name, tuple(value))
        low, high = self.pitch_shift_semitones
        if int(low) != low or int(high) != high or max(abs(low), abs(high)) > MAX_SEMITONES:
            raise MusefmError(f"AudioAugmentConfig.pitch_shift_semitones must be whole numbers within +-{MAX_SEMITONES}")
        if max(abs(self.detune_cents[0]), abs(self.detune_cents[1])) > MAX_DETUNE_CENTS:
            raise MusefmError(f"AudioAugmentConfig.detune_cents must be within +-{MAX_DETUNE_CENTS:g}")
        if self.lowpass_cutoff_hz[0] <= 0:
            raise MusefmError("AudioAugmentConfig.lowpass_cutoff_hz must be positive")
        if self.time_stretch_rate[0] < STRETCH_RATE_LIMITS[0] or self.time_stretch_rate[1] > STRETCH_RATE_LIMITS[1]:
            raise MusefmError(f"AudioAugmentConfig.time_stretch_rate must be within {STRETCH_RATE_LIMITS}")
        if self.reverb_rt60_seconds[0] <= 0 or not 0 <= self.reverb_wet[0] <= self.reverb_wet[1] <= 1:
            raise MusefmError("AudioAugmentConfig.reverb_rt60_seconds must be positive and reverb_wet within [0, 1]")

    def max_speedup(self) -> float:
        """The most input audio one second of output can consume: the fastest time stretch times the
        sharpest detune (both read the input faster). A window reader fetches this much more."""
        return max(1.0, self.time_stretch_rate[1]) * 2.0 ** (max(0.0, self.detune_cents[1]) / 1200.0)


def augment(audio: np.ndarray, sample_rate: int, notes: np.ndarray, config: AudioAugmentConfig,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Apply each augmentation with its probability, in a fixed order: pitch, detune, tempo, EQ,
    graphic EQ, low-pass, reverb, gain, then noise (last, so its SNR is against the finished
    signal). Each step draws from its own child generator, so changing one step's settings never
    changes another step's draws (the steps added later take the later children)."""
    audio = _check(audio, notes)
    notes = np.array(notes, dtype=np.float64)
    c = config
    pitch_rng, stretch_rng, eq_rng, reverb_rng, gain_rng, noise_rng, detune_rng, lowpass_rng, graphic_eq_rng = rng.spawn(9)
    if pitch_rng.random() < c.pitch_shift_probability:
        semitones = int(pitch_rng.integers(c.pitch_shift_semitones[0], c.pitch_shift_semitones[1] + 1))
        audio, notes = pitch_shift(audio, sample_rate, notes, semitones)
    if detune_rng.random() < c.detune_probability:
        audio, notes = detune(audio, sample_rate, notes, float(detune_rng.uniform(*c.detune_cents)))
    if stretch_rng.random() < c.time_stretch_probability:
        audio, notes = time_stretch(audio, sample_rate, notes, float(stretch_rng.uniform(*c.time_stretch_rate)))
    if eq_rng.random() < c.eq_probability:
        audio = random_eq(audio, sample_rate, eq_rng, c.eq_max_gain_db)
    if graphic_eq_rng.random() < c.graphic_eq_probability:
        audio = random_graphic_eq(audio, sample_rate, graphic_eq_rng, c.graphic_eq_max_gain_db)
    if lowpass_rng.random() < c.lowpass_probability:
        audio = random_lowpass(audio, sample_rate, lowpass_rng, c.lowpass_cutoff_hz)
    if reverb_rng.random() < c.reverb_probability:
        audio = add_reverb(audio, sample_rate, reverb_rng, c.reverb_rt60_seconds, c.reverb_wet)
    if gain_rng.random() < c.gain_probability:
        audio = apply_gain(audio, float(gain_rng.uniform(*c.gain_db)))
    if noise_rng.random() < c.noise_probability:
        audio = add_noise(audio, float(noise_rng.uniform(*c.noise_snr_db)), noise_rng)
    return audio, notes
