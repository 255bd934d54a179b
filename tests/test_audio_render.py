"""Sampled instruments: the Salamander piano's SFZ over whatever velocity layers are installed, and
rendering MIDI through it with sfizz (pitch, timing and velocity layers checked on synthetic samples)."""

import re

import numpy as np
import pytest
import soundfile as sf

from musefm.audio.render import NOTE_NAMES, SALAMANDER_PACKAGE, render_midi, salamander_sfz, soundfont_name, soundfont_path
from musefm.errors import MusefmError

RATE = 16000
ROOTS = list(range(21, 109, 3))  # A0, C1, D#1 ... C8: the recording's sampled keys
LAYER_LEVELS = {4: 0.05, 12: 0.5}  # two of the 16 velocity layers, soft and loud


def hertz(key: float) -> float:
    return 440.0 * 2 ** ((key - 69) / 12)


def write_samples(root, partials=(1.0,)):
    """A samples tree laid out as ``make piano-samples`` installs it; each sample is a decaying
    tone with these harmonic amplitudes (the fundamental's first)."""
    time = np.arange(int(0.8 * RATE)) / RATE
    for layer, level in LAYER_LEVELS.items():
        audio = root / "node_modules" / SALAMANDER_PACKAGE.format(layer=layer) / "audio"
        audio.mkdir(parents=True)
        for key in ROOTS:
            name = f"{NOTE_NAMES[key % 12]}{key // 12 - 1}v{layer}.ogg"
            tone = sum(amplitude * np.sin(2 * np.pi * harmonic * hertz(key) * time)
                       for harmonic, amplitude in enumerate(partials, start=1))
            tone = level / len(partials) * tone * np.exp(-time * 2)
            sf.write(audio / name, np.stack([tone, tone], axis=1), RATE, format="OGG", subtype="VORBIS")
    return root


@pytest.fixture()
def samples(tmp_path, monkeypatch):
    """Sine tones for samples."""
    monkeypatch.setenv("MUSEFM_SAMPLES", str(tmp_path / "samples"))
    return write_samples(tmp_path / "samples")


def regions(sfz_text: str) -> list[dict]:
    """Every region: its group's (lovel, hivel), its (lokey, hikey), pitch_keycenter and sample."""
    found, velocity = [], None
    for line in sfz_text.splitlines():
        if line.startswith("<group>"):
            velocity = tuple(int(v) for v in re.findall(r"lovel=(\d+) hivel=(\d+)", line)[0])
        elif line.startswith("<region>"):
            fields = dict(re.findall(r"(\w+)=(\S+)", line))
            found.append({"velocity": velocity, "keys": (int(fields["lokey"]), int(fields["hikey"])),
                          "centre": int(fields["pitch_keycenter"]), "sample": fields["sample"]})
    return found


def test_sfz_covers_every_key_and_velocity_once_with_the_nearest_sample(samples):
    path = soundfont_path("salamander")
    assert path == salamander_sfz(samples) and soundfont_name("salamander") == "salamander"
    found = regions(path.read_text())
    velocities = sorted({region["velocity"] for region in found})
    assert velocities[0][0] == 1 and velocities[-1][1] == 127 and len(velocities) == len(LAYER_LEVELS)
    assert all(low_next == high + 1 for (_, high), (low_next, _) in zip(velocities, velocities[1:]))
    for velocity in velocities:
        layer = [region for region in found if region["velocity"] == velocity]
        keys = [key for region in layer for key in range(region["keys"][0], region["keys"][1] + 1)]
        assert keys == list(range(128))  # every key once
        for region in layer:  # each piano key is repitched by at most a semitone
            assert all(abs(key - region["centre"]) <= 1 for key in range(max(region["keys"][0], 21), min(region["keys"][1], 108) + 1))
            assert (samples / region["sample"]).is_file()
    # The soft layer (4 of 16) takes the low velocities.
    assert all("velocity4/" in region["sample"] for region in found if region["velocity"] == velocities[0])


