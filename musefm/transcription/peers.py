"""Published transcribers as benchmark peers: basic-pitch (ONNX) and transkun 2.0, run offline.

Each peer lives in its own virtual environment (``bash benchmarks/setup_peers.sh`` makes them:
``.venv-peers`` for basic-pitch, ``.venv-transkun`` for transkun, whose torch/torchaudio cannot
share this environment). ``run_peer`` starts ONE subprocess per call running
``benchmarks/peer_driver.py``, which loads the model once and transcribes every file, writing one
MIDI per input into ``out_dir`` (named by the audio's stem, ``stem-2`` for a repeated stem, as
``musefm transcribe`` names them). The peer "musefm" runs musefm's own shipped transcriber through
the same driver, in this interpreter, so that all three are measured alike.

Timings come from inside the driver: ``load_seconds`` (imports + weights), ``warmup_seconds``
(one 2 s clip through the whole pipeline, so lazy initialisations such as basic-pitch's
librosa/numba first call do not land on the first file; on by default except for transkun, where
the clip alone costs 30-60 s on 2 cores), per-file ``seconds`` (audio loading + resampling +
inference + decoding; not the MIDI write) and ``cpu_seconds`` (process CPU time, all threads:
steadier than wall time on a busy machine), and the subprocess's peak RSS (``ru_maxrss``).
``wall_seconds`` is measured here around the subprocess. Real-time factor = ``seconds /
audio_seconds``.

The Python of each environment can be overridden with ``MUSEFM_BASIC_PITCH_PYTHON`` /
``MUSEFM_TRANSKUN_PYTHON`` (and ``MUSEFM_SELF_PYTHON`` for "musefm"). This module imports nothing
heavy: it is safe to import anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from musefm.errors import MusefmError

REPO_ROOT = Path(__file__).resolve().parents[2]
DRIVER = REPO_ROOT / "benchmarks" / "peer_driver.py"
SETUP_HINT = "run `bash benchmarks/setup_peers.sh`"
MARKER = "@@musefm-peer "  # must match benchmarks/peer_driver.py


@dataclass(frozen=True)
class PeerSpec:
    name: str
    venv: str | None  # relative to the repo root; None: this interpreter (musefm's own environment)
    env_var: str
    warmup: bool  # warm up by default (see the module docstring)


PEERS = {
    "basic-pitch": PeerSpec("basic-pitch", ".venv-peers", "MUSEFM_BASIC_PITCH_PYTHON", warmup=True),
    "transkun": PeerSpec("transkun", ".venv-transkun", "MUSEFM_TRANSKUN_PYTHON", warmup=False),
    # musefm's shipped transcriber, measured by the same driver for a like-for-like comparison
    "musefm": PeerSpec("musefm", None, "MUSEFM_SELF_PYTHON", warmup=True),
}


@dataclass
class PeerFile:
    """One input's outcome. ``midi``/``seconds``/``audio_seconds``/``notes`` are None when it failed."""

    audio: Path
    midi: Path | None = None
    seconds: float | None = None
    cpu_seconds: float | None = None  # CPU time of the process (all threads) for this file
    audio_seconds: float | None = None
    notes: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def real_time_factor(self) -> float | None:
        if self.seconds is None or not self.audio_seconds:
            return None
        return self.seconds / self.audio_seconds


@dataclass
class PeerRun:
    """What ``run_peer`` measured. ``files`` follows the order of the inputs."""

    peer: str
    python: str
    threads: int
    files: list[PeerFile]
    load_seconds: float | None  # None: the model never loaded (see ``fatal``)
    load_cpu_seconds: float | None
    warmup_seconds: float
    wall_seconds: float
    peak_rss_mb: float | None
    returncode: int
    versions: dict = field(default_factory=dict)
    fatal: str | None = None
    stderr_tail: str = ""

    @property
    def per_file_seconds(self) -> dict[Path, float]:
        return {f.audio: f.seconds for f in self.files if f.ok}

    @property
    def failed(self) -> dict[Path, str]:
        return {f.audio: f.error for f in self.files if not f.ok}

    @property
    def processing_seconds(self) -> float:
        return sum(f.seconds for f in self.files if f.ok)

    @property
    def audio_seconds(self) -> float:
        return sum(f.audio_seconds or 0.0 for f in self.files if f.ok)

    @property
    def real_time_factor(self) -> float | None:
        """Pooled over the files that worked: processing seconds / audio seconds."""
        audio = self.audio_seconds
        return self.processing_seconds / audio if audio else None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["files"] = [{**asdict(f), "audio": str(f.audio), "midi": str(f.midi) if f.midi else None,
                          "real_time_factor": f.real_time_factor} for f in self.files]
        data["real_time_factor"] = self.real_time_factor
        return data


