"""``musefm demo``: the main job on the bundled corpus, start to finish.

1. Build the Bach-chorale + O'Neill's-tunes dataset from the music21 corpus (REMI) and its card.
2. Pretrain a small MusicLM on it for a bounded time (a finished demo run is reused on re-runs).
3. Continue the first bars of a held-out chorale by sampling, write MIDI, a WAV rendered with a
   soundfont, a piano roll (prompt and continuation told apart) and the loss curve.
4. Write ``report.md`` with the pictures and numbers, and print where it is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from musefm.data.augment import AugmentConfig
from musefm.data.build import BuildConfig, build_dataset
from musefm.errors import MusefmError
from musefm.training.trainer import TrainConfig

PROMPT_BARS = 4


def demo_sources(quick: bool) -> tuple[list[str], int]:
    """Bach chorales and O'Neill's 1850 Irish tunes; quick mode reads 12 chorales and 50 tunes."""
    if quick:
        return ["music21:bach", "music21:oneills1850/0001-0050"], 12
    return ["music21:bach", "music21:oneills1850"], 0


def demo_pretrain_config(data_dir: Path, run_dir: Path, quick: bool):
    from musefm.recipes.pretrain import PretrainConfig

    if quick:
        train = TrainConfig(max_steps=12, batch_size=4, lr=1e-3, warmup_steps=3, eval_every=6, eval_batches=2,
                            save_every=6, log_every=3)
        return PretrainConfig(model="music-lm", preset="debug", data=str(data_dir), out=str(run_dir), seq_len=64,
                              window="bar", augment=AugmentConfig(transpose=6), train=train)
    # About 3 minutes on a 2-core CPU (bf16 autocast, ~7,800 tokens/s); the time limit is a safety net
    # on slower machines, the step count lets the cosine schedule finish.
    train = TrainConfig(max_steps=400, max_minutes=7.0, batch_size=16, lr=1e-3, warmup_steps=40, eval_every=100,
                        eval_batches=8, save_every=100, log_every=10)
    return PretrainConfig(model="music-lm", preset="small", data=str(data_dir), out=str(run_dir), seq_len=256,
                          window="bar", augment=AugmentConfig(transpose=6, tempo=0.1, velocity=0.2), train=train)


def _train_or_reuse(config, stream) -> dict:
    """Train the demo model, or reuse the one a previous demo run finished with the same settings."""
    from musefm.config import to_dict
    from musefm.recipes.pretrain import main as pretrain

    run_dir = Path(config.out)
    run_file = run_dir / "run.json"
    if run_file.exists() and (run_dir / "best" / "config.json").exists():
        if json.loads(run_file.read_text())["config"] == to_dict(config):
            print(f"reusing the model trained by an earlier demo run in {run_dir}", file=stream)
            return {"reused": True}
    return pretrain(config, overwrite=True, stream=stream)


def _prompt_of(ids: np.ndarray, bar_ids: np.ndarray, bars: int) -> np.ndarray:
    """[BOS] + the tokens of the first ``bars`` bars of a piece."""
    bar_positions = np.flatnonzero(np.isin(ids, bar_ids))
    end = bar_positions[bars] if len(bar_positions) > bars else len(ids) // 2
    return np.concatenate([[1], ids[:end]]).astype(np.int64)


def _transcribe_back(continuation, out: Path) -> str:
    """Render the continuation on the piano, transcribe it with the shipped model, score it (mir_eval)."""
    from musefm.audio.render import render_score
    from musefm.data.audio_build import piano_performance
    from musefm.evaluation.transcription import score_notes
    from musefm.transcription.labels import notes_from_score
    from musefm.transcription.postprocess import write_midi
    from musefm.transcription.transcribe import load_transcriber, transcribe_file
    from musefm.viz.pianoroll import plot_notes

    # Fixed dynamics: the score's own velocities, one piano track.
    piano = piano_performance(continuation, np.random.default_rng(0), (80, 80), 0.0, piano=True)
    try:
        wav = render_score(piano, out / "continuation.piano.wav", "timgm6mb", 16000)
    except MusefmError as error:
        return f"No audio to transcribe: {error}."
    result = transcribe_file(load_transcriber(), wav)
    reference = notes_from_score(piano)
    scores = score_notes(reference, result.notes)
    write_midi(result.notes, out / "continuation.transcribed.mid")
    roll = plot_notes(result.notes, out / "continuation.transcribed.png", reference=reference,
                      title="transcribed (blue) over the generated notes (outlines)")
    return (f"The continuation played on the piano ([{wav.name}]({wav.name})) and transcribed back by the "
            f"shipped model in {result.seconds_taken:.1f} s: {len(result.notes)} notes, note F1 {scores['note_f1']:.3f}, "
            f"with offsets {scores['note_offset_f1']:.3f} (mir_eval).\n\n![transcription]({roll.name})")


def run_demo(out: Path, quick: bool = False, stream=None) -> Path:
    from musefm.audio.render import render_midi
    from musefm.data.dataset import open_dataset
    from musefm.data.tokenize import bar_token_ids, decode
    from musefm.generation.continuation import music_ids
    from musefm.generation.constraints import GrammarConstraint
    from musefm.generation.sampling import sample
    from musefm.models.base import load_pretrained
    from musefm.training.checkpoint import resolve_model_dir
    from musefm.training.logging import plot_loss_curve, read_metrics
    from musefm.viz.pianoroll import plot_pianoroll

    stream = stream or sys.stderr
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. data
    data_dir = out / "data"
    sources, limit = demo_sources(quick)
    summary = build_dataset(BuildConfig(sources=sources, out=str(data_dir), tokenizer="remi", limit=limit), stream=stream)
    print(summary.line(), file=stream)
    dataset = open_dataset(data_dir)

    # 2. pretraining
    config = demo_pretrain_config(data_dir, out / "lm", quick)
    _train_or_reuse(config, stream)
    model, _ = load_pretrained(resolve_model_dir(out / "lm"))
    run = json.loads((out / "lm" / "run.json").read_text())
    metrics = read_metrics(out / "lm")
    valid = [row for row in metrics if row["split"] == "valid"]
    train = [row for row in metrics if row["split"] == "train"]
    loss_curve = plot_loss_curve(out / "lm", out / "loss_curve.png")

    # 3. a continuation of a held-out chorale
    held_out = dataset.rows("test") + dataset.rows("valid")
    candidates = [r for r in held_out if r["collection"] == "bach"] or held_out
    # A tiny (--quick) dataset may hold out no chorale: then a training piece is used, and said so.
    row = candidates[0] if candidates else dataset.rows("train")[0]
    status = "held-out" if candidates else "training"
    tokenizer = dataset.tokenizer
    ids = np.asarray(dataset.piece_ids(row), dtype=np.int64)
    prompt = _prompt_of(ids, bar_token_ids(tokenizer), PROMPT_BARS)
    # Grammar-constrained: every sampled token can follow the previous ones, so the music decodes.
    constraint = GrammarConstraint(tokenizer, max_notes_per_onset=8)  # chorales and tunes: few voices
    new_tokens, log_probs = sample(model, torch.from_numpy(prompt), max_new_tokens=64 if quick else 512,
                                   temperature=1.0, top_k=0, top_p=0.95, seed=0, constraint=constraint)
    body = np.concatenate([prompt[1:], new_tokens.numpy()])
    body = music_ids(tokenizer, body)  # special tokens carry no music
    continuation = decode(tokenizer, body)
    prompt_score = decode(tokenizer, prompt[1:])
    prompt_end = prompt_score.end() / prompt_score.ticks_per_quarter
    midi_path = out / "continuation.mid"
    continuation.dump_midi(str(midi_path))
    roll = plot_pianoroll(continuation, out / "continuation.png", highlight_from_quarter=prompt_end,
                          title=f"{status} {row['id']}: {PROMPT_BARS} bars of prompt, then MusicLM")
    try:
        wav = render_midi(midi_path, out / "continuation.wav")
        audio_line = f"Listen: [continuation.wav]({wav.name}) (rendered with FluidSynth)."
    except MusefmError as error:
        audio_line = f"No audio: {error}."

    # 4. the audio loop: the continuation played on the piano, transcribed back by the shipped model
    transcription_line = _transcribe_back(continuation, out)

    # 5. report
    last_valid = valid[-1] if valid else {}
    tokens_per_s = np.mean([r["tokens_per_s"] for r in train if "tokens_per_s" in r]) if train else float("nan")
    report = out / "report.md"
    report.write_text("\n".join([
        "# musefm demo",
        "",
        "## Data",
        f"`{data_dir}`: {summary.pieces:,} pieces ({', '.join(f'{k} {v}' for k, v in summary.splits.items())}), "
        f"{summary.tokens:,} REMI tokens, {summary.rejected} rejected. Dataset card: [card.md](data/card.md).",
        "",
        "![collections](data/card/collections.png)",
        "",
        "## Pretraining",
        f"MusicLM `{config.preset}` ({run['parameters']:,} parameters, context {config.seq_len}), "
        f"{train[-1]['step'] if train else 0} steps, about {tokens_per_s:,.0f} training tokens/s on this machine. "
        + (f"Validation loss {last_valid['loss']:.3f} nats/token, perplexity {last_valid['perplexity']:.2f}, "
           f"next-token accuracy {last_valid['accuracy']:.3f}." if last_valid else ""),
        "",
        f"![loss curve]({loss_curve.name})" if loss_curve else "",
        "",
        "## A continuation",
        f"The first {PROMPT_BARS} bars of the {status} piece `{row['id']}` ({row.get('key')}), continued by "
        f"grammar-constrained sampling (top-p 0.95): {len(new_tokens)} new tokens, mean log-probability "
        f"{float(log_probs.mean()) if len(log_probs) else float('nan'):.2f}, "
        f"{continuation.note_num()} notes in all. MIDI: [continuation.mid]({midi_path.name}). {audio_line}",
        "",
        f"![continuation]({roll.name})",
        "",
        "## Back from audio",
        transcription_line,
        "",
    ]))
    print(f"demo written to {report}")
    return report
