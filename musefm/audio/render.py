"""Rendering MIDI to audio with soundfonts through FluidSynth (Debian ``fluidsynth``).

Soundfonts come from Debian packages (``make`` installs them) and from pretty_midi's wheel when it is
installed; none is ever downloaded. They are named by short names (``timgm6mb``, ``fluidr3``,
``musescore``) or given as paths. Switching soundfonts is the timbre augmentation of the audio data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from musefm.errors import BadInputError, MusefmError

# Short name -> candidate files, best first.
SOUNDFONTS = {
    "timgm6mb": ("/usr/share/sounds/sf2/TimGM6mb.sf2",),
    "fluidr3": ("/usr/share/sounds/sf2/FluidR3_GM.sf2",),
    "musescore": ("/usr/share/sounds/sf3/MuseScore_General.sf3", "/usr/share/sounds/sf3/MuseScore_General_Lite.sf3"),
}
DEFAULT_SOUNDFONT_ORDER = ("timgm6mb", "fluidr3", "musescore")


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
    if text in SOUNDFONTS:
        for candidate in SOUNDFONTS[text]:
            if Path(candidate).is_file():
                return Path(candidate)
        if text == "timgm6mb" and (bundled := _pretty_midi_soundfont()):
            return bundled
        packages = {"timgm6mb": "timgm6mb-soundfont", "fluidr3": "fluid-soundfont-gm",
                    "musescore": "musescore-general-soundfont-small"}
        raise MusefmError(f"soundfont {text!r} is not installed (Debian package {packages[text]}; make installs it)")
    path = Path(text).expanduser()
    if not path.is_file():
        raise MusefmError(f"soundfont {text}: file not found (known names: {', '.join(SOUNDFONTS)})")
    if path.suffix.lower() not in (".sf2", ".sf3"):
        raise MusefmError(f"soundfont {text}: not a .sf2/.sf3 file")
    return path


def soundfont_name(name_or_path: str | Path) -> str:
    """Short label of a soundfont for file names and manifests."""
    text = str(name_or_path)
    return text if text in SOUNDFONTS else Path(text).stem.lower()


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


def _fluidsynth() -> str:
    binary = shutil.which("fluidsynth")
    if binary is None:
        raise MusefmError("fluidsynth is not installed (Debian package fluidsynth; make installs it)")
    return binary


def render_midi(midi_path: Path, wav_path: Path, soundfont: str | Path | None = None, sample_rate: int = 22050,
                reverb: bool = False, gain: float = 0.5) -> Path:
    """Render a MIDI file to a WAV file (16-bit stereo) with FluidSynth.

    Reverb and chorus are off by default so note offsets in the audio match the MIDI; the audio
    augmentations add room sound when training wants it. Raises BadInputError naming the MIDI file
    when FluidSynth cannot render it, MusefmError when FluidSynth or the soundfont is missing.
    """
    binary = _fluidsynth()
    font = soundfont_path(soundfont) if soundfont else default_soundfont()
    wav_path = Path(wav_path)
    wav_path.parent.mkdir(parents=True, exist_ok=True)
    # Render next to the target and rename: a stopped render never leaves a truncated WAV behind.
    handle, temporary = tempfile.mkstemp(suffix=".wav", dir=wav_path.parent, prefix=".render-")
    os.close(handle)
    command = [binary, "-ni", "-q", "-g", str(gain), "-r", str(sample_rate), "-R", "1" if reverb else "0",
               "-C", "0", "-F", temporary, str(font), str(midi_path)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        if result.returncode != 0 or Path(temporary).stat().st_size < 100:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise BadInputError(midi_path, f"fluidsynth could not render it ({detail[-1] if detail else 'no output'})")
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
