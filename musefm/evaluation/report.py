"""Markdown and HTML renderings of an evaluation's results (``musefm.recipes.evaluate``).

Pure formatting: every function takes the results dict as written to ``results.json`` (missing
values are None) and returns text; nothing here computes a metric or reads a file.
"""

from __future__ import annotations

import html

SETTING_NAMES = ("generated", "reference", "train", "limit", "ngram_length", "generated_spec", "reference_spec")


def format_number(value, digits: int = 3) -> str:
    """A value for a table: "–" for a missing one (None or NaN), integers as such, else 3 significant digits."""
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _mean_std(mean, std) -> str:
    if mean is None:
        return "–"
    return f"{format_number(mean)} ± {format_number(std)}"


def summary_line(results: dict) -> str:
    """One line: mean OA, the metrics that differ most, and how many pieces look copied."""
    summary = results["summary"]
    if summary["mean_oa"] is None:
        text = "no metric could be compared (too few pieces with notes)"
    else:
        least = ", ".join(f"{name} (OA {format_number(results['metrics'][name]['oa'])})"
                          for name in summary["most_different"])
        text = f"mean OA {format_number(summary['mean_oa'])} over {summary['metrics_compared']} metrics; differ most: {least}"
    memorization = results.get("memorization")
    if memorization is not None:
        text += f"; {len(memorization['flagged'])} of {len(memorization['pieces'])} generated pieces flagged as copied"
    grammar = results.get("grammar")
    if grammar is not None:
        text += f"; token grammar error rate {format_number(grammar['error_rate'])}"
    return text


def _grammar_note(grammar: dict) -> str:
    return (f"{grammar['samples']} samples written by `musefm generate`: {grammar['errors']} grammar errors in "
            f"{grammar['tokens']:,} generated tokens (rate {format_number(grammar['error_rate'])}, MidiTok's check); "
            f"{grammar['samples_with_errors']} samples have any.")


def _metric_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    header = ["metric", "generated mean ± std", "reference mean ± std", "OA", "KL", "pieces (gen/ref)"]
    rows = []
    for name, values in results["metrics"].items():
        rows.append([
            name,
            _mean_std(values["generated_mean"], values["generated_std"]),
            _mean_std(values["reference_mean"], values["reference_std"]),
            format_number(values["oa"]),
            format_number(values["kl"]),
            f"{values['generated_count']}/{values['reference_count']}",
        ])
    return header, rows


def _set_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    header = ["set", "source", "pieces", "rejected"]
    rows = [[name, info["spec"], str(info["pieces"]), str(info["rejected"])] for name, info in results["sets"].items()]
    return header, rows


def _rejection_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    rows = [[rejection["set"], rejection["path"], rejection["reason"]]
            for info in results["sets"].values() for rejection in info["rejections"]]
    return ["set", "file", "reason"], rows


def _memorization_rows(memorization: dict) -> tuple[list[str], list[list[str]]]:
    header = ["generated piece", "longest copied run (notes)", "copied n-gram share", "source piece", "flagged"]
    rows = [[piece["id"], str(piece["longest_copied_notes"]), format_number(piece["copied_ngram_share"]),
             piece["source_id"] or "–", "**yes**" if piece["flagged"] else "no"] for piece in memorization["pieces"]]
    return header, rows


def _settings_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    settings = results["settings"]
    return ["setting", "value"], [[name, format_number(settings.get(name))] for name in SETTING_NAMES]


def _memorization_note(memorization: dict) -> str:
    if memorization["reused"]:
        origin = f"index reused from `{memorization['index']}`"
    elif memorization["saved"]:
        origin = f"index built and saved to `{memorization['index']}`"
    else:
        origin = (f"index built but not saved to `{memorization['index']}` (the folder is not writable or "
                  "some training pieces did not decode)")
    note = (f"Training split of `{memorization['dataset']}`: {memorization['training_pieces']} pieces, "
            f"melody {memorization['ngram_length']}-grams; {origin}")
    if memorization["undecodable"]:
        note += f"; {memorization['undecodable']} training pieces could not be decoded and were left out"
    flagged = ", ".join(memorization["flagged"]) or "none"
    return (note + f". A piece is flagged when its copied n-gram share is at least "
            f"{format_number(memorization['copied_share_threshold'])} or its longest copied run at least "
            f"{memorization['copied_notes_threshold']} notes. Flagged: {flagged}.")


def _document(results: dict) -> list[tuple]:
    """The report as a list of blocks, rendered alike as Markdown and HTML: ("heading", level,
    text), ("summary", text), ("paragraph", text), ("table", header, rows), ("image", src, alt)."""
    blocks: list[tuple] = [("heading", 1, "Evaluation report"), ("summary", summary_line(results)),
                           ("heading", 2, "Sets"), ("table", *_set_rows(results))]
    header, rejections = _rejection_rows(results)
    if rejections:
        blocks += [("heading", 3, f"Skipped files ({len(rejections)})"), ("table", header, rejections)]
    blocks += [("heading", 2, "Metrics"),
               ("paragraph", "OA: overlapped area of the reference's intra-set distances and the generated-to-reference "
                             "distances (1: as alike as the reference pieces are to each other). KL in nats. "
                             "Means ± standard deviations over the pieces where a metric is defined."),
               ("table", *_metric_rows(results))]
    overview = results["pictures"].get("overview")
    if overview:
        blocks.append(("image", overview, "OA per metric"))
    blocks.append(("heading", 3, "Distributions"))
    blocks += [("image", values["histogram"], name) for name, values in results["metrics"].items() if values["histogram"]]
    blocks.append(("heading", 2, "Memorization"))
    memorization = results.get("memorization")
    if memorization is None:
        blocks.append(("paragraph", "Not checked (no training dataset given)."))
    else:
        blocks += [("paragraph", _memorization_note(memorization)), ("table", *_memorization_rows(memorization))]
    grammar = results.get("grammar")
    if grammar is not None:
        blocks += [("heading", 2, "Token grammar"), ("paragraph", _grammar_note(grammar))]
    blocks += [("heading", 2, "Settings"), ("table", *_settings_rows(results))]
    return blocks


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(row) for row in rows)]) + "\n"


def render_markdown(results: dict) -> str:
    parts = []
    for kind, *content in _document(results):
        if kind == "heading":
            parts.append("#" * content[0] + f" {content[1]}\n")
        elif kind == "summary":
            parts.append(f"**Summary:** {content[0]}\n")
        elif kind == "paragraph":
            parts.append(content[0] + "\n")
        elif kind == "table":
            parts.append(_markdown_table(*content))
        else:
            parts.append(f"![{content[1]}]({content[0]})\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#282828}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f2f2f2}img{max-width:100%;display:block;margin:.5em 0}.flag{color:#a03;font-weight:bold}"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            if cell == "**yes**":  # a flagged piece, bold in Markdown
                cells.append('<td class="flag">yes</td>')
            else:
                cells.append(f"<td>{html.escape(str(cell))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def render_html(results: dict) -> str:
    escape = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Evaluation report</title>"
             f"<style>{_STYLE}</style></head><body>"]
    for kind, *content in _document(results):
        if kind == "heading":
            parts.append(f"<h{content[0]}>{escape(content[1])}</h{content[0]}>")
        elif kind == "summary":
            parts.append(f"<p><b>Summary:</b> {escape(content[0])}</p>")
        elif kind == "paragraph":
            parts.append(f"<p>{escape(content[0])}</p>")
        elif kind == "table":
            parts.append(_html_table(*content))
        else:
            parts.append(f"<img src='{escape(content[0])}' alt='{escape(content[1])}'>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
