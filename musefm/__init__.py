"""musefm: music foundation models, from a folder of music to trained, used and evaluated models.

The public API is imported lazily so ``import musefm`` stays cheap and has no side effects.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "MusefmError": "musefm.errors",
    "BuildConfig": "musefm.data.build",
    "build_dataset": "musefm.data.build",
    "open_dataset": "musefm.data.dataset",
    "TokenDataset": "musefm.data.dataset",
    "AugmentConfig": "musefm.data.augment",
    "load_piece": "musefm.data.corpus",
    "iter_pieces": "musefm.data.corpus",
    "make_tokenizer": "musefm.data.tokenize",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'musefm' has no attribute {name!r}")
