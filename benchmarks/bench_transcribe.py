"""Piano transcription: musefm's shipped model vs basic-pitch (ONNX) and transkun 2.0, one run.

The held-out set is the test split of a paired audio dataset built with ``--test-soundfonts``:
pieces never trained on, rendered here at 44.1 kHz with a soundfont never trained on (so no
system is handed band-limited audio; each resamples to its own rate). Every system transcribes
the same WAV files in its own process (model loaded once, timed apart), and every transcription is
scored against the same reference notes with mir_eval (``musefm evaluate transcription``).

    bash benchmarks/setup_peers.sh                       # once: the peers' own environments
    musefm data build --render --source music21:bach ... --soundfonts timgm6mb,fluidr3 \\
        --test-soundfonts musescore --out data/piano-audio   # the recipe of the shipped model
    python benchmarks/bench_transcribe.py --data data/piano-audio [--quick]

Goal (issue 6): onset F1 and onset+offset F1 at least transkun's, at a real-time factor no worse
than 2x basic-pitch's on this CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SYSTEMS = ("musefm", "basic-pitch", "transkun")


def prepare_test_set(data: Path, out: Path, limit: int, max_seconds: float, sample_rate: int) -> list[Path]:
    """WAVs of the dataset's test split rendered at ``sample_rate`` and their reference notes."""
    from symusic import Score

    from musefm.audio.render import render_midi
    from musefm.data.audio_build import cut_score
    from musefm.data.audio_dataset import open_audio_dataset
    from musefm.transcription.labels import notes_from_midi
    from musefm.transcription.postprocess import read_notes_csv, write_notes_csv

    dataset = open_audio_dataset(data)
    rows = dataset.split("test")[: limit or None]
    if not rows:
        raise SystemExit(f"{data}: no test split to benchmark on")
    identity = dataset.info["identity"]
    trained = set(identity["soundfonts"])
    held_out = set(identity.get("test_soundfonts") or [])
    if not held_out or held_out & trained:
        print(f"warning: {data} was not built with separate --test-soundfonts: the test timbre was trained on")
    audio_dir, ref_dir = out / "audio", out / "ref"
    audio_dir.mkdir(parents=True, exist_ok=True)
    ref_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for row in rows:
        stem = Path(row["audio"]).stem
        wav = audio_dir / f"{stem}.wav"
        notes = read_notes_csv(dataset.path(row["notes"]))
        midi = dataset.path(row["midi"])
        if max_seconds:  # a shorter excerpt: cut the performance and its notes at the same time
            midi = out / "midi" / f"{stem}.mid"
            midi.parent.mkdir(exist_ok=True)
            cut_score(Score(str(dataset.path(row["midi"]))), max_seconds).dump_midi(str(midi))
            notes = notes_from_midi(midi)
        if not wav.exists():
            render_midi(midi, wav, row["soundfont"], sample_rate)
        write_notes_csv(notes, ref_dir / f"{stem}.csv")
        paths.append(wav)
    return paths


def build_held_out(out: Path, quick: bool) -> None:
    """The shipped model's dataset recipe (splits are per piece, so its test pieces are the same in
    a smaller build); --quick reads only the first 80 chorales."""
    from musefm.data.audio_build import AudioBuildConfig, build_audio_dataset

    print(f"{out} not found: building it with the shipped model's recipe")
    sources = ["music21:bach"] if quick else ["music21:bach", "music21:monteverdi", "music21:trecento",
                                              "music21:mozart", "music21:haydn", "music21:beethoven",
                                              "music21:schumann_robert", "music21:joplin", "music21:chopin"]
    build_audio_dataset(AudioBuildConfig(sources=sources, out=str(out), soundfonts=["timgm6mb", "fluidr3"],
                                         test_soundfonts=["musescore"], max_seconds=120.0, limit=80 if quick else 0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/piano-audio", help="paired audio dataset with a held-out test split")
    parser.add_argument("--quick", action="store_true", help="3 test pieces, first 15 s of each")
    parser.add_argument("--limit", type=int, default=0, help="at most N test pieces (0: all)")
    parser.add_argument("--max-seconds", type=float, default=0.0, help="cut each piece to its first N seconds")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--threads", type=int, default=0, help="threads for every system (default: all cores)")
    parser.add_argument("--out", default="runs/bench-transcribe")
    args = parser.parse_args()
    if args.quick:
        args.limit, args.max_seconds = args.limit or 3, args.max_seconds or 15.0
    if not Path(args.data).exists():
        build_held_out(Path(args.data), quick=args.quick)

    from musefm.evaluation.transcription import evaluate_transcription_dirs
    from musefm.transcription.peers import run_peer

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    wavs = prepare_test_set(Path(args.data), out, args.limit, args.max_seconds, 44100)
    results = {}
    for system in args.systems.split(","):
        run = run_peer(system, wavs, out / "pred" / system, threads=args.threads or None)
        if run.fatal or not run.files or not any(f.ok for f in run.files):
            print(f"{system}: failed ({run.fatal or 'no file transcribed'})\n{run.stderr_tail}")
            continue
        report = evaluate_transcription_dirs(out / "pred" / system, out / "ref")
        report.write(out / "reports" / system)
        results[system] = {"scores": report.mean, "rtf": run.real_time_factor, "load_s": run.load_seconds,
                           "peak_rss_mb": run.peak_rss_mb, "failed": len(run.failed),
                           "audio_s": run.audio_seconds, "seconds": run.processing_seconds}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))

    audio_minutes = next(iter(results.values()))["audio_s"] / 60 if results else 0.0
    print(f"\n{len(wavs)} held-out pieces, {audio_minutes:.1f} min of audio, scored with mir_eval (mean over files)")
    print(f"{'system':<12} {'note F1':>8} {'+offset':>8} {'+vel':>8} {'frame F1':>9} {'RTF':>7} {'load s':>7} {'peak MB':>8}")
    for system, row in results.items():
        s = row["scores"]
        print(f"{system:<12} {s['note_f1']:8.3f} {s['note_offset_f1']:8.3f} {s['note_offset_velocity_f1']:8.3f} "
              f"{s['frame_f1']:9.3f} {row['rtf']:7.4f} {row['load_s'] or 0:7.1f} {row['peak_rss_mb'] or 0:8.0f}")
    fields = {}
    for system, row in results.items():
        key = system.replace("-", "_")
        fields[f"{key}_note_f1"] = round(row["scores"]["note_f1"], 4)
        fields[f"{key}_offset_f1"] = round(row["scores"]["note_offset_f1"], 4)
        fields[f"{key}_rtf"] = round(row["rtf"], 5)
    if "musefm" in results and "transkun" in results:
        fields["note_f1_minus_transkun"] = round(results["musefm"]["scores"]["note_f1"] - results["transkun"]["scores"]["note_f1"], 4)
        fields["offset_f1_minus_transkun"] = round(results["musefm"]["scores"]["note_offset_f1"]
                                                   - results["transkun"]["scores"]["note_offset_f1"], 4)
    if "musefm" in results and "basic-pitch" in results:
        fields["rtf_ratio_vs_basic_pitch"] = round(results["musefm"]["rtf"] / results["basic-pitch"]["rtf"], 3)
    print("RESULT " + " ".join(f"{key}={value}" for key, value in fields.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
