"""The dataset card: the numbers and pictures that show what a dataset holds, and its bias.

``compute_stats`` turns a manifest into plain numbers (``stats.json``); ``write_card`` writes
``card.md`` with PNG plots under ``card/``: pieces by collection and composer, keys, meters, the
pitch distribution, piece lengths, splits, licences, duplicates and rejections.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from musefm.data.music import MODES, PITCH_CLASS_NAMES

TOP = 20  # categories shown by name in tables and plots; the rest are summed as "other"


def _counts(values) -> dict:
    return dict(Counter("unknown" if v in (None, "") else str(v) for v in values).most_common())


def _percentiles(values) -> dict:
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(values) == 0:
        return {}
    q = np.percentile(values, [0, 5, 25, 50, 75, 95, 100])
    return {"min": q[0], "p5": q[1], "p25": q[2], "median": q[3], "p75": q[4], "p95": q[5], "max": q[6],
            "mean": float(values.mean())}


def _reason_kind(reason: str) -> str:
    """Group rejection reasons by their wording before any detail in parentheses or numbers."""
    head = reason.split("(")[0].strip()
    return " ".join(word for word in head.split() if not any(c.isdigit() for c in word)) or reason


def compute_stats(manifest: list[dict], rejected: list[dict], pitch_histogram, info: dict) -> dict:
    stats_of = [row["stats"] for row in manifest]
    tokens = [row["length"] for row in manifest]
    duplicate_groups = Counter(row["fingerprint"] for row in manifest if row.get("copies", 1) > 1)
    tokens_by_collection = Counter()
    for row in manifest:
        tokens_by_collection[row["collection"]] += row["length"]
    pitch_histogram = np.asarray(pitch_histogram, dtype=np.int64)
    used = np.flatnonzero(pitch_histogram)
    modes = Counter(row["key"].split()[1] for row in manifest if row.get("key"))
    pitch_classes = np.zeros(12, np.int64)
    for pitch, count in enumerate(pitch_histogram):
        pitch_classes[pitch % 12] += count
    return {
        "tokenizer": info.get("tokenizer"),
        "pieces": len(manifest),
        "tokens": int(sum(tokens)),
        "notes": int(sum(s["notes"] for s in stats_of)),
        "hours": round(sum(s["seconds"] for s in stats_of) / 3600, 3),
        "rejected": len(rejected),
        "rejected_by_reason": _counts(_reason_kind(r["reason"]) for r in rejected),
        "splits": {name: {"pieces": sum(1 for r in manifest if r["split"] == name),
                          "tokens": int(sum(r["length"] for r in manifest if r["split"] == name))}
                   for name in ("train", "valid", "test")},
        "collections": _counts(row["collection"] for row in manifest),
        "tokens_by_collection": dict(tokens_by_collection.most_common()),
        "composers": _counts(row.get("composer") for row in manifest),
        "keys": _counts(row.get("key") for row in manifest),
        "key_sources": _counts(row.get("key_source") for row in manifest),
        "modes": {mode: modes.get(mode, 0) for mode in MODES},
        "time_signatures": _counts(row.get("time_signature") for row in manifest),
        "licenses": _counts(row.get("license") for row in manifest),
        "sources": _counts(row.get("source") for row in manifest),
        "duplicate_groups": len(duplicate_groups),
        "duplicate_pieces": int(sum(duplicate_groups.values())),
        "pitch_lowest": int(used.min()) if len(used) else None,
        "pitch_highest": int(used.max()) if len(used) else None,
        "pitch_histogram": pitch_histogram.tolist(),
        "pitch_class_share": {PITCH_CLASS_NAMES[i]: round(float(c) / max(1, pitch_classes.sum()), 4)
                              for i, c in enumerate(pitch_classes)},
        "piece_pitch_min": _percentiles(s["pitch_min"] for s in stats_of),
        "piece_pitch_max": _percentiles(s["pitch_max"] for s in stats_of),
        "tokens_per_piece": _percentiles(tokens),
        "seconds_per_piece": _percentiles(s["seconds"] for s in stats_of),
        "notes_per_piece": _percentiles(s["notes"] for s in stats_of),
        "tracks_per_piece": _counts(s["tracks"] for s in stats_of),
    }


def _share(counts: dict, total: int) -> str:
    if not counts or not total:
        return "n/a"
    name, count = next(iter(counts.items()))
    return f"{name} ({100 * count / total:.0f}%)"


def _top(counts: dict, limit: int = TOP) -> dict:
    items = list(counts.items())
    top = dict(items[:limit])
    rest = sum(count for _, count in items[limit:])
    if rest:
        top["other"] = top.get("other", 0) + rest
    return top


def _plots(out: Path, stats: dict, manifest: list[dict]) -> dict[str, str]:
    """The card's four PNGs (Pillow charts: milliseconds, so every build can afford them)."""
    from musefm.viz.charts import bar_chart, grouped_bars, histogram, save_row

    folder = out / "card"
    written = {}

    def save(name, images):
        save_row(images, folder / f"{name}.png")
        written[name] = f"card/{name}.png"

    collections, composers = _top(stats["collections"]), _top(stats["composers"])
    rows = max(len(collections), len(composers))
    height = max(160, 60 + 18 * rows)
    save("collections", [
        bar_chart(list(collections), list(collections.values()), "pieces by collection", height=height),
        bar_chart(list(composers), list(composers.values()), "pieces by composer", height=height),
    ])

    keys = stats["keys"]
    meters = _top(stats["time_signatures"], 12)
    save("keys_meters", [
        grouped_bars(list(PITCH_CLASS_NAMES), {mode: [keys.get(f"{name} {mode}", 0) for name in PITCH_CLASS_NAMES]
                                               for mode in MODES},
                     f"keys (unknown: {keys.get('unknown', 0)})", width=720, height=320),
        bar_chart(list(meters), list(meters.values()), "time signatures", width=380, height=320),
    ])

    pitch = np.asarray(stats["pitch_histogram"])
    low = (stats["pitch_lowest"] or 21) - 2
    high = (stats["pitch_highest"] or 108) + 3
    shares = stats["pitch_class_share"]
    save("pitch", [
        histogram(list(range(low, high + 1)), pitch[low:high].tolist(), "notes by MIDI pitch (all pieces)",
                  "MIDI pitch", width=650, colour=(34, 136, 51)),
        grouped_bars(list(shares), {"": [100 * v for v in shares.values()]}, "pitch-class share (%)", width=450),
    ])

    tokens = np.array([row["length"] for row in manifest], dtype=np.float64)
    seconds = np.array([row["stats"]["seconds"] for row in manifest], dtype=np.float64)
    token_edges = np.logspace(np.log10(max(1.0, tokens.min())), np.log10(tokens.max() + 1), 31)
    second_edges = np.linspace(0, max(1.0, float(seconds.max())), 31)
    save("lengths", [
        histogram(token_edges.tolist(), np.histogram(tokens, token_edges)[0].tolist(), "tokens per piece",
                  "tokens (log scale)", log_x=True),
        histogram(second_edges.tolist(), np.histogram(seconds, second_edges)[0].tolist(), "seconds per piece",
                  "seconds"),
    ])
    return written


