"""Rendering MIDI to audio with a soundfont through FluidSynth (Debian ``fluidsynth``).

Soundfonts come from Debian packages (installed by ``make``) and never from the network.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from musefm.errors import MusefmError

SOUNDFONT_CANDIDATES = (
    "/usr/share/sounds/sf2/TimGM6mb.sf2",
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/sounds/sf3/MuseScore_General.sf3",
    "/usr/share/sounds/sf3/default-GM.sf3",
    "/usr/share/sounds/sf2/default-GM.sf2",
)


def available_soundfonts() -> list[Path]:
    return [Path(path) for path in SOUNDFONT_CANDIDATES if Path(path).is_file()]


def default_soundfont() -> Path:
    fonts = available_soundfonts()
    if not fonts:
        raise MusefmError("no soundfont found: install fluidsynth and musescore-general-soundfont-small (make does)")
    return fonts[0]


def render_midi(midi_path: Path, wav_path: Path, soundfont: Path | None = None, sample_rate: int = 22050) -> Path:
    """Render a MIDI file to a WAV file; raises MusefmError when FluidSynth or a soundfont is missing."""
    binary = shutil.which("fluidsynth")
    if binary is None:
        raise MusefmError("fluidsynth is not installed (Debian package fluidsynth; make installs it)")
    soundfont = Path(soundfont) if soundfont else default_soundfont()
    wav_path = Path(wav_path)
    wav_path.parent.mkdir(parents=True, exist_ok=True)
    command = [binary, "-ni", "-q", "-g", "0.8", "-r", str(sample_rate), "-F", str(wav_path), str(soundfont), str(midi_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 or not wav_path.is_file() or wav_path.stat().st_size < 100:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise MusefmError(f"{midi_path}: fluidsynth could not render it ({detail[-1] if detail else 'no output'})")
    return wav_path
