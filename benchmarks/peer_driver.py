"""Runs one transcription peer over many audio files, inside the peer's own virtual environment.

Started by ``musefm.transcription.peers.run_peer`` as ``<peer venv>/bin/python peer_driver.py``
with a job on stdin (JSON)::

    {"peer": "basic-pitch" | "transkun" | "musefm" | "null", "jobs": [[audio, midi], ...],
     "threads": 2, "warmup": true}

Only the "musefm" peer (musefm's own transcriber, run in musefm's environment so that it is measured
exactly like the others) imports musefm; the rest of this file uses only the standard library
besides each peer's own packages, as the peer environments have no musefm. The model is loaded once; every file is then
timed on its own (audio loading + resampling + inference + note decoding; writing the MIDI is
not timed), in wall seconds and in CPU seconds of the process (all threads), the latter being
less disturbed by other work on a shared machine. A file that fails is reported and the rest go on.

Protocol: every result is one line on the *original* stdout, ``@@musefm-peer `` followed by a
JSON object with an ``event`` key: ``start``, ``load`` (seconds for imports + weights, warm-up
seconds, versions), ``file`` (one per input, in order), then ``done`` (peak RSS), or ``fatal``
when the model cannot be loaded. Anything the peer libraries print (to stdout or stderr, from
Python or C) goes to stderr, so it can never be mistaken for a result.

The "null" peer (no model; writes MIDI files without notes) exists to test this protocol from
the main environment.
"""

from __future__ import annotations

import json
import math
import os
import resource
import struct
import sys
import tempfile
import time
import traceback
import wave

MARKER = "@@musefm-peer "


def _protocol_stream():
    """Keep the real stdout for results; point fd 1 (and sys.stdout) at stderr for everything else."""
    sys.stdout.flush()
    stream = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return stream


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ").strip()
    return text[:500]


def _write_atomic(write, path: str) -> None:
    """``write(tmp_path)`` then rename, so a killed run never leaves half a MIDI file."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, tmp = tempfile.mkstemp(dir=folder, suffix=".mid.part")
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _warmup_wav(seconds: float = 2.0, sample_rate: int = 22050) -> str:
    """A short 16-bit WAV (a decaying A4 every half second) for warming lazy initialisations."""
    handle, path = tempfile.mkstemp(suffix=".wav", prefix="musefm-peer-warmup-")
    os.close(handle)
    frames = bytearray()
    for i in range(int(seconds * sample_rate)):
        t = (i % (sample_rate // 2)) / sample_rate
        frames += struct.pack("<h", int(12000 * math.exp(-6 * t) * math.sin(2 * math.pi * 440.0 * t)))
    with wave.open(path, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(bytes(frames))
    return path


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------
# Peers: load(threads) -> transcribe(audio_path) -> (write(midi_path), n_notes, audio_seconds)
# ------------------------------------------------------------------------------------------------


class BasicPitch:
    """Spotify's basic-pitch on its bundled ONNX model (``basic_pitch.inference.predict``)."""

    versions = ("basic-pitch", "onnxruntime", "librosa", "numpy")

    def __init__(self, threads: int):
        import onnxruntime

        # basic-pitch builds the InferenceSession itself, without session options: pin its thread
        # count the same way torch's is pinned for the other peer.
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession

        def with_options(path, *args, **kwargs):
            kwargs.setdefault("sess_options", options)
            return session(path, *args, **kwargs)

        onnxruntime.InferenceSession = with_options
        try:
            from basic_pitch import build_icassp_2022_model_path, FilenameSuffix
            from basic_pitch.inference import Model, predict

            self.model_path = build_icassp_2022_model_path(FilenameSuffix.onnx)
            self.model = Model(self.model_path)
        finally:
            onnxruntime.InferenceSession = session
        if self.model.model_type != Model.MODEL_TYPES.ONNX:
            raise RuntimeError(f"basic-pitch loaded a {self.model.model_type} model, not the ONNX one")
        self._predict = predict

    def transcribe(self, audio_path: str):
        model_output, midi_data, note_events = self._predict(audio_path, self.model)
        try:
            import soundfile

            audio_seconds = soundfile.info(audio_path).duration
        except Exception:  # noqa: BLE001 - a format only librosa's audioread fallback reads
            from basic_pitch.constants import ANNOTATIONS_FPS

            audio_seconds = model_output["note"].shape[0] / ANNOTATIONS_FPS  # output is trimmed to the input
        notes = sum(len(instrument.notes) for instrument in midi_data.instruments)
        return midi_data.write, notes, audio_seconds


