"""Symbolic metrics: musefm's ``compute_all`` vs muspy's implementations on the same pieces.

Times every per-piece metric of musefm over N real pieces (Bach chorales and O'Neill's tunes from
the music21 corpus, transposed copies beyond the corpus), and muspy's versions of the metrics both
libraries define, on pieces already loaded (file reading is not timed). Also reports, per shared
metric, how often the two agree (|difference| < 1e-6): where they differ, the definitions differ on
purpose (see each musefm docstring), e.g. musefm's polyphony rate counts only sounding steps.

Run: ``python benchmarks/bench_metrics.py [--quick] [--pieces 1000]`` (muspy is a benchmark-only
extra: ``pip install muspy``). Last line: ``RESULT ...``.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import make_midi_files  # noqa: E402

SHARED = {  # musefm name -> muspy call
    "pitch_range": lambda muspy, music: muspy.pitch_range(music),
    "n_pitches_used": lambda muspy, music: muspy.n_pitches_used(music),
    "n_pitch_classes_used": lambda muspy, music: muspy.n_pitch_classes_used(music),
    "polyphony": lambda muspy, music: muspy.polyphony(music),
    "polyphony_rate": lambda muspy, music: muspy.polyphony_rate(music),
    "scale_consistency": lambda muspy, music: muspy.scale_consistency(music),
    "pitch_entropy": lambda muspy, music: muspy.pitch_entropy(music),
    "pitch_class_entropy": lambda muspy, music: muspy.pitch_class_entropy(music),
    "empty_beat_rate": lambda muspy, music: muspy.empty_beat_rate(music),
    "groove_consistency": lambda muspy, music: muspy.groove_consistency(music, measure_resolution=4 * music.resolution),
    "empty_bar_rate": lambda muspy, music: muspy.empty_measure_rate(music, measure_resolution=4 * music.resolution),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 pieces")
    parser.add_argument("--pieces", type=int, default=1000)
    args = parser.parse_args()
    count = 200 if args.quick else args.pieces

    import muspy
    from symusic import Score

    from musefm.evaluation.symbolic import compute_all

    work = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    try:
        paths = make_midi_files(work / "midi", count)
        scores = [Score(str(p)) for p in paths]
        musics = [muspy.read_midi(str(p)) for p in paths]

        started = time.perf_counter()
        ours = [compute_all(score) for score in scores]
        ours_seconds = time.perf_counter() - started

        started = time.perf_counter()
        theirs = [{name: call(muspy, music) for name, call in SHARED.items()} for music in musics]
        theirs_seconds = time.perf_counter() - started

        print(f"musefm: {len(ours[0])} metrics x {count} pieces in {ours_seconds:.2f} s")
        print(f"muspy:  {len(SHARED)} shared metrics x {count} pieces in {theirs_seconds:.2f} s")
        print("agreement per shared metric (|musefm - muspy| < 1e-6):")
        for name in SHARED:
            both = [(a[name], b[name]) for a, b in zip(ours, theirs)
                    if not (math.isnan(a[name]) or b[name] is None or math.isnan(b[name]))]
            agree = sum(abs(x - y) < 1e-6 for x, y in both)
            print(f"  {name:22s} {agree:5d}/{len(both)}")
        print(f"RESULT pieces={count} musefm_seconds={ours_seconds:.2f} musefm_metrics={len(ours[0])} "
              f"muspy_seconds={theirs_seconds:.2f} muspy_metrics={len(SHARED)} "
              f"ratio_vs_muspy={theirs_seconds / ours_seconds:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
