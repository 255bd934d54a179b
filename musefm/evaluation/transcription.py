"""Scoring note transcriptions against references the way the Onsets and Frames / MAESTRO papers do.

Note metrics come from mir_eval (``transcription`` and ``transcription_velocity``), never
reimplemented. The frame metric counts pitch x frame cells of boolean piano rolls sampled at
``frame_rate`` (a cell is on when ``onset <= i / frame_rate < offset``), as Onsets and Frames does;
on such rolls it equals ``mir_eval.multipitch`` precision and recall.

Empty inputs: mir_eval warns and scores 0 when either side has no notes. We keep 0 when exactly one
side is empty, but score 1 when both are (a silent excerpt transcribed as silence is right).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from musefm.atomic import write_text_atomic
from musefm.errors import BadInputError, MusefmError

METRICS = ("note", "note_offset", "note_offset_velocity", "frame")
METRIC_TITLES = {"note": "note (onset)", "note_offset": "note + offset",
                 "note_offset_velocity": "note + offset + velocity", "frame": "frame"}
MIDI_SUFFIXES = (".mid", ".midi")
NOTE_FILE_SUFFIXES = (*MIDI_SUFFIXES, ".csv")  # in order of preference when one stem has several


def _ratios(matched: int, reference_count: int, estimate_count: int) -> tuple[float, float, float]:
    """Precision, recall, F1 from counts, with the empty-input convention of this module."""
    if reference_count == 0 or estimate_count == 0:
        value = 1.0 if reference_count == estimate_count == 0 else 0.0
        return value, value, value
    precision, recall = matched / estimate_count, matched / reference_count
    f1 = 0.0 if matched == 0 else 2 * precision * recall / (precision + recall)
    return precision, recall, f1


def _scorable(notes) -> np.ndarray:
    """(N, 4) float64 notes that mir_eval accepts: it rejects zero-length notes (Magenta drops them too)."""
    notes = np.asarray(notes, dtype=np.float64).reshape(-1, 4)
    return notes[notes[:, 1] > notes[:, 0]]


def frame_roll(notes: np.ndarray, num_frames: int, frame_rate: float) -> np.ndarray:
    """Boolean (num_frames, 128) roll: cell (i, p) is on when a note of pitch p sounds at i / frame_rate."""
    notes = np.asarray(notes, dtype=np.float64).reshape(-1, 4)
    # Frame i is on for onset <= i / rate < offset; the epsilon keeps 0.5 s * 100 on frame 50.
    first = np.clip(np.ceil(notes[:, 0] * frame_rate - 1e-6).astype(np.int64), 0, num_frames)
    stop = np.clip(np.ceil(notes[:, 1] * frame_rate - 1e-6).astype(np.int64), 0, num_frames)
    pitches = np.clip(np.rint(notes[:, 2]).astype(np.int64), 0, 127)
    # (T+1, 128) +1 at a start, -1 at a stop; int16 keeps an hour at 100 frames/s near 50 MB.
    changes = np.zeros((num_frames + 1, 128), dtype=np.int16)
    np.add.at(changes, (first, pitches), 1)
    np.add.at(changes, (stop, pitches), -1)
    return np.cumsum(changes, axis=0, dtype=np.int16)[:-1] > 0


def score_notes(ref_notes: np.ndarray, est_notes: np.ndarray, onset_tolerance: float = 0.05, offset_ratio: float = 0.2,
                offset_min_tolerance: float = 0.05, frame_rate: float = 100.0) -> dict:
    """Precision, recall and F1 of ``est_notes`` against ``ref_notes`` (both (N, 4) notes arrays).

    Keys ``{metric}_{precision,recall,f1}`` for metric in "note" (onset within ``onset_tolerance``
    and pitch within 50 cents), "note_offset" (also offset within ``max(offset_ratio * duration,
    offset_min_tolerance)``), "note_offset_velocity" (also velocity, mir_eval's rescaled 0.1
    tolerance) and "frame"; plus the counts behind them (``ref_notes``, ``est_notes``,
    ``{metric}_matched``, ``ref_frames`` and ``est_frames`` = sounding pitch x frame cells) so
    scores can be pooled over files.
    """
    import mir_eval

    reference, estimate = _scorable(ref_notes), _scorable(est_notes)
    result: dict = {"ref_notes": len(reference), "est_notes": len(estimate)}
    note_settings = [("note", None), ("note_offset", offset_ratio), ("note_offset_velocity", offset_ratio)]
    for name, ratio in note_settings:
        matched = 0
        if len(reference) and len(estimate):
            arguments = dict(onset_tolerance=onset_tolerance, offset_ratio=ratio, offset_min_tolerance=offset_min_tolerance)
            ref_hz, est_hz = mir_eval.util.midi_to_hz(reference[:, 2]), mir_eval.util.midi_to_hz(estimate[:, 2])
            if name == "note_offset_velocity":
                precision = mir_eval.transcription_velocity.precision_recall_f1_overlap(
                    reference[:, :2], ref_hz, reference[:, 3], estimate[:, :2], est_hz, estimate[:, 3], **arguments)[0]
            else:
                precision = mir_eval.transcription.precision_recall_f1_overlap(
                    reference[:, :2], ref_hz, estimate[:, :2], est_hz, **arguments)[0]
            matched = int(round(precision * len(estimate)))
        result[f"{name}_matched"] = matched
        result.update(zip((f"{name}_precision", f"{name}_recall", f"{name}_f1"),
                          _ratios(matched, len(reference), len(estimate))))

    end = max(reference[:, 1].max(initial=0.0), estimate[:, 1].max(initial=0.0))
    num_frames = int(np.ceil(end * frame_rate)) + 1
    ref_roll, est_roll = frame_roll(reference, num_frames, frame_rate), frame_roll(estimate, num_frames, frame_rate)
    matched = int(np.count_nonzero(ref_roll & est_roll))
    result.update(ref_frames=int(ref_roll.sum()), est_frames=int(est_roll.sum()), frame_matched=matched)
    result.update(zip(("frame_precision", "frame_recall", "frame_f1"),
                      _ratios(matched, result["ref_frames"], result["est_frames"])))
    return result


def note_errors(ref_notes: np.ndarray, est_notes: np.ndarray, onset_tolerance: float = 0.05) -> dict[str, list]:
    """Where the errors of note F1 lie: ``{"missed": [(class, key), ...], "false": [(class, key), ...]}``
    with one entry per missed reference note and per false positive (MIDI key), matched as note F1 is
    (mir_eval, onset within ``onset_tolerance``, offsets ignored). Classes, first that applies:

    - missed "doubled unison": another reference note starts on its key within the tolerance (two
      written voices on one key sound as one: no transcriber can split them);
    - "on a partial": a reference note sounding at its onset (or starting within the tolerance) has
      a 2nd..6th partial on its key (``labels.HARMONIC_INTERVALS`` semitones above it);
    - false positive "same key": a reference note on its key sounds then (a held note split or re-struck);
    - "other".
    """
    import mir_eval

    from musefm.transcription.labels import HARMONIC_INTERVALS

    reference, estimate = _scorable(ref_notes), _scorable(est_notes)
    pairs = mir_eval.transcription.match_notes(
        reference[:, :2], mir_eval.util.midi_to_hz(reference[:, 2]), estimate[:, :2],
        mir_eval.util.midi_to_hz(estimate[:, 2]), onset_tolerance=onset_tolerance,
        offset_ratio=None) if len(reference) and len(estimate) else []

    def intervals_above_sounding(key: float, time: float, exclude: int = -1) -> np.ndarray:
        sounding = (reference[:, 0] <= time + onset_tolerance) & (reference[:, 1] > time)
        if exclude >= 0:
            sounding[exclude] = False
        return np.rint(key - reference[sounding, 2])

    missed = []
    for i in sorted(set(range(len(reference))) - {i for i, _ in pairs}):
        onset, key = reference[i, 0], reference[i, 2]
        unisons = np.count_nonzero((reference[:, 2] == key) & (np.abs(reference[:, 0] - onset) <= onset_tolerance))
        partial = np.isin(intervals_above_sounding(key, onset, exclude=i), HARMONIC_INTERVALS).any()
        missed.append(("doubled unison" if unisons > 1 else "on a partial" if partial else "other", int(key)))
    false = []
    for j in sorted(set(range(len(estimate))) - {j for _, j in pairs}):
        intervals = intervals_above_sounding(estimate[j, 2], estimate[j, 0])
        kind = ("on a partial" if np.isin(intervals, HARMONIC_INTERVALS).any() else
                "same key" if (intervals == 0).any() else "other")
        false.append((kind, int(estimate[j, 2])))
    return {"missed": missed, "false": false}


def load_notes(path: Path, apply_sustain: bool = True) -> np.ndarray:
    """Notes (N, 4) from a MIDI file or a notes CSV (``write_notes_csv``); ``BadInputError`` if unreadable."""
    from musefm.transcription.labels import notes_from_midi
    from musefm.transcription.postprocess import read_notes_csv

    path = Path(path)
    if path.suffix.lower() == ".csv":
        return read_notes_csv(path)
    return notes_from_midi(path, apply_sustain=apply_sustain)


# --------------------------------------------------------------------------------------------
# Folders -> report
# --------------------------------------------------------------------------------------------


@dataclass
class TranscriptionReport:
    """Per-file scores of a folder of transcriptions against a folder of references, pooled two ways:
    ``mean`` (average of per-file scores, as the Onsets and Frames / MAESTRO papers report) and
    ``micro`` (from counts summed over files, so long pieces weigh more)."""

    pred_dir: str
    ref_dir: str
    settings: dict
    files: list[dict] = field(default_factory=list)  # {"name", "pred", "ref", **score_notes(...)}
    unmatched_pred: list[str] = field(default_factory=list)
    unmatched_ref: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # {"path", "reason"}
    pictures: list[str] = field(default_factory=list)  # PNG names, filled in by write()
    # name -> (reference, estimate) notes kept for piano-roll pictures; not serialised
    picture_notes: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def mean(self) -> dict:
        keys = [f"{metric}_{part}" for metric in METRICS for part in ("precision", "recall", "f1")]
        return {key: (float(np.mean([scores[key] for scores in self.files])) if self.files else None) for key in keys}

    @property
    def micro(self) -> dict:
        result = {}
        for metric in METRICS:
            count = "frames" if metric == "frame" else "notes"
            totals = [sum(scores[key] for scores in self.files)
                      for key in (f"{metric}_matched", f"ref_{count}", f"est_{count}")]
            ratios = _ratios(*totals) if self.files else (None, None, None)
            result.update(zip((f"{metric}_precision", f"{metric}_recall", f"{metric}_f1"), ratios))
        return result

    def to_dict(self) -> dict:
        return {"pred_dir": self.pred_dir, "ref_dir": self.ref_dir, "settings": self.settings,
                "files_scored": len(self.files), "mean": self.mean, "micro": self.micro, "files": self.files,
                "unmatched_pred": self.unmatched_pred, "unmatched_ref": self.unmatched_ref,
                "rejected": self.rejected, "pictures": self.pictures}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def summary_line(self) -> str:
        if not self.files:
            text = "no file could be scored"
        else:
            mean = self.mean
            text = (f"{len(self.files)} file{'s' if len(self.files) != 1 else ''}, mean F1: " +
                    ", ".join(f"{METRIC_TITLES[metric]} {_fixed(mean[f'{metric}_f1'])}" for metric in METRICS))
        unmatched = len(self.unmatched_pred) + len(self.unmatched_ref)
        return text + f"; {unmatched} unmatched, {len(self.rejected)} rejected"

    def to_markdown(self) -> str:
        mean, micro = self.mean, self.micro
        parts = ["# Transcription report\n", f"**Summary:** {self.summary_line()}\n",
                 f"Transcriptions `{self.pred_dir}` scored against references `{self.ref_dir}`.\n",
                 "## Overall\n",
                 "Mean over files (as the Onsets and Frames / MAESTRO papers report); micro F1 pools the "
                 "counts of all files. " + self.settings.get("frame_metric", "") + "\n",
                 _markdown_table(["metric", "precision", "recall", "F1", "micro F1"],
                                 [[METRIC_TITLES[m], _fixed(mean[f"{m}_precision"]), _fixed(mean[f"{m}_recall"]),
                                   _fixed(mean[f"{m}_f1"]), _fixed(micro[f"{m}_f1"])] for m in METRICS])]
        if self.files:
            parts += ["## Files\n", _markdown_table(
                ["file", "ref notes", "est notes", *(f"{METRIC_TITLES[m]} F1" for m in METRICS)],
                [[scores["name"], str(scores["ref_notes"]), str(scores["est_notes"]),
                  *(_fixed(scores[f"{m}_f1"]) for m in METRICS)] for scores in self.files])]
        if self.unmatched_pred or self.unmatched_ref:
            rows = [[name, "transcriptions only"] for name in self.unmatched_pred]
            rows += [[name, "references only"] for name in self.unmatched_ref]
            parts += [f"## Unmatched files ({len(rows)})\n", _markdown_table(["file", "found in"], rows)]
        if self.rejected:
            parts += [f"## Rejected files ({len(self.rejected)})\n",
                      _markdown_table(["file", "reason"], [[item["path"], item["reason"]] for item in self.rejected])]
        if self.pictures:
            parts.append("## Piano rolls\n")
            parts += [f"![{name}]({name})\n" for name in self.pictures]
        parts += ["## Settings\n", _markdown_table(["setting", "value"],
                                                   [[key, str(value)] for key, value in self.settings.items()])]
        return "\n".join(parts)

    def write(self, out_dir: Path) -> Path:
        """Write piano rolls of the kept files, then report.json, report.md (and rejected.jsonl when
        files were rejected) into ``out_dir``, each file atomically."""
        from musefm.viz.pianoroll import plot_notes

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.pictures = []
        for name, (reference, estimate) in self.picture_notes.items():
            picture = f"pianoroll_{_safe_name(name)}.png"
            plot_notes(estimate, out_dir / picture, reference=reference, title=name, max_seconds=30.0)
            self.pictures.append(picture)
        write_text_atomic(out_dir / "report.json", self.to_json())
        write_text_atomic(out_dir / "report.md", self.to_markdown())
        if self.rejected:
            write_text_atomic(out_dir / "rejected.jsonl", "".join(json.dumps(item) + "\n" for item in self.rejected))
        return out_dir


def evaluate_transcription_dirs(pred_dir: Path, ref_dir: Path, onset_tolerance: float = 0.05, offset_ratio: float = 0.2,
                                offset_min_tolerance: float = 0.05, frame_rate: float = 100.0, apply_sustain: bool = True,
                                max_pictures: int = 4) -> TranscriptionReport:
    """Score every transcription in ``pred_dir`` against the reference with the same file stem in
    ``ref_dir`` (both searched recursively for .mid/.midi/.csv; MIDI is preferred when a stem has
    both). Files found on one side only are listed as unmatched; an unreadable file is listed as
    rejected with its reason and the others are still scored. ``apply_sustain`` extends MIDI notes
    through sustain pedals on both sides (MAESTRO references are scored that way). The first
    ``max_pictures`` files keep their notes for piano rolls drawn by ``TranscriptionReport.write``.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    for folder in (pred_dir, ref_dir):
        if not folder.is_dir():
            raise MusefmError(f"{folder}: not a directory")
    settings = {"onset_tolerance": onset_tolerance, "offset_ratio": offset_ratio,
                "offset_min_tolerance": offset_min_tolerance, "frame_rate": frame_rate, "apply_sustain": apply_sustain,
                "frame_metric": f"Frame scores count pitch x frame cells of piano rolls sampled at {frame_rate:g} "
                                "frames/s (Onsets and Frames; equal to mir_eval.multipitch on such rolls).",
                "empty_convention": "mir_eval's: 0 when only one side has notes; 1 when neither has."}
    report = TranscriptionReport(pred_dir=str(pred_dir), ref_dir=str(ref_dir), settings=settings)
    ambiguous: set[str] = set()
    predictions = _note_files(pred_dir, report.rejected, ambiguous)
    references = _note_files(ref_dir, report.rejected, ambiguous)
    report.unmatched_pred = sorted(str(predictions[stem]) for stem in predictions.keys() - references.keys() - ambiguous)
    report.unmatched_ref = sorted(str(references[stem]) for stem in references.keys() - predictions.keys() - ambiguous)
    for stem in sorted(predictions.keys() & references.keys()):
        try:
            estimate = load_notes(predictions[stem], apply_sustain=apply_sustain)
            reference = load_notes(references[stem], apply_sustain=apply_sustain)
        except BadInputError as error:
            report.rejected.append({"path": error.path, "reason": error.reason})
            continue
        scores = score_notes(reference, estimate, onset_tolerance=onset_tolerance, offset_ratio=offset_ratio,
                             offset_min_tolerance=offset_min_tolerance, frame_rate=frame_rate)
        report.files.append({"name": stem, "pred": str(predictions[stem]), "ref": str(references[stem]), **scores})
        if len(report.picture_notes) < max_pictures:
            report.picture_notes[stem] = (reference, estimate)
    return report


def _note_files(folder: Path, rejected: list[dict], ambiguous: set[str]) -> dict[str, Path]:
    """stem -> the one note file for it under ``folder``; a stem found twice (e.g. in two subfolders)
    is rejected and added to ``ambiguous``."""
    candidates: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in NOTE_FILE_SUFFIXES and path.is_file() and not path.name.startswith("."):
            candidates.setdefault(path.stem, []).append(path)
    chosen = {}
    for stem, paths in candidates.items():
        best = min(NOTE_FILE_SUFFIXES.index(path.suffix.lower()) for path in paths)
        # .mid and .midi are the same format: a stem with both is as ambiguous as two folders.
        preferred = [path for path in paths if path.suffix.lower() in
                     (MIDI_SUFFIXES if best < len(MIDI_SUFFIXES) else (".csv",))]
        if len(preferred) > 1:
            rejected.append({"path": str(preferred[0]),
                             "reason": "ambiguous: several files with this name: " + ", ".join(map(str, preferred))})
            ambiguous.add(stem)
        else:
            chosen[stem] = preferred[0]
    return chosen


def _fixed(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _safe_name(name: str) -> str:
    return "".join(character if character.isalnum() or character in "-_." else "_" for character in name)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(row) for row in rows)]) + "\n"