def _table(counts: dict, total: int, limit: int = TOP, header=("", "pieces", "share")) -> str:
    lines = [f"| {header[0]} | {header[1]} | {header[2]} |", "|---|---:|---:|"]
    for name, count in _top(counts, limit).items():
        lines.append(f"| {name} | {count:,} | {100 * count / max(1, total):.1f}% |")
    return "\n".join(lines)


def render_card(stats: dict, plots: dict[str, str], title: str) -> str:
    pieces = stats["pieces"]
    modes = stats["modes"]
    known_modes = sum(modes.values())
    tokens = stats["tokens_per_piece"]
    lines = [
        f"# Dataset card: {title}",
        "",
        f"{pieces:,} pieces, {stats['notes']:,} notes, {stats['tokens']:,} {stats['tokenizer']} tokens, "
        f"{stats['hours']:.1f} hours of music; {stats['rejected']:,} files or tunes rejected.",
        "",
        "## At a glance: where this data leans",
        f"- Largest collection: {_share(stats['collections'], pieces)}; largest composer group: "
        f"{_share(stats['composers'], pieces)}.",
        f"- Mode: {100 * modes.get('major', 0) / max(1, known_modes):.0f}% major, "
        f"{100 * modes.get('minor', 0) / max(1, known_modes):.0f}% minor (of {known_modes:,} pieces with a key); "
        f"most common key {_share(stats['keys'], pieces)}.",
        f"- Most common meter: {_share(stats['time_signatures'], pieces)}.",
        f"- Pitches span MIDI {stats['pitch_lowest']}..{stats['pitch_highest']}; "
        f"median piece {tokens.get('median', 0):.0f} tokens ({stats['seconds_per_piece'].get('median', 0):.0f} s).",
        f"- Exact duplicates (same notes): {stats['duplicate_pieces']:,} pieces in {stats['duplicate_groups']:,} groups; "
        "each group is kept in one split.",
        "",
        "## Splits",
        "| split | pieces | tokens |",
        "|---|---:|---:|",
        *[f"| {name} | {s['pieces']:,} | {s['tokens']:,} |" for name, s in stats["splits"].items()],
        "",
        "## Collections and composers",
        f"![pieces by collection and composer]({plots['collections']})",
        "",
        _table(stats["collections"], pieces, header=("collection", "pieces", "share")),
        "",
        _table(stats["composers"], pieces, header=("composer", "pieces", "share")),
        "",
        "## Keys and meters",
        f"![keys and time signatures]({plots['keys_meters']})",
        "",
        "Key sources: " + ", ".join(f"{k} {v:,}" for k, v in stats["key_sources"].items())
        + " (\"signature\": notated key and mode; \"+profile\": mode or key estimated from the notes).",
        "",
        _table(stats["time_signatures"], pieces, 12, header=("time signature", "pieces", "share")),
        "",
        "## Pitch",
        f"![pitch distribution]({plots['pitch']})",
        "",
        "## Lengths",
        f"![lengths]({plots['lengths']})",
        "",
        "| per piece | min | median | p95 | max |",
        "|---|---:|---:|---:|---:|",
        *[
            f"| {label} | {d.get('min', 0):,.0f} | {d.get('median', 0):,.0f} | {d.get('p95', 0):,.0f} | {d.get('max', 0):,.0f} |"
            for label, d in (("tokens", stats["tokens_per_piece"]), ("notes", stats["notes_per_piece"]),
                             ("seconds", stats["seconds_per_piece"]))
        ],
        "",
        "## Licences and provenance",
        _table(stats["licenses"], pieces, header=("licence / provenance", "pieces", "share")),
        "",
        "## Rejected input",
        f"{stats['rejected']:,} files or tunes could not be used (each with its reason in `rejected.jsonl`).",
        "",
    ]
    if stats["rejected_by_reason"]:
        lines += [_table(stats["rejected_by_reason"], stats["rejected"], header=("reason", "count", "share")), ""]
    return "\n".join(lines)


