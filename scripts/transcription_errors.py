"""Where each transcriber's note errors lie, on a bench_transcribe.py run: the check behind the model
card's error counts.

Each system's missed reference notes and false positives, matched as note F1 is, are put in classes
by ``musefm.evaluation.transcription.note_errors`` (doubled unison, on a sounding note's partial, same
key, other) and counted per octave of the key (C4 is middle C, octave 4). Usage:

    python benchmarks/bench_transcribe.py --limit 10 --max-seconds 30     # writes runs/bench-transcribe
    python scripts/transcription_errors.py [runs/bench-transcribe] [--systems musefm,transkun]
"""
import argparse
from collections import Counter
from pathlib import Path

from musefm.evaluation.transcription import evaluate_transcription_dirs, load_notes, note_errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", nargs="?", type=Path, default=Path("runs/bench-transcribe"))
    parser.add_argument("--systems", help="comma-separated (default: every folder under BENCH/pred)")
    args = parser.parse_args()
    systems = args.systems.split(",") if args.systems else sorted(p.name for p in (args.bench / "pred").iterdir())
    for system in systems:
        # Files paired (and read) as `musefm evaluate transcription` pairs them for note F1.
        report = evaluate_transcription_dirs(args.bench / "pred" / system, args.bench / "ref", max_pictures=0)
        if report.unmatched_ref or report.rejected:
            raise SystemExit(f"{system}: not every reference has a readable transcription "
                             f"({(report.unmatched_ref + [item['path'] for item in report.rejected])[0]})")
        errors = {"missed": [], "false": []}
        for row in report.files:
            for side, found in note_errors(load_notes(Path(row["ref"])), load_notes(Path(row["pred"]))).items():
                errors[side] += found
        total = sum(row["ref_notes"] for row in report.files)
        print(f"{system}: {len(errors['missed'])} of {total} reference notes missed, "
              f"{len(errors['false'])} false positives")
        for side, title in (("missed", "missed"), ("false", "false positives")):
            kinds = Counter(kind for kind, _ in errors[side])
            octaves = Counter(key // 12 - 1 for kind, key in errors[side] if kind != "doubled unison")
            print(f"  {title:<16} " + ", ".join(f"{kind} {count}" for kind, count in kinds.most_common()))
            print(f"  {'':<16} by octave (unisons aside): "
                  + ", ".join(f"{octave}: {octaves[octave]}" for octave in sorted(octaves)))


if __name__ == "__main__":
    main()