def test_sfz_written_once_and_missing_samples_named(samples, tmp_path):
    path = salamander_sfz(samples)
    stamp = path.stat().st_mtime_ns
    assert salamander_sfz(samples).stat().st_mtime_ns == stamp  # unchanged text is not rewritten
    with pytest.raises(MusefmError, match="make piano-samples"):
        salamander_sfz(tmp_path / "empty")


def test_sfizz_renders_pitch_timing_and_velocity_layers(samples, tmp_path):
    from symusic import Note, Score, Track

    score = Score(480)
    track = Track("piano", 0, False)
    # E4 (a semitone above the D#4 sample) loud at 0.5 s, then soft at 2.0 s (120 bpm: 960 ticks/s).
    track.notes.extend([Note(480, 480, 64, 110), Note(1920, 480, 64, 20)])
    score.tracks.append(track)
    midi = tmp_path / "notes.mid"
    score.dump_midi(str(midi))
    wav = render_midi(midi, tmp_path / "out.wav", "salamander", sample_rate=RATE)
    audio, rate = sf.read(wav)
    audio = audio.mean(axis=1)
    assert rate == RATE

    def window(start: float, seconds: float = 0.3) -> np.ndarray:
        return audio[int(start * RATE): int((start + seconds) * RATE)]

    assert np.abs(window(0.0, 0.45)).max() < 1e-3  # silent before the first onset
    loud, soft = window(0.52), window(2.02)
    spectrum = np.abs(np.fft.rfft(loud * np.hanning(len(loud))))
    peak = np.fft.rfftfreq(len(loud), 1 / RATE)[np.argmax(spectrum)]
    assert abs(12 * np.log2(peak / hertz(64))) < 0.3  # repitched to E4, not left at D#4
    # Velocity 110 plays the loud layer, 20 the soft one (10x quieter samples; tracking adds a little).
    assert np.sqrt(np.mean(loud ** 2)) / np.sqrt(np.mean(soft ** 2)) > 6


def test_a_renderer_crash_is_retried_and_a_lasting_one_names_the_file(samples, tmp_path, monkeypatch):
    import musefm.audio.render as render
    from musefm.errors import BadInputError

    counter = tmp_path / "calls"
    # A stand-in for sfizz_render: killed by SIGSEGV on its first CRASHES calls, then renders silence.
    fake = tmp_path / "fake_render"
    fake.write_text(f"""#!/bin/sh
echo x >> {counter}
if [ $(wc -l < {counter}) -le "$CRASHES" ]; then kill -SEGV $$; fi
while [ "$1" != "--wav" ]; do shift; done
cp {tmp_path / "silence.wav"} "$2"
""")
    fake.chmod(0o755)
    sf.write(tmp_path / "silence.wav", np.zeros(RATE), RATE)
    monkeypatch.setattr(render, "_sfizz_render", lambda: str(fake))
    midi = tmp_path / "in.mid"
    midi.write_bytes(b"")  # never read by the stand-in
    monkeypatch.setenv("CRASHES", "2")
    assert render_midi(midi, tmp_path / "out.wav", "salamander", RATE).is_file()
    assert len(counter.read_text().splitlines()) == 3
    counter.unlink()
    monkeypatch.setenv("CRASHES", "3")
    with pytest.raises(BadInputError, match=r"in\.mid.*sfizz could not render it \(no output, exit status -11\)"):
        render_midi(midi, tmp_path / "out2.wav", "salamander", RATE)


