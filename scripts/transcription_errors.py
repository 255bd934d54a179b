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

from musefm.evaluation.transcription import load_notes, note_errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", nargs="?", type=Path, default=Path("runs/bench-transcribe"))
    parser.add_argument("--systems", help="comma-separated (default: every folder under BENCH/pred)")
    args = parser.parse_args()
    systems = args.systems.split(",") if args.systems else sorted(p.name for p in (args.bench / "pred").iterdir())
    references = sorted((args.bench / "ref").glob("*.csv"))
    for system in systems:
        errors, total = {"missed": [], "false": []}, 0
        for path in references:
            predicted = [p for p in (args.bench / "pred" / system).glob(path.stem + ".*") if p.suffix in (".mid", ".csv")]
            if not predicted:
                raise SystemExit(f"{args.bench / 'pred' / system}: no transcription of {path.stem}")
            reference = load_notes(path)
            for side, found in note_errors(reference, load_notes(predicted[0])).items():
                errors[side] += found
            total += len(reference)
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
