"""Writing files and directories atomically: a crash or a kill leaves either the old version or the
new one, never half of it (checkpoints, shards, caches, models).

Everything is written beside its destination (same file system) and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def save_npy_atomic(path: Path, array) -> None:
    import numpy as np

    path = Path(path)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as handle:
        np.save(handle, array)
    os.replace(handle.name, path)


@contextmanager
def atomic_directory(final: Path):
    """``with atomic_directory(final) as folder:`` fill ``folder``; on success it replaces ``final``
    (old contents removed only once the new ones are whole), on an exception it is deleted."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
        os.replace(final, trash / final.name)
        os.replace(temporary, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(temporary, final)
