"""Choose a transcriber's decoding thresholds on the validation split heard in two ways: as the
training data renders it, and played by piano timbres the model never trained on.

Thresholds tuned only on the training timbres fit them: on the held-out MuseScore piano (and on
other unseen pianos) a higher frame threshold cut offsets short. So the validation pieces are also
rendered with other General MIDI programs of the training soundfonts (by default 2 and 3, electric
grand and honky-tonk; the shipped model's lineage never trained on them), and the thresholds with
the best mean note F1 over all these files are written to the model's decode.json. Usage:

    python scripts/tune_decoding.py MODEL_DIR --data data/piano-audio,data/piano-salamander,data/piano-mellow \
        [--render-from data/piano-audio] [--soundfonts fluidr3,timgm6mb] [--programs 2,3] [--work runs/unseen-valid]

Renders are kept under --work (one folder per soundfont and program) and reused by later runs.
"""
import argparse
import sys
from pathlib import Path

from musefm.data.audio_dataset import open_audio_datasets
from musefm.errors import MusefmError
from musefm.recipes.train_transcriber import tune_split, unseen_timbre_examples

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model_dir", type=Path)
parser.add_argument("--data", required=True, help="the training datasets, comma-separated (their valid splits)")
parser.add_argument("--render-from", help="the dataset whose validation MIDI is re-rendered (default: the first)")
parser.add_argument("--soundfonts", default="fluidr3,timgm6mb")
parser.add_argument("--programs", default="2,3", help="General MIDI programs to render with, unseen in training")
parser.add_argument("--work", type=Path, default=Path("runs/unseen-valid"))
args = parser.parse_args()

source = open_audio_datasets(args.render_from or args.data.split(",")[0])
try:
    groups = unseen_timbre_examples(source, args.soundfonts.split(","), [int(p) for p in args.programs.split(",")],
                                    args.work)
except MusefmError as error:
    sys.exit(f"tune_decoding: {error}")
unseen = [example for examples in groups.values() for example in examples]

scores = tune_split(args.model_dir, open_audio_datasets(args.data), "valid", stream=sys.stdout, extra=unseen)
print(f"(the {len(unseen)} more: renders in unseen timbres; mean note F1 {scores['note_f1']:.4f}, "
      f"with offsets {scores['note_offset_f1']:.4f})")