def test_mellow_variant_leaves_treble_notes_nearly_pure_and_the_bass_rich(tmp_path, monkeypatch):
    from symusic import Note, Score, Track

    root = write_samples(tmp_path / "samples", partials=(1.0, 1.0))  # 2nd harmonic as loud as the fundamental
    monkeypatch.setenv("MUSEFM_SAMPLES", str(root))
    plain, mellow = soundfont_path("salamander"), soundfont_path("salamander-mellow")
    assert mellow.name == "salamander-mellow.sfz" and plain.read_text() != mellow.read_text()
    assert [dict(r, sample=None) for r in regions(plain.read_text())] == [dict(r, sample=None) for r in regions(mellow.read_text())]

    def harmonic_levels(font: str, key: int) -> tuple[float, float]:
        """dB of the fundamental and of the 2nd harmonic of one mezzo-forte note."""
        score = Score(480)
        track = Track("piano", 0, False)
        track.notes.append(Note(0, 480, key, 64))
        score.tracks.append(track)
        midi = tmp_path / f"{key}.mid"
        score.dump_midi(str(midi))
        audio = sf.read(render_midi(midi, tmp_path / f"{font}-{key}.wav", font, RATE))[0].mean(axis=1)
        segment = audio[int(0.05 * RATE): int(0.35 * RATE)]
        spectrum = np.abs(np.fft.rfft(segment * np.hanning(len(segment)), 1 << 15))
        frequencies = np.fft.rfftfreq(1 << 15, 1 / RATE)

        def level(hz: float) -> float:
            return 20 * np.log10(spectrum[np.abs(frequencies - hz) < 0.03 * hz].max())

        return level(hertz(key)), level(2 * hertz(key))

    def extra_cut(key: int) -> tuple[float, float]:
        """How much further the mellow 2nd harmonic sits under f0 than the plain one's, and the f0 lost (dB)."""
        (plain_f0, plain_h2), (mellow_f0, mellow_h2) = harmonic_levels("salamander", key), harmonic_levels("salamander-mellow", key)
        return (plain_h2 - plain_f0) - (mellow_h2 - mellow_f0), plain_f0 - mellow_f0

    treble_cut, treble_f0_lost = extra_cut(84)  # C6 and C2, both sampled keys
    assert treble_cut > 10.0 and treble_f0_lost < 6.0  # the fundamental itself is kept
    assert abs(extra_cut(36)[0]) < 3.0


@pytest.mark.parametrize("font", ["gmbank", "freepats"])
def test_debian_piano_timbres_render_in_time_and_in_tune(font, tmp_path):
    """csound's GM bank (FluidSynth) and FreePats (TiMidity++, which would cut the leading rest
    without --preserve-silence) play E4 at 0.5 s; FreePats at about the level FluidR3 plays it
    (TIMIDITY_GAIN; a soundfont plays at its own level through FluidSynth)."""
    from symusic import Note, Score, Track

    score = Score(480)
    track = Track("piano", 0, False)
    track.notes.append(Note(480, 960, 64, 90))  # 120 bpm: 0.5 s to 1.5 s
    score.tracks.append(track)
    midi = tmp_path / "note.mid"
    score.dump_midi(str(midi))
    assert soundfont_name(font) == font and soundfont_path(font).is_file()

    def played(name: str) -> np.ndarray:
        audio, rate = sf.read(render_midi(midi, tmp_path / f"{name}.wav", name, sample_rate=RATE))
        assert rate == RATE
        return audio.mean(axis=1)

    audio, reference = played(font), played("fluidr3")
    assert np.abs(audio[: int(0.45 * RATE)]).max() < 1e-3  # silent before the onset, which stays at 0.5 s
    note = audio[int(0.52 * RATE): int(0.82 * RATE)]
    spectrum = np.abs(np.fft.rfft(note * np.hanning(len(note)), 1 << 15))
    peak = np.fft.rfftfreq(1 << 15, 1 / RATE)[np.argmax(spectrum[: 1 << 12])]  # strongest partial below 2 kHz
    assert min(abs(12 * np.log2(peak / (harmonic * hertz(64)))) for harmonic in (1, 2, 3)) < 0.3
    if font == "freepats":
        from musefm.errors import BadInputError

        (tmp_path / "bad.mid").write_bytes(b"not midi")
        with pytest.raises(BadInputError, match=r"bad\.mid: timidity could not render it"):
            render_midi(tmp_path / "bad.mid", tmp_path / "bad.wav", font, sample_rate=RATE)
        reference_note = reference[int(0.52 * RATE): int(0.82 * RATE)]
        assert abs(20 * np.log10(np.sqrt(np.mean(note ** 2)) / np.sqrt(np.mean(reference_note ** 2)))) < 6.0
