"""Benchmark peers (musefm.transcription.peers): everything that does not need the peers'
environments. The driver's protocol runs for real through its "null" peer in this interpreter."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
import sys
import wave
from pathlib import Path

import pytest

from musefm.errors import MusefmError
from musefm.transcription import peers
from musefm.transcription.peers import MARKER, build_run, output_names, parse_driver_output, run_peer


def line(**event) -> str:
    return MARKER + json.dumps(event)


def write_wav(path: Path, seconds: float = 0.5, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate)))
                                 for i in range(int(seconds * rate))))
    return path


# ------------------------------------------------------------------------------------------------
# Finding the peers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, var", [("basic-pitch", "MUSEFM_BASIC_PITCH_PYTHON"), ("transkun", "MUSEFM_TRANSKUN_PYTHON")])
def test_missing_environment_says_how_to_set_it_up(tmp_path, monkeypatch, name, var):
    monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(peers, "REPO_ROOT", tmp_path)
    with pytest.raises(MusefmError) as error:
        run_peer(name, [tmp_path / "a.wav"], tmp_path / "out")
    message = str(error.value)
    assert "\n" not in message
    assert "bash benchmarks/setup_peers.sh" in message and name in message
    assert str(tmp_path / peers.PEERS[name].venv / "bin" / "python") in message
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_env_var_overrides_the_python(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSEFM_TRANSKUN_PYTHON", str(tmp_path / "elsewhere" / "python"))
    with pytest.raises(MusefmError, match="MUSEFM_TRANSKUN_PYTHON=.*elsewhere.*setup_peers.sh"):
        peers.peer_python("transkun")
    monkeypatch.setenv("MUSEFM_BASIC_PITCH_PYTHON", sys.executable)
    assert peers.peer_python("basic-pitch") == Path(sys.executable)


def test_musefm_runs_in_this_interpreter(monkeypatch):
    monkeypatch.delenv("MUSEFM_SELF_PYTHON", raising=False)
    assert peers.peer_python("musefm") == Path(sys.executable)


def test_unknown_peer_is_a_one_line_error(tmp_path):
    with pytest.raises(MusefmError, match="unknown transcription peer 'mt3'.*basic-pitch, transkun"):
        run_peer("mt3", [tmp_path / "a.wav"], tmp_path)


def test_output_names_are_stems_made_unique():
    paths = [Path("a/x.wav"), Path("b/x.flac"), Path("y.wav"), Path("c/x.wav")]
    assert output_names(paths) == ["x.mid", "x-2.mid", "y.mid", "x-3.mid"]


# ------------------------------------------------------------------------------------------------
# The driver's output
# ------------------------------------------------------------------------------------------------


def test_parse_keeps_marker_lines_only_and_skips_broken_ones():
    stdout = "\n".join([
        "Predicting MIDI for a.wav...",  # a library print that escaped to stdout
        line(event="start", peer="transkun", pid=1, files=2, threads=2),
        line(event="load", seconds=2.5, cpu_seconds=2.4, warmup_seconds=0.0, warmup_error=None,
             peak_rss_mb=900.0, versions={"transkun": "2.0.1"}),
        line(event="file", index=1, audio="b.wav", ok=False, error="LibsndfileError: bad", seconds=0.01),
        line(event="file", index=0, audio="a.wav", ok=True, midi="a.mid", seconds=3.0, cpu_seconds=5.5,
             audio_seconds=10.0, notes=42),
        MARKER + '{"event": "done", "peak_rs',  # cut short by a kill
        MARKER + '{"no_event": 1}',
        line(event="something-new"),
    ])
    report = parse_driver_output(stdout)
    assert report["start"]["peer"] == "transkun"
    assert report["load"]["seconds"] == 2.5
    assert sorted(report["files"]) == [0, 1]
    assert report["files"][0]["notes"] == 42
    assert report["done"] is None and report["fatal"] is None
    assert report["ignored"] == 3


def test_build_run_accounts_for_every_input():
    stdout = "\n".join([
        line(event="load", seconds=1.0, cpu_seconds=1.1, warmup_seconds=0.5, warmup_error=None, peak_rss_mb=300.0,
             versions={"basic-pitch": "0.4.0"}),
        line(event="file", index=0, audio="a.wav", ok=True, midi="out/a.mid", seconds=2.0, cpu_seconds=3.0,
             audio_seconds=20.0, notes=7),
        line(event="file", index=1, audio="b.wav", ok=False, error="FileNotFoundError: b.wav", seconds=0.0),
        line(event="file", index=2, audio="c.wav", ok=True, midi="out/c.mid", seconds=1.0, cpu_seconds=1.5,
             audio_seconds=30.0, notes=3),
        line(event="done", peak_rss_mb=420.5, seconds=5.0),
    ])
    audio = [Path("a.wav"), Path("b.wav"), Path("c.wav")]
    run = build_run("basic-pitch", "py", 2, audio, [Path("out/a.mid"), Path("out/b.mid"), Path("out/c.mid")],
                    parse_driver_output(stdout), 0, 6.0)
    assert run.fatal is None and run.load_seconds == 1.0 and run.warmup_seconds == 0.5
    assert run.peak_rss_mb == 420.5  # the last reading, at "done"
    assert run.per_file_seconds == {Path("a.wav"): 2.0, Path("c.wav"): 1.0}
    assert run.failed == {Path("b.wav"): "FileNotFoundError: b.wav"}
    assert run.files[1].midi is None
    assert run.files[0].real_time_factor == pytest.approx(0.1)
    assert run.real_time_factor == pytest.approx(3.0 / 50.0)
    assert run.versions == {"basic-pitch": "0.4.0"}
    json.dumps(run.to_dict())


def test_build_run_after_a_crash_fails_the_unreached_files():
    stdout = "\n".join([
        line(event="load", seconds=1.0, warmup_seconds=0.0, peak_rss_mb=300.0, versions={}),
        line(event="file", index=0, audio="a.wav", ok=True, midi="a.mid", seconds=2.0, audio_seconds=4.0, notes=1),
    ])
    run = build_run("transkun", "py", 2, [Path("a.wav"), Path("b.wav")], [Path("a.mid"), Path("b.mid")],
                    parse_driver_output(stdout), -9, 3.0, stderr="Killed\n")
    assert run.files[0].ok and run.files[0].cpu_seconds is None  # an older driver's line still parses
    assert run.failed == {Path("b.wav"): "driver exited with code -9 before reaching this file"}
    assert run.peak_rss_mb == 300.0 and run.fatal is None


def test_build_run_when_the_model_does_not_load():
    fatal = line(event="fatal", error="ModuleNotFoundError: No module named 'packaging'", peak_rss_mb=200.0)
    run = build_run("transkun", "py", 2, [Path("a.wav")], [Path("a.mid")], parse_driver_output(fatal), 3, 1.0)
    assert run.load_seconds is None and run.peak_rss_mb == 200.0
    assert run.fatal == run.failed[Path("a.wav")] == "ModuleNotFoundError: No module named 'packaging'"
    # no protocol line at all (the interpreter itself failed): the last stderr line is the reason
    run = build_run("transkun", "py", 2, [Path("a.wav")], [Path("a.mid")], parse_driver_output(""), 1, 0.1,
                    stderr="Traceback (most recent call last):\n  ...\nSyntaxError: invalid syntax\n")
    assert run.fatal == "driver exited with code 1 before loading the model: SyntaxError: invalid syntax"
    assert run.failed[Path("a.wav")] == run.fatal


# ------------------------------------------------------------------------------------------------
# The driver itself, through its model-free "null" peer
# ------------------------------------------------------------------------------------------------


def test_driver_protocol_end_to_end(tmp_path):
    (tmp_path / "in").mkdir()
    good = write_wav(tmp_path / "in" / "good.wav")
    other = tmp_path / "other"
    other.mkdir()
    twin = write_wav(other / "good.wav", seconds=0.25)
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not a wav")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.mid").write_bytes(b"stale")  # from an earlier run: must not survive a failure
    run = peers._run_driver("null", Path(sys.executable), [good, tmp_path / "missing.wav", not_audio, twin], out,
                            threads=1, warmup=True)
    assert run.returncode == 0 and run.fatal is None
    assert run.threads == 1 and run.load_seconds is not None and run.warmup_seconds >= 0.0
    assert [f.ok for f in run.files] == [True, False, False, True]
    assert run.files[0].midi == out / "good.mid" and run.files[3].midi == out / "good-2.mid"
    assert run.files[0].audio_seconds == pytest.approx(0.5) and run.files[3].audio_seconds == pytest.approx(0.25)
    assert run.files[0].notes == 0 and run.files[0].cpu_seconds is not None
    assert (out / "good.mid").read_bytes().startswith(b"MThd")
    assert "FileNotFoundError" in run.failed[tmp_path / "missing.wav"]
    assert not (out / "notes.mid").exists() and not list(out.glob("*.part"))
    assert run.peak_rss_mb > 1.0
    assert "Traceback" in run.stderr_tail  # the failures' tracebacks went to stderr, not the protocol
    assert run.wall_seconds >= run.load_seconds


def test_run_peer_through_an_env_var_python(tmp_path, monkeypatch):
    """run_peer itself, with the peer's Python pointed at this interpreter: the driver then fails to
    import the peer (no basic_pitch here) and says so, once, for every file."""
    if importlib.util.find_spec("basic_pitch") is not None:
        pytest.skip("basic_pitch is importable here")
    monkeypatch.setenv("MUSEFM_BASIC_PITCH_PYTHON", sys.executable)
    run = run_peer("basic-pitch", [write_wav(tmp_path / "a.wav")], tmp_path / "out", threads=1, warmup=False)
    assert run.returncode == 3 and run.load_seconds is None
    assert "No module named" in run.fatal
    assert run.failed == {tmp_path / "a.wav": run.fatal}


def test_no_audio_is_an_error(tmp_path):
    with pytest.raises(MusefmError, match="no audio files"):
        peers._run_driver("null", Path(sys.executable), [], tmp_path)
