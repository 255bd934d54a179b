"""``musefm demo``: the main job on the bundled corpus.

Builds the Bach-chorale + folk-tune dataset from the music21 corpus and writes its card and a
piano roll of a held-out chorale. (Pretraining and generation join this job as they land.)
"""

from __future__ import annotations

import sys
from pathlib import Path

from musefm.data.build import BuildConfig, build_dataset


def demo_sources(quick: bool) -> tuple[list[str], int]:
    """Bach chorales and O'Neill's 1850 Irish tunes; quick mode reads 12 chorales and 50 tunes."""
    if quick:
        return ["music21:bach", "music21:oneills1850/0001-0050"], 12
    return ["music21:bach", "music21:oneills1850"], 0


def run_demo(out: Path, quick: bool = False, stream=None) -> Path:
    from musefm.data.dataset import open_dataset
    from musefm.data.tokenize import decode
    from musefm.viz.pianoroll import plot_pianoroll

    stream = stream or sys.stderr
    sources, limit = demo_sources(quick)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    summary = build_dataset(BuildConfig(sources=sources, out=str(data_dir), tokenizer="remi", limit=limit), stream=stream)
    print(summary.line())

    dataset = open_dataset(data_dir)
    held_out = [row for row in dataset.rows("test") + dataset.rows("valid") if row["collection"] == "bach"]
    row = held_out[0] if held_out else dataset.rows()[0]
    roll = plot_pianoroll(decode(dataset.tokenizer, dataset.piece_ids(row)), out / "heldout_pianoroll.png",
                          title=f"held-out {row['id']} ({row.get('key')})")
    report = out / "report.md"
    report.write_text(
        "# musefm demo\n\n"
        f"Dataset: `{data_dir}` ({summary.pieces} pieces, {summary.tokens:,} REMI tokens, "
        f"{summary.rejected} rejected). Its card: [card.md](data/card.md).\n\n"
        f"![collections](data/card/collections.png)\n\n![keys and meters](data/card/keys_meters.png)\n\n"
        f"A held-out chorale, `{row['id']}`, decoded from its tokens:\n\n![held-out piece]({roll.name})\n"
    )
    print(f"demo written to {report}")
    return report
