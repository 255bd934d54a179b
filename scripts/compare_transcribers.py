"""Score transcribers side by side on validation audio, per timbre: the check a model passes before
it replaces the shipped one.

Every validation file of --data (grouped by the soundfont it was rendered with) and the validation
pieces played by unseen General MIDI programs (the renders of scripts/tune_decoding.py, made here
too if missing) is transcribed by each model with its own decode.json and scored with mir_eval.
Printed per group and model: note F1 / with offsets / with velocity; then the mean over groups and
over the densest files (mean polyphony above --dense). The first model is the baseline: a later one
is marked "better" when its mean note F1 over the groups is higher and its mean F1 with offsets is
not lower. Only the validation split is used, never the test split. Usage:

    python scripts/compare_transcribers.py --data data/piano-audio,data/piano-salamander,data/piano-gmfree \
        BASELINE_MODEL_DIR CANDIDATE_MODEL_DIR [...]

Scores are cached per model (a hash of its files) under --cache, so a baseline is scored once.
"""
import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from musefm.data.audio_dataset import open_audio_datasets
from musefm.errors import MusefmError
from musefm.evaluation.transcription import score_notes
from musefm.recipes.train_transcriber import unseen_timbre_examples
from musefm.transcription.postprocess import read_notes_csv
from musefm.transcription.transcribe import load_transcriber, transcribe_file

METRICS = ("note_f1", "note_offset_f1", "note_offset_velocity_f1")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("models", nargs="+", type=Path, help="model directories; the first is the baseline")
parser.add_argument("--data", required=True, help="the training datasets, comma-separated (their valid splits)")
parser.add_argument("--soundfonts", default="fluidr3,timgm6mb", help="unseen-program renders: soundfonts")
parser.add_argument("--programs", default="2,3", help="unseen-program renders: General MIDI programs")
parser.add_argument("--work", type=Path, default=Path("runs/unseen-valid"), help="where the renders are kept")
parser.add_argument("--dense", type=float, default=4.5, help="mean polyphony above which a file counts as dense")
parser.add_argument("--cache", type=Path, default=Path("runs/compare-cache"))
args = parser.parse_args()


def mean_polyphony(notes: np.ndarray) -> float:
    """Notes sounding at once on average over the span from the first onset to the last offset."""
    if len(notes) == 0:
        return 0.0
    span = notes[:, 1].max() - notes[:, 0].min()
    return float((notes[:, 1] - notes[:, 0]).sum() / span) if span > 0 else 0.0


def model_hash(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in ("model.safetensors", "config.json", "decode.json"):
        if (directory / name).is_file():
            digest.update(name.encode() + (directory / name).read_bytes())
    return digest.hexdigest()[:16]


def score_model(directory: Path, examples: list[tuple[str, Path, np.ndarray]]) -> dict[str, dict]:
    """{audio path: scores} for every example, transcribed with the model's own thresholds."""
    cache_path = args.cache / f"{model_hash(directory)}.json"
    cached = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    missing = [(path, reference) for _, path, reference in examples if str(path) not in cached]
    if missing:
        model = load_transcriber(directory)
        for number, (path, reference) in enumerate(missing, 1):
            scores = score_notes(reference, transcribe_file(model, path).notes)
            cached[str(path)] = {metric: scores[metric] for metric in METRICS}
            print(f"\r{directory}: {number}/{len(missing)} files", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        args.cache.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cached))
    return cached


try:
    dataset = open_audio_datasets(args.data)
    examples = [(row["soundfont"], dataset.path(row["audio"]), read_notes_csv(dataset.path(row["notes"])))
                for row in dataset.split("valid")]
    first_build = open_audio_datasets(args.data.split(",")[0])
    unseen = unseen_timbre_examples(first_build, args.soundfonts.split(","),
                                    [int(p) for p in args.programs.split(",")], args.work)
except MusefmError as error:
    sys.exit(f"compare_transcribers: {error}")
examples += [(group, path, reference) for group, pairs in unseen.items() for path, reference in pairs]
groups = list(dict.fromkeys(group for group, _, _ in examples))
dense = {str(path) for _, path, reference in examples if mean_polyphony(reference) > args.dense}

results = [score_model(directory, examples) for directory in args.models]


def mean(scores: dict, paths, metric: str) -> float:
    return float(np.mean([scores[str(path)][metric] for path in paths]))


def summary(scores: dict) -> dict[str, tuple]:
    rows = {group: tuple(mean(scores, [p for g, p, _ in examples if g == group], m) for m in METRICS)
            for group in groups}
    rows["mean of groups"] = tuple(float(np.mean([rows[g][i] for g in groups])) for i in range(len(METRICS)))
    rows[f"dense ({len(dense)} files)"] = tuple(mean(scores, dense, m) for m in METRICS) if dense else (0.0,) * 3
    return rows


summaries = [summary(scores) for scores in results]
width = max(len(name) for name in summaries[0]) + 7  # the name, then its file count
print("note F1 / with offsets / with velocity, mean over each group's files")
print(" " * width + "".join(f"{'/'.join(directory.parts[-2:])[-26:]:>28}" for directory in args.models))
for name in summaries[0]:
    count = sum(1 for g, _, _ in examples if g == name) if name in groups else ""
    print(f"{name:<{width - 5}}{count:>4} " + "".join(
        f"{' / '.join(f'{v:.4f}' for v in s[name]):>28}" for s in summaries))
base = summaries[0]["mean of groups"]
for directory, rows in zip(args.models[1:], summaries[1:]):
    note, offsets, velocity = rows["mean of groups"]
    up = sum(rows[g][0] > summaries[0][g][0] for g in groups)
    verdict = "better" if note > base[0] and offsets >= base[1] else "not better"
    print(f"{directory}: {verdict} than {args.models[0]} (mean note F1 {note - base[0]:+.4f}, with offsets "
          f"{offsets - base[1]:+.4f}, with velocity {velocity - base[2]:+.4f}; note F1 up on {up} of {len(groups)} groups)")
