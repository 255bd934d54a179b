"""Piano-roll pictures of symusic Scores (PNG), one colour per track."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_pianoroll(score, path: Path, title: str | None = None, highlight_from_quarter: float | None = None,
                   max_quarters: float | None = None) -> Path:
    """Write a piano roll of ``score`` to ``path``.

    ``highlight_from_quarter`` shades everything after that time (e.g. a generated continuation after
    its prompt); ``max_quarters`` crops long pieces.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    tpq = score.ticks_per_quarter
    figure, axes = plt.subplots(figsize=(12, 4.5), dpi=110)
    colours = plt.get_cmap("tab10")
    lowest, highest, end = 127, 0, 0.0
    for track_index, track in enumerate(score.tracks):
        arrays = track.notes.numpy()
        if len(arrays["time"]) == 0:
            continue
        starts = arrays["time"] / tpq
        durations = np.maximum(arrays["duration"] / tpq, 1e-3)
        pitches = arrays["pitch"].astype(int)
        keep = starts < max_quarters if max_quarters else np.ones(len(starts), bool)
        rectangles = [Rectangle((s, p - 0.4), d, 0.8) for s, d, p in zip(starts[keep], durations[keep], pitches[keep])]
        label = track.name or f"track {track_index + 1}"
        axes.add_collection(PatchCollection(rectangles, facecolor=colours(track_index % 10), edgecolor="none",
                                            alpha=0.85, label=label))
        if keep.any():
            lowest, highest = min(lowest, pitches[keep].min()), max(highest, pitches[keep].max())
            end = max(end, float((starts[keep] + durations[keep]).max()))
    if highest < lowest:
        lowest, highest, end = 60, 72, 4.0
    if highlight_from_quarter is not None:
        axes.axvspan(highlight_from_quarter, end, color="gold", alpha=0.15, label="generated")
        axes.axvline(highlight_from_quarter, color="black", linewidth=1)
    axes.set_xlim(0, end)
    axes.set_ylim(lowest - 2, highest + 2)
    axes.set_xlabel("time (quarter notes)")
    axes.set_ylabel("MIDI pitch")
    if title:
        axes.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours(i % 10)) for i, _ in enumerate(score.tracks)]
    labels = [track.name or f"track {i + 1}" for i, track in enumerate(score.tracks)]
    if 1 < len(handles) <= 10:
        axes.legend(handles, labels, loc="upper right", fontsize=7)
    axes.grid(True, alpha=0.2)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
