"""Average the weights of several fine-tunes of one musefm model into a new model (a uniform
model soup; see musefm.models.base.average_pretrained). A transcriber's decode.json is copied from
the first model; re-tune it for the average with scripts/tune_decoding.py. --float16 stores the weights
as the models shipped in the package are. Usage:

    python scripts/average_weights.py [--float16] OUT_DIR MODEL_DIR MODEL_DIR [MODEL_DIR ...]

A fine-tune averaged with its starting point (OUT/start, written by train-transcriber with init_from)
keeps more of what the start knew (WiSE-FT, Wortsman et al. 2022).
"""
import argparse
import shutil
import sys
from pathlib import Path

import torch

from musefm.errors import MusefmError
from musefm.models.base import average_pretrained

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("out", type=Path)
parser.add_argument("models", type=Path, nargs="+")
parser.add_argument("--float16", action="store_true", help="store the averaged weights in float16")
args = parser.parse_args()
try:
    average_pretrained(args.models).save_pretrained(args.out, torch.float16 if args.float16 else None)
except MusefmError as error:
    sys.exit(f"average_weights: {error}")
if (args.models[0] / "decode.json").is_file():
    shutil.copy(args.models[0] / "decode.json", args.out / "decode.json")
print(f"{args.out}: the mean of {len(args.models)} models")
