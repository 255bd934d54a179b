"""Dataset build speed and memory: musefm vs a plain single-process MidiTok loop.

The peer is what people write by hand: for each MIDI file, ``symusic.Score(path)`` then
``tokenizer.encode(score)`` with the same REMI tokenizer. musefm's build does that and more
(validation, metadata, stats, shards, splits, card) on all cores.

- cold: a fresh output directory; warm: the same build run again (it finds its work done).
- memory: peak RSS of the whole build (main process + workers) for N and 4N pieces; it should stay
  flat because pieces stream through shards instead of accumulating.

Run: ``python benchmarks/bench_data.py [--quick] [--files 500]``. Last line: ``RESULT ...``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path



def make_midi_files(folder: Path, count: int) -> list[Path]:
    """Real music as MIDI: Bach chorales and O'Neill's tunes from the music21 corpus, then
    transposed copies (distinct files, same character) until ``count`` files exist."""
    from musefm.data.corpus import iter_pieces

    folder.mkdir(parents=True, exist_ok=True)
    base = []
    for spec in ("music21:bach", "music21:oneills1850"):
        for piece in iter_pieces(spec):
            base.append(piece.score)
            if len(base) >= min(count, 600):
                break
        if len(base) >= min(count, 600):
            break
    paths = []
    for index in range(count):
        score = base[index % len(base)]
        shift = (index // len(base)) * 2  # 0, +2, +4 ... for the copies beyond the corpus
        if shift:
            score = score.shift_pitch(shift)
        path = folder / f"piece{index:05d}.mid"
        score.dump_midi(str(path))
        paths.append(path)
    return paths


def plain_miditok_loop(paths: list[Path]) -> tuple[float, int]:
    from miditok import REMI, TokenizerConfig
    from symusic import Score

    from musefm.data.tokenize import DEFAULT_SETTINGS

    tokenizer = REMI(TokenizerConfig(**DEFAULT_SETTINGS))
    start, tokens = time.perf_counter(), 0
    for path in paths:
        sequence = tokenizer.encode(Score(str(path)))
        tokens += len(sequence.ids)
    return time.perf_counter() - start, tokens


def musefm_build(folder: Path, out: Path) -> tuple[float, int]:
    from musefm.data.build import BuildConfig, build_dataset

    start = time.perf_counter()
    summary = build_dataset(BuildConfig(sources=[f"dir:{folder}"], out=str(out)), stream=open("/dev/null", "w"))
    return time.perf_counter() - start, summary.tokens


def peak_rss_mb(command: list[str]) -> float:
    """Peak resident memory of a command and all its children, sampled every 20 ms."""
    import psutil

    process = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while process.poll() is None:
        try:
            tree = [process] + process.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with {process.returncode}")
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 files, one repeat")
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    files = 200 if args.quick else args.files
    repeats = 1 if args.quick else args.repeats

    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        print(f"making {files} and {4 * files} MIDI files ...", flush=True)
        paths = make_midi_files(work / "midi", files)
        make_midi_files(work / "midi4x", 4 * files)

        peer_times, cold_times, warm_times = [], [], []
        for repeat in range(repeats):
            seconds, peer_tokens = plain_miditok_loop(paths)
            peer_times.append(seconds)
            out = work / f"ds{repeat}"
            seconds, tokens = musefm_build(work / "midi", out)
            cold_times.append(seconds)
            warm_times.append(musefm_build(work / "midi", out)[0])
        peer, cold, warm = min(peer_times), min(cold_times), min(warm_times)
        print(f"peer (plain MidiTok loop): {files / peer:8.1f} pieces/s {peer_tokens / peer:10.0f} tokens/s")
        print(f"musefm build, cold:        {files / cold:8.1f} pieces/s {tokens / cold:10.0f} tokens/s  ({peer / cold:.2f}x)")
        print(f"musefm build, warm:        {files / warm:8.1f} pieces/s  ({peer / warm:.1f}x)")

        command = [sys.executable, "-m", "musefm", "data", "build", "--source"]
        memory_n = peak_rss_mb(command + [f"dir:{work / 'midi'}", "--out", str(work / "mem1")])
        memory_4n = peak_rss_mb(command + [f"dir:{work / 'midi4x'}", "--out", str(work / "mem4")])
        print(f"peak RSS (all processes): {files} pieces {memory_n:.0f} MB, {4 * files} pieces {memory_4n:.0f} MB "
              f"(x{memory_4n / memory_n:.2f})")
        print(
            f"RESULT files={files} peer_pieces_per_s={files / peer:.1f} cold_pieces_per_s={files / cold:.1f} "
            f"cold_tokens_per_s={tokens / cold:.0f} ratio_cold={peer / cold:.2f} ratio_warm={peer / warm:.1f} "
            f"peak_mb_{files}={memory_n:.0f} peak_mb_{4 * files}={memory_4n:.0f} memory_growth={memory_4n / memory_n:.2f}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