# ------------------------------------------------------------------------------------------------
# Finding a peer's Python
# ------------------------------------------------------------------------------------------------


def peer_python(name: str) -> Path:
    """The Python of peer ``name``'s environment; ``MusefmError`` (one line) if it is not there."""
    spec = _spec(name)
    override = os.environ.get(spec.env_var)
    if override:
        python = Path(override)
    elif spec.venv is None:
        return Path(sys.executable)
    else:
        python = REPO_ROOT / spec.venv / "bin" / "python"
    if not python.exists():
        where = f"{spec.env_var}={override}" if override else str(python)
        hint = SETUP_HINT if spec.venv else f"unset {spec.env_var}"
        raise MusefmError(f"peer {name} is not installed (no Python at {where}): {hint}")
    return python


def _spec(name: str) -> PeerSpec:
    if name not in PEERS:
        raise MusefmError(f"unknown transcription peer {name!r}: choose one of {', '.join(PEERS)}")
    return PEERS[name]


def output_names(audio_paths: list[Path]) -> list[str]:
    """MIDI file names: the stems, ``stem-2``, ``stem-3``... when inputs share one (a/x.wav, b/x.wav)."""
    names, seen = [], {}
    for path in audio_paths:
        stem = Path(path).stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.mid" if seen[stem] == 1 else f"{stem}-{seen[stem]}.mid")
    return names


# ------------------------------------------------------------------------------------------------
# The driver's output
# ------------------------------------------------------------------------------------------------


def parse_driver_output(stdout: str) -> dict:
    """The driver's result lines, gathered: ``{"start", "load", "files": {index: event}, "done",
    "fatal", "ignored"}`` (absent events are None; ``ignored`` counts marker lines that were not
    valid JSON, e.g. one cut short by a kill). Lines without the marker are skipped."""
    report: dict = {"start": None, "load": None, "files": {}, "done": None, "fatal": None, "ignored": 0}
    for line in stdout.splitlines():
        if not line.startswith(MARKER):
            continue
        try:
            event = json.loads(line[len(MARKER):])
            kind = event["event"]
        except (ValueError, KeyError, TypeError):
            report["ignored"] += 1
            continue
        if kind == "file":
            report["files"][int(event["index"])] = event
        elif kind in ("start", "load", "done", "fatal"):
            report[kind] = event
        else:
            report["ignored"] += 1
    return report


def build_run(name: str, python: str, threads: int, audio_paths: list[Path], midi_paths: list[Path],
              report: dict, returncode: int, wall_seconds: float, stderr: str = "") -> PeerRun:
    """A ``PeerRun`` from a parsed report. Inputs the driver never reported on (it crashed, was
    killed or timed out) fail with the reason, so every input is accounted for."""
    tail = stderr[-4000:]
    fatal = report["fatal"]["error"] if report["fatal"] else None
    if report["load"] is None and fatal is None:
        last = next((line for line in reversed(stderr.strip().splitlines()) if line.strip()), "")
        fatal = f"driver exited with code {returncode} before loading the model" + (f": {last.strip()}" if last else "")
    files = []
    for index, (audio, midi) in enumerate(zip(audio_paths, midi_paths)):
        event = report["files"].get(index)
        if event is None:
            reason = fatal or f"driver exited with code {returncode} before reaching this file"
            files.append(PeerFile(Path(audio), error=reason))
        elif event.get("ok"):
            cpu = event.get("cpu_seconds")
            files.append(PeerFile(Path(audio), midi=Path(midi), seconds=float(event["seconds"]),
                                  cpu_seconds=float(cpu) if cpu is not None else None,
                                  audio_seconds=float(event["audio_seconds"]), notes=int(event["notes"])))
        else:
            files.append(PeerFile(Path(audio), error=str(event.get("error") or "failed")))
    peak = None
    for kind in ("done", "fatal", "load"):  # the latest reading the driver made
        if report[kind] and report[kind].get("peak_rss_mb") is not None:
            peak = float(report[kind]["peak_rss_mb"])
            break
    load = report["load"] or {}
    return PeerRun(peer=name, python=str(python), threads=threads, files=files,
                   load_seconds=float(load["seconds"]) if "seconds" in load else None,
                   load_cpu_seconds=float(load["cpu_seconds"]) if load.get("cpu_seconds") is not None else None,
                   warmup_seconds=float(load.get("warmup_seconds", 0.0)), wall_seconds=wall_seconds,
                   peak_rss_mb=peak, returncode=returncode, versions=dict(load.get("versions") or {}),
                   fatal=fatal, stderr_tail=tail)


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------


