"""Piano-roll pictures of symusic Scores (PNG), one colour per track."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_pianoroll(score, path: Path, title: str | None = None, highlight_from_quarter: float | None = None,
                   max_quarters: float | None = None, highlight_to_quarter: float | None = None,
                   highlight_label: str = "generated") -> Path:
    """Write a piano roll of ``score`` to ``path``.

    ``highlight_from_quarter`` shades from that time to ``highlight_to_quarter`` (default: the end),
    e.g. a generated continuation after its prompt, or infilled bars between the kept ones;
    ``max_quarters`` crops long pieces.
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
        highlight_end = end if highlight_to_quarter is None else highlight_to_quarter
        axes.axvspan(highlight_from_quarter, highlight_end, color="gold", alpha=0.15)
        axes.axvline(highlight_from_quarter, color="black", linewidth=1)
        if highlight_to_quarter is not None:
            axes.axvline(highlight_to_quarter, color="black", linewidth=1)
        axes.text(highlight_from_quarter, 1.0, f" {highlight_label}", transform=axes.get_xaxis_transform(),
                  va="bottom", ha="left", fontsize=8)
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


def plot_notes(notes: np.ndarray, path: Path, reference: np.ndarray | None = None, title: str | None = None,
               max_seconds: float | None = None) -> Path:
    """Write a piano roll in seconds of a notes array ``(N, 4)`` (onset s, offset s, pitch, velocity),
    e.g. a transcription; a ``reference`` notes array, if given, is drawn underneath as grey outlines
    so missed, extra and mistimed notes stand out. ``max_seconds`` crops long pieces."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    figure, axes = plt.subplots(figsize=(12, 4.5), dpi=110)
    layers = [(reference, dict(facecolor="none", edgecolor="0.35", linewidth=0.8)),
              (notes, dict(facecolor="tab:blue", edgecolor="none", alpha=0.7))]
    lowest, highest, end = 127, 0, 0.0
    for layer, style in layers:
        if layer is None:
            continue
        layer = np.asarray(layer, dtype=np.float64).reshape(-1, 4)
        if max_seconds is not None:
            layer = layer[layer[:, 0] < max_seconds]
        if len(layer) == 0:
            continue
        durations = np.maximum(layer[:, 1] - layer[:, 0], 1e-3)
        rectangles = [Rectangle((onset, pitch - 0.4), duration, 0.8)
                      for onset, duration, pitch in zip(layer[:, 0], durations, layer[:, 2])]
        axes.add_collection(PatchCollection(rectangles, **style))
        lowest, highest = min(lowest, layer[:, 2].min()), max(highest, layer[:, 2].max())
        end = max(end, float((layer[:, 0] + durations).max()))
    if highest < lowest:
        lowest, highest, end = 60, 72, 1.0
    axes.set_xlim(0, min(end, max_seconds) if max_seconds else end)
    axes.set_ylim(lowest - 2, highest + 2)
    axes.set_xlabel("time (seconds)")
    axes.set_ylabel("MIDI pitch")
    if title:
        axes.set_title(title)
    if reference is not None:
        handles = [Rectangle((0, 0), 1, 1, facecolor="none", edgecolor="0.35"),
                   Rectangle((0, 0), 1, 1, facecolor="tab:blue", alpha=0.7)]
        axes.legend(handles, ["reference", "transcription"], loc="upper right", fontsize=7)
    axes.grid(True, alpha=0.2)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
