"""The subset of the piano dataset that trained the shipped transcriber on a lent GPU machine.

A device run can carry at most 64 MiB of files, so the recipe's dataset (19 h of FLAC) was cut to
~50 MB: pieces of the training split in a seeded random order, one soundfont each (alternating
timgm6mb / fluidr3), re-encoded as OGG Vorbis, plus 8 validation examples. Usage:

    python scripts/gpu_subset.py data/piano-audio .gpudata/piano-ogg [SEED [MAX_MB [PROGRAMS]]]
    python scripts/gpu_subset.py data/piano-audio,data/piano-salamander .gpudata/piano-3 4 34

Several datasets (train-transcriber's --data A,B) give each piece one of all their soundfonts in
turn (timgm6mb, fluidr3, then the others such as salamander).

The shipped model was trained on SEED 0's subset, then fine-tuned on SEED 1's (another draw of
pieces, the other soundfont first) with MAX_MB 43: the last pieces are dropped until the folder's
audio (train + valid) is at most that size, so the tree still fits a device transfer.

PROGRAMS (e.g. 0,1,2,3: acoustic grand, bright, electric grand, honky-tonk) re-renders the training
pieces' MIDI with General MIDI programs taken in turn, for timbres beyond the two soundfonts' grand
piano; the notes stay those of the MIDI that was rendered. The 2026-11-26 run used seed 3, 34 MB and
programs 0,1,2,3 (after seed 2 at 34 MB with the piano alone). Stage 12 (2026-11-27) drew from the
three builds (timgm6mb, fluidr3, Salamander, mellow Salamander in turn): seed 5 at 49 MB, then seed 6
at 46 MB (the second run also carried its starting model, 5.9 MB in fp16).
"""
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import soundfile as sf

from musefm.audio.io import load_audio
from musefm.audio.render import render_midi, with_program
from musefm.data.audio_dataset import open_audio_datasets

dataset, dst = open_audio_datasets(sys.argv[1]), Path(sys.argv[2])
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
max_bytes = float(sys.argv[4]) * 1e6 if len(sys.argv) > 4 else float("inf")
programs = [int(p) for p in sys.argv[5].split(",")] if len(sys.argv) > 5 else [0]
if dst.exists():
    shutil.rmtree(dst)
(dst / "audio").mkdir(parents=True)
(dst / "notes").mkdir()
rows = dataset.rows
rng = random.Random(seed)
train = [r for r in rows if r["split"] == "train"]
present = {r["soundfont"] for r in train}
fonts = [f for f in ("timgm6mb", "fluidr3") if f in present] + sorted(present - {"timgm6mb", "fluidr3"})
pieces = sorted({r["piece"] for r in train})
by_piece_font = {}  # (piece, soundfont) -> its first training row
for r in train:
    by_piece_font.setdefault((r["piece"], r["soundfont"]), r)
rng.shuffle(pieces)
budget, used, out = 50e6, 0, []


def keep(row: dict, audio, sr: int, stem: str) -> int:
    """Write one example into the subset (OGG audio, its notes); the size of its audio."""
    ogg, notes = dst / "audio" / f"{stem}.ogg", Path(row["notes"]).name
    sf.write(ogg, audio, sr, format="OGG", subtype="VORBIS")
    shutil.copy(dataset.path(row["notes"]), dst / "notes" / notes)
    out.append(dict(row, audio=f"audio/{stem}.ogg", notes=f"notes/{notes}"))
    return ogg.stat().st_size


for number, piece in enumerate(pieces):
    font = fonts[(number // len(programs) + seed) % len(fonts)]
    program = programs[number % len(programs)]
    row = by_piece_font.get((piece, font))
    if row is None:  # a piece one build rejected
        continue
    stem = Path(row["audio"]).stem
    if program == 0:
        audio, sr = load_audio(dataset.path(row["audio"]))
    else:  # the same performance on another instrument: same notes, new audio
        with tempfile.TemporaryDirectory() as scratch:
            midi = with_program(dataset.path(row["midi"]), program, Path(scratch))
            wav = render_midi(midi, Path(scratch) / "out.wav", soundfont=font, sample_rate=16000)
            audio, sr = load_audio(wav, sample_rate=16000)
        stem = f"{stem}-p{program}"
        row = dict(row, id=f"{row['id']}@program{program}", program=program)
    used += keep(row, audio, sr, stem)
    if used > budget:
        break
valid = [r for r in rows if r["split"] == "valid" and r["soundfont"] == "fluidr3"][:8]
for row in valid:
    keep(row, *load_audio(dataset.path(row["audio"])), Path(row["audio"]).stem)
kept_train = [r for r in out if r["split"] == "train"]
kept_valid = [r for r in out if r["split"] != "train"]
total = sum((dst / r["audio"]).stat().st_size for r in out)
while total > max_bytes:
    dropped = kept_train.pop()
    total -= (dst / dropped["audio"]).stat().st_size
    (dst / dropped["audio"]).unlink()
    (dst / "notes" / Path(dropped["notes"]).name).unlink()
out = kept_train + kept_valid
(dst / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
(dst / "dataset.json").write_text(json.dumps(dataset.info, indent=2))
hours = sum(r["seconds"] for r in out if r["split"] == "train") / 3600
print(len(out), "rows", round(hours, 2), "h train", round(used / 1e6, 1), "MB")