def run_peer(name: str, audio_paths: list[Path], out_dir: Path, threads: int | None = None,
             warmup: bool | None = None, timeout: float | None = None) -> PeerRun:
    """Transcribe ``audio_paths`` with peer ``name`` ("basic-pitch", "transkun", or "musefm" for
    musefm's own shipped model in this interpreter) into ``out_dir``.

    One subprocess in the peer's environment does every file (the model loads once). ``threads``
    defaults to ``os.cpu_count()`` (torch threads for transkun, onnxruntime intra-op threads for
    basic-pitch, and OMP/MKL/OpenBLAS for both). ``warmup`` defaults per peer (see the module
    docstring). ``timeout`` (seconds) kills the subprocess; files it had not finished then fail.
    Raises ``MusefmError`` when the peer is not installed; a model that fails to load is reported
    in ``PeerRun.fatal`` with every file failed.
    """
    spec = _spec(name)
    python = peer_python(name)
    return _run_driver(name, python, audio_paths, out_dir, threads=threads,
                       warmup=spec.warmup if warmup is None else warmup, timeout=timeout)


def _run_driver(name: str, python: Path, audio_paths: list[Path], out_dir: Path, threads: int | None = None,
                warmup: bool = False, timeout: float | None = None) -> PeerRun:
    if not DRIVER.exists():
        raise MusefmError(f"the peer driver {DRIVER} is missing: peers run from a checkout of the repository")
    audio_paths = [Path(p) for p in audio_paths]
    if not audio_paths:
        raise MusefmError(f"run_peer({name!r}): no audio files given")
    threads = int(threads or os.cpu_count() or 1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    midi_paths = [out_dir / n for n in output_names(audio_paths)]
    for midi in midi_paths:  # a stale MIDI from an earlier run must not pass for this run's output
        midi.unlink(missing_ok=True)
    job = {"peer": name, "threads": threads, "warmup": bool(warmup),
           "jobs": [[str(a.resolve()), str(m.resolve())] for a, m in zip(audio_paths, midi_paths)]}
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(threads)
    env.pop("PYTHONPATH", None)  # the peer's environment only: never this project's packages
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    started = time.perf_counter()
    try:
        done = subprocess.run([str(python), str(DRIVER)], input=json.dumps(job), capture_output=True, text=True,
                              env=env, cwd=str(out_dir), timeout=timeout)
        stdout, stderr, returncode = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        stdout, stderr, returncode = _text(expired.stdout), _text(expired.stderr), -9
        stderr += f"\n[musefm] {name} timed out after {timeout} s and was killed\n"
    except OSError as error:
        raise MusefmError(f"cannot start peer {name} ({python}): {error}; {SETUP_HINT}") from error
    wall = time.perf_counter() - started
    report = parse_driver_output(stdout)
    run = build_run(name, str(python), threads, audio_paths, midi_paths, report, returncode, wall, stderr)
    if returncode == -9 and timeout is not None and report["done"] is None:
        for peer_file in run.files:
            if not peer_file.ok and peer_file.error.startswith("driver exited"):
                peer_file.error = f"timed out after {timeout} s"
    return run


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def main(argv: list[str] | None = None) -> int:
    """``python -m musefm.transcription.peers PEER OUT_DIR AUDIO...``: run, print the JSON summary."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m musefm.transcription.peers")
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("audio", nargs="+", type=Path)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--timeout", type=float)
    args = parser.parse_args(argv)
    try:
        run = run_peer(args.peer, args.audio, args.out_dir, threads=args.threads, warmup=args.warmup,
                       timeout=args.timeout)
    except MusefmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    data = run.to_dict()
    data.pop("stderr_tail")
    print(json.dumps(data, indent=2))
    return 0 if run.fatal is None and not run.failed else 1


if __name__ == "__main__":
    sys.exit(main())