class Transkun:
    """Yan & Duan's transkun 2.0 on its bundled weights: what ``transkun.transcribe.main`` does,
    with the model loaded once for all files."""

    versions = ("transkun", "torch", "torchaudio", "numpy")

    def __init__(self, threads: int):
        import moduleconf
        import torch
        import transkun

        torch.set_num_threads(threads)
        torch.set_grad_enabled(False)
        folder = os.path.join(os.path.dirname(transkun.__file__), "pretrained")
        conf_manager = moduleconf.parseFromFile(os.path.join(folder, "2.0.conf"))
        model_class = conf_manager["Model"].module.TransKun
        conf = conf_manager["Model"].config
        checkpoint = torch.load(os.path.join(folder, "2.0.pt"), map_location="cpu")
        model = model_class(conf=conf).to("cpu")
        state = checkpoint["best_state_dict"] if "best_state_dict" in checkpoint else checkpoint["state_dict"]
        model.load_state_dict(state, strict=False)  # as transkun's CLI does
        model.eval()
        self.model = model
        self.torch = torch

    def transcribe(self, audio_path: str):
        import soundfile
        from transkun.Data import writeMidi

        # transkun's CLI reads with pydub and divides by 2**15: that is exactly soundfile's float32
        # for 16-bit PCM, and soundfile also reads 24/32-bit WAV, FLAC and OGG without ffmpeg.
        audio, rate = soundfile.read(audio_path, dtype="float32", always_2d=True)
        audio_seconds = len(audio) / rate
        if rate != self.model.fs:
            import soxr

            audio = soxr.resample(audio, rate, self.model.fs)
        x = self.torch.from_numpy(audio).to("cpu")
        notes = self.model.transcribe(x, discardSecondHalf=False)
        midi = writeMidi(notes)
        return midi.write, sum(len(instrument.notes) for instrument in midi.instruments), audio_seconds


class MuseFM:
    """musefm's shipped transcriber (``musefm transcribe``), measured the same way as the peers.
    Runs in musefm's own environment: the one peer that imports musefm."""

    versions = ("musefm", "torch", "numpy")

    def __init__(self, threads: int):
        import torch
        from musefm.transcription.transcribe import load_transcriber

        torch.set_num_threads(threads)
        self.model = load_transcriber()

    def transcribe(self, audio_path: str):
        from pathlib import Path

        from musefm.transcription.postprocess import write_midi
        from musefm.transcription.transcribe import transcribe_file

        result = transcribe_file(self.model, Path(audio_path))
        return (lambda path: write_midi(result.notes, path)), len(result.notes), result.audio_seconds


class Null:
    """No model: checks the audio is a readable WAV and writes a MIDI file with no notes."""

    versions = ()

    def __init__(self, threads: int):
        pass

    def transcribe(self, audio_path: str):
        with wave.open(audio_path, "rb") as handle:
            audio_seconds = handle.getnframes() / handle.getframerate()
        track = b"\x00\xff\x2f\x00"  # end of track
        data = b"MThd" + struct.pack(">IHHH", 6, 0, 1, 480) + b"MTrk" + struct.pack(">I", len(track)) + track

        def write(path):
            with open(path, "wb") as out:
                out.write(data)

        return write, 0, audio_seconds


PEERS = {"basic-pitch": BasicPitch, "transkun": Transkun, "musefm": MuseFM, "null": Null}


def main() -> int:
    started = time.perf_counter()
    out = _protocol_stream()

    def emit(**event) -> None:
        out.write(MARKER + json.dumps(event) + "\n")
        out.flush()

    job = json.loads(sys.stdin.read())
    peer_name, jobs = job["peer"], job["jobs"]
    threads = int(job.get("threads") or os.cpu_count() or 1)
    emit(event="start", peer=peer_name, pid=os.getpid(), python=sys.executable, files=len(jobs), threads=threads)
    try:
        peer_class = PEERS[peer_name]
        peer = peer_class(threads)
    except BaseException as error:  # noqa: BLE001 - reported, then the driver exits
        traceback.print_exc()
        emit(event="fatal", error=_one_line(error), peak_rss_mb=_peak_rss_mb())
        return 3
    load_seconds, load_cpu_seconds = time.perf_counter() - started, time.process_time()

    warmup_seconds, warmup_error = 0.0, None
    if job.get("warmup"):
        path = _warmup_wav()
        begun = time.perf_counter()
        try:
            peer.transcribe(path)
        except Exception as error:  # noqa: BLE001 - a failed warm-up only costs the first file its caches
            traceback.print_exc()
            warmup_error = _one_line(error)
        finally:
            os.unlink(path)
        warmup_seconds = time.perf_counter() - begun
    emit(event="load", seconds=load_seconds, cpu_seconds=load_cpu_seconds, warmup_seconds=warmup_seconds,
         warmup_error=warmup_error,
         peak_rss_mb=_peak_rss_mb(), versions={name: _version(name) for name in peer_class.versions})

    for index, (audio_path, midi_path) in enumerate(jobs):
        begun, begun_cpu = time.perf_counter(), time.process_time()
        try:
            write, notes, audio_seconds = peer.transcribe(audio_path)
            seconds, cpu_seconds = time.perf_counter() - begun, time.process_time() - begun_cpu
            _write_atomic(write, midi_path)
        except Exception as error:  # noqa: BLE001 - one bad file must not stop the others
            traceback.print_exc()
            emit(event="file", index=index, audio=audio_path, ok=False, error=_one_line(error),
                 seconds=time.perf_counter() - begun)
            continue
        emit(event="file", index=index, audio=audio_path, ok=True, midi=midi_path, seconds=seconds,
             cpu_seconds=cpu_seconds, audio_seconds=audio_seconds, notes=notes)

    emit(event="done", peak_rss_mb=_peak_rss_mb(), seconds=time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