def write_card(out: Path, stats: dict, manifest: list[dict] | None = None) -> Path:
    """Write stats.json, card.md and its PNG plots into dataset directory ``out``."""
    out = Path(out)
    if manifest is None:
        from musefm.data.build import read_jsonl

        manifest = read_jsonl(out / "manifest.jsonl")
    plots = _plots(out, stats, manifest)
    (out / "stats.json").write_text(json.dumps(stats, indent=2, default=float))
    path = out / "card.md"
    path.write_text(render_card(stats, plots, out.name))
    return path


def format_stats(stats: dict) -> str:
    """The card's numbers as plain text, for ``musefm data stats``."""
    lines = [
        f"pieces      {stats['pieces']:,}",
        f"tokens      {stats['tokens']:,} ({stats['tokenizer']})",
        f"notes       {stats['notes']:,}",
        f"hours       {stats['hours']:.2f}",
        f"rejected    {stats['rejected']:,}",
        "splits      " + ", ".join(f"{k} {v['pieces']:,} pieces / {v['tokens']:,} tokens" for k, v in stats["splits"].items()),
        f"pitch range {stats['pitch_lowest']}..{stats['pitch_highest']}",
        f"duplicates  {stats['duplicate_pieces']:,} pieces in {stats['duplicate_groups']:,} groups",
        "modes       " + ", ".join(f"{k} {v:,}" for k, v in stats["modes"].items()),
    ]
    for title, key in (("collections", "collections"), ("composers", "composers"), ("keys", "keys"),
                       ("meters", "time_signatures"), ("licences", "licenses"), ("rejections", "rejected_by_reason")):
        counts = _top(stats[key], 10)
        if counts:
            lines.append(f"{title:<11} " + ", ".join(f"{name} {count:,}" for name, count in counts.items()))
    tokens = stats["tokens_per_piece"]
    if tokens:
        lines.append(f"tokens/piece min {tokens['min']:.0f}, median {tokens['median']:.0f}, p95 {tokens['p95']:.0f}, max {tokens['max']:.0f}")
    return "\n".join(lines)
