"""Evaluate a set of generated pieces against a reference set: ``musefm evaluate``.

Steps, each reusing one layer below:

1. read both sets through ``musefm.data.corpus`` (a plain folder counts as ``dir:``); a file that
   cannot be read is skipped, written to ``out/rejected.jsonl`` and counted;
2. every piece's symbolic metrics (``evaluation.symbolic.compute_all``) and, per metric, the
   generated-vs-reference comparison of Yang & Lerch (``evaluation.distributions.compare_sets``):
   means, spreads, OA and KL, plus one PNG per metric with both distributions side by side;
3. with ``train`` (a dataset built by ``musefm data build``): how much of each generated piece is
   copied from the training split (``evaluation.memorization``). The n-gram index is built once
   from the decoded training rows and cached as ``<train>/memorization/``;
4. ``results.json`` (the machine-readable result, NaN written as null), ``report.md`` and
   ``report.html`` (rendered by ``evaluation.report``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from musefm.data import corpus
from musefm.data.convert import default_cache_dir
from musefm.errors import MusefmError
from musefm.evaluation import report
from musefm.evaluation.distributions import compare_sets
from musefm.evaluation.symbolic import METRICS, compute_all
from musefm.viz import charts

SOURCE_KINDS = ("dir", "music21", "maestro")
MEMORIZATION_DIR = "memorization"
RESULTS_FILE, MARKDOWN_FILE, HTML_FILE, REJECTED_FILE = "results.json", "report.md", "report.html", "rejected.jsonl"
MOST_DIFFERENT_COUNT = 3
HISTOGRAM_BINS = 12


@dataclass
class EvaluateConfig:
    generated: str = ""  # a folder of MIDI/MusicXML files (or any source spec: dir:..., music21:...)
    reference: str = ""  # a source spec (music21:bach, dir:...) or a folder
    train: str | None = None  # a dataset dir built by `musefm data build`, for memorization
    out: str = ""
    limit: int = 0  # at most N pieces per set (0 = all)
    ngram_length: int = 8

    def validate(self) -> None:
        if not self.generated:
            raise MusefmError("no generated set given (--generated FOLDER)")
        if not self.reference:
            raise MusefmError("no reference set given (--reference music21:bach or a folder)")
        if not self.out:
            raise MusefmError("no output directory given (--out)")
        if self.limit < 0:
            raise MusefmError(f"limit must be >= 0, got {self.limit}")
        if self.ngram_length < 1:
            raise MusefmError(f"ngram_length must be >= 1, got {self.ngram_length}")


# --------------------------------------------------------------------------------------------
# Reading the sets
# --------------------------------------------------------------------------------------------


def as_source_spec(text: str) -> str:
    """A source spec as given (``dir:``, ``music21:``, ``maestro:``), or ``dir:<text>`` for a folder."""
    kind, separator, _ = text.partition(":")
    if separator and kind in SOURCE_KINDS:
        return text
    if not Path(text).expanduser().is_dir():
        raise MusefmError(f"{text}: neither a folder nor a source spec (dir:PATH, music21:COLLECTION, maestro:PATH)")
    return f"dir:{text}"


@dataclass
class PieceSet:
    """The readable pieces of one set, and what could not be read."""

    name: str  # "generated" or "reference"
    spec: str
    ids: list[str]
    paths: list[str]
    scores: list
    rejections: list[dict]  # {"set", "path", "reason"}


def read_set(name: str, spec: str, limit: int, cache_dir: Path | None) -> PieceSet:
    """Read at most ``limit`` (0: all) pieces of a source; unreadable files become rejections."""
    pieces = PieceSet(name, spec, [], [], [], [])
    for item in corpus.list_items(spec):
        if limit and len(pieces.scores) >= limit:
            break
        for result in corpus.load_item(item, cache_dir):
            if isinstance(result, corpus.Rejection):
                pieces.rejections.append({"set": name, "path": result.path, "reason": result.reason})
            elif not limit or len(pieces.scores) < limit:
                pieces.ids.append(result.meta.id)
                pieces.paths.append(result.meta.path)
                pieces.scores.append(result.score)
    return pieces


# --------------------------------------------------------------------------------------------
# Metrics and pictures
# --------------------------------------------------------------------------------------------


def _finite(values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def _bin_label(low: float, high: float) -> str:
    centre = (low + high) / 2
    return f"{centre:.3g}"


def histogram_picture(metric: str, generated_values, reference_values, oa: float, path: Path) -> bool:
    """Both sets' distributions of one metric as percentages of their pieces over shared bins, one
    colour per set (the sets may differ in size). False (nothing written) when neither set has a
    finite value."""
    generated, reference = _finite(generated_values), _finite(reference_values)
    pooled = np.concatenate([generated, reference])
    if len(pooled) == 0:
        return False
    low, high = float(pooled.min()), float(pooled.max())
    if high == low:  # a constant metric: one bin around the value
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, HISTOGRAM_BINS + 1)
    series = {}
    for name, values in (("reference", reference), ("generated", generated)):
        counts, _ = np.histogram(values, bins=edges)
        series[name] = list(100.0 * counts / max(1, len(values)))
    labels = [_bin_label(a, b) for a, b in zip(edges[:-1], edges[1:])]
    title = f"{metric} (% of pieces per bin; OA {report.format_number(oa)})"
    image = charts.grouped_bars(labels, series, title, width=760, height=300)
    charts.save_row([image], path)
    return True


def overview_picture(metrics: dict[str, dict], path: Path) -> bool:
    """OA of every metric that has one, as horizontal bars (1 = as alike as the reference itself)."""
    names = [name for name, values in metrics.items() if values["oa"] is not None]
    if not names:
        return False
    image = charts.bar_chart(names, [metrics[name]["oa"] for name in names], "Overlapped area (OA) per metric")
    charts.save_row([image], path)
    return True


def _json_safe(value):
    """NaN and infinities -> None (strict JSON), numpy scalars -> Python numbers, recursively."""
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def summarize(metrics: dict[str, dict]) -> dict:
    """Mean OA over the metrics that have one and the metrics with the lowest OA (least alike)."""
    with_oa = [(values["oa"], name) for name, values in metrics.items() if values["oa"] is not None]
    most_different = [name for _, name in sorted(with_oa)[:MOST_DIFFERENT_COUNT]]
    mean_oa = float(np.mean([oa for oa, _ in with_oa])) if with_oa else None
    return {
        "mean_oa": mean_oa,
        "metrics_compared": len(with_oa),
        "metrics_without_oa": [name for name, values in metrics.items() if values["oa"] is None],
        "most_different": most_different,
    }


# --------------------------------------------------------------------------------------------
# Memorization
# --------------------------------------------------------------------------------------------


def training_index(train: str, ngram_length: int):
    """The memorization index of a dataset's training split: loaded from ``<train>/memorization/``
    when it matches the split's pieces and ``ngram_length``, else built from the decoded training
    rows and saved there. Returns (index, info dict)."""
    from musefm.data.dataset import open_dataset
    from musefm.data.tokenize import decode
    from musefm.evaluation.memorization import MemorizationIndex

    dataset = open_dataset(train)
    rows = dataset.rows("train")
    if not rows:
        raise MusefmError(f"{train}: the dataset has no training pieces to check copies against")
    index_dir = Path(train) / MEMORIZATION_DIR
    row_ids = [str(row["id"]) for row in rows]
    info = {"dataset": str(train), "index": str(index_dir), "training_pieces": len(rows), "reused": False,
            "undecodable": 0, "saved": False}
    if index_dir.is_dir():
        try:
            cached = MemorizationIndex.load(index_dir)
        except (OSError, ValueError, KeyError):
            cached = None  # unreadable or another format: rebuilt below
        # A rebuilt dataset or another n-gram length makes the cached index stale.
        if cached is not None and cached.ngram_length == ngram_length and cached.ids_ == row_ids:
            info["reused"] = info["saved"] = True
            return cached, info
    scores, ids = [], []
    for row in rows:
        try:
            scores.append(decode(dataset.tokenizer, dataset.piece_ids(row)))
            ids.append(str(row["id"]))
        except Exception:  # MidiTok raises many kinds on odd sequences; the piece is only skipped
            info["undecodable"] += 1
    index = MemorizationIndex(ngram_length=ngram_length).fit(scores, ids)
    if info["undecodable"] == 0:  # cache only an index that matches the split exactly
        try:
            index.save(index_dir)
            info["saved"] = True
        except OSError:  # a read-only dataset: the index is rebuilt next time
            pass
    return index, info


def check_memorization(index, generated: PieceSet) -> dict:
    pieces = []
    for piece_id, path, score in zip(generated.ids, generated.paths, generated.scores):
        pieces.append({"id": piece_id, "path": path, **index.check(score)})
    return {
        "ngram_length": index.ngram_length,
        "copied_share_threshold": index.copied_share_threshold,
        "copied_notes_threshold": index.copied_notes_threshold,
        "pieces": pieces,
        "flagged": [piece["id"] for piece in pieces if piece["flagged"]],
    }


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


def _write_rejections(path: Path, rejections: list[dict]) -> None:
    path.write_text("".join(json.dumps(rejection) + "\n" for rejection in rejections))


def grammar_error_rate(folder: Path) -> dict | None:
    """Token grammar errors of the samples that ``musefm generate`` wrote into ``folder`` (one JSON
    per sample with its token ids and MidiTok's error count): errors / generated tokens, and how many
    samples have any. None when the folder holds no such records (e.g. MIDI from elsewhere)."""
    if not folder.is_dir():
        return None
    samples = tokens = errors = flawed = 0
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or record.get("grammar_errors") is None or "token_ids" not in record:
            continue
        samples += 1
        tokens += len(record["token_ids"])
        errors += int(record["grammar_errors"])
        flawed += int(record["grammar_errors"] > 0)
    if not samples:
        return None
    return {"samples": samples, "tokens": tokens, "errors": errors, "error_rate": errors / tokens if tokens else 0.0,
            "samples_with_errors": flawed}


def main(config: EvaluateConfig) -> dict:
    """Run the evaluation; writes out/report.md, out/report.html, out/results.json, out/*.png and
    out/rejected.jsonl, and returns the results (as in results.json)."""
    config.validate()
    generated_spec, reference_spec = as_source_spec(config.generated), as_source_spec(config.reference)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = default_cache_dir()

    sets = [read_set(name, spec, config.limit, cache_dir)
            for name, spec in (("generated", generated_spec), ("reference", reference_spec))]
    rejected_path = out / REJECTED_FILE
    _write_rejections(rejected_path, [rejection for pieces in sets for rejection in pieces.rejections])
    for pieces in sets:
        if not pieces.scores:
            raise MusefmError(f"no readable pieces in the {pieces.name} set {pieces.spec!r} "
                              f"({len(pieces.rejections)} rejected, see {rejected_path})")
    generated, reference = sets

    generated_metrics = [compute_all(score) for score in generated.scores]
    reference_metrics = [compute_all(score) for score in reference.scores]
    comparison = compare_sets(generated_metrics, reference_metrics)
    metrics = {}
    for name in METRICS:
        values = _json_safe(comparison[name])
        picture = f"hist_{name}.png"
        drawn = histogram_picture(name, [m[name] for m in generated_metrics], [m[name] for m in reference_metrics],
                                  comparison[name]["oa"], out / picture)
        metrics[name] = {**values, "histogram": picture if drawn else None}
    overview = "oa_overview.png" if overview_picture(metrics, out / "oa_overview.png") else None

    grammar = grammar_error_rate(Path(config.generated))

    memorization = None
    if config.train:
        index, index_info = training_index(config.train, config.ngram_length)
        memorization = {**index_info, **check_memorization(index, generated)}

    results = _json_safe({
        "settings": {**asdict(config), "generated_spec": generated_spec, "reference_spec": reference_spec},
        "sets": {
            pieces.name: {
                "spec": pieces.spec,
                "pieces": len(pieces.scores),
                "rejected": len(pieces.rejections),
                "rejections": pieces.rejections,
            }
            for pieces in sets
        },
        "metrics": metrics,
        "summary": summarize(metrics),
        "generated_pieces": [
            {"id": piece_id, "path": path, "metrics": values}
            for piece_id, path, values in zip(generated.ids, generated.paths, generated_metrics)
        ],
        "memorization": memorization,
        "grammar": grammar,
        "pictures": {"overview": overview},
        "files": {"results": RESULTS_FILE, "markdown": MARKDOWN_FILE, "html": HTML_FILE, "rejected": REJECTED_FILE},
    })
    results["summary"]["text"] = report.summary_line(results)
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=1, allow_nan=False))
    (out / MARKDOWN_FILE).write_text(report.render_markdown(results))
    (out / HTML_FILE).write_text(report.render_html(results))
    return results
