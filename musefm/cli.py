"""The ``musefm`` command: thin dispatch, one subcommand = one function of a module below.

Errors a user can fix (``MusefmError``) are printed as one line and exit with status 2; with
``--debug`` the traceback is shown too.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from musefm import __version__
from musefm.errors import MusefmError


def _data_build(args) -> int:
    if args.render:
        return _data_build_audio(args)
    from musefm.config import apply_overrides, from_dict, load_yaml
    from musefm.data.build import BuildConfig, build_dataset

    given = {
        "sources": args.source, "out": args.out, "tokenizer": args.tokenizer, "bpe_vocab_size": args.bpe_vocab,
        "limit": args.limit, "workers": args.workers, "valid_fraction": args.valid_fraction,
        "test_fraction": args.test_fraction, "cache_dir": args.cache_dir,
    }
    given = {key: value for key, value in given.items() if value is not None}
    config = load_yaml(BuildConfig, args.config) if args.config else BuildConfig()
    config = from_dict(BuildConfig, {**vars(config), **given})
    config = apply_overrides(config, args.overrides)
    summary = build_dataset(config, overwrite=args.overwrite)
    print(summary.line())
    print(f"card: {Path(config.out) / 'card.md'}")
    return 0


def _data_build_audio(args) -> int:
    from musefm.config import apply_overrides, from_dict, load_yaml
    from musefm.data.audio_build import AudioBuildConfig, build_audio_dataset

    if args.tokenizer or args.bpe_vocab:
        raise MusefmError("--tokenizer and --bpe-vocab do not apply to an audio dataset (--render)")
    split_names = lambda text: [name.strip() for name in text.split(",") if name.strip()] if text else None  # noqa: E731
    given = {
        "sources": args.source, "out": args.out, "soundfonts": split_names(args.soundfonts),
        "test_soundfonts": split_names(args.test_soundfonts), "sample_rate": args.sample_rate, "limit": args.limit,
        "workers": args.workers, "valid_fraction": args.valid_fraction, "test_fraction": args.test_fraction,
        "cache_dir": args.cache_dir, "max_seconds": args.max_seconds,
    }
    given = {key: value for key, value in given.items() if value is not None}
    config = load_yaml(AudioBuildConfig, args.config) if args.config else AudioBuildConfig()
    config = apply_overrides(from_dict(AudioBuildConfig, {**vars(config), **given}), args.overrides)
    summary = build_audio_dataset(config, overwrite=args.overwrite)
    print(summary.line())
    print(f"card: {Path(config.out) / 'card.md'}")
    return 0


def _data_stats(args) -> int:
    from musefm.data.card import format_stats
    from musefm.data.dataset import open_dataset

    dataset = open_dataset(args.dir)
    stats = json.loads((dataset.root / "stats.json").read_text())
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def _data_show(args) -> int:
    from musefm.data.dataset import open_dataset
    from musefm.data.tokenize import decode
    from musefm.viz.pianoroll import plot_pianoroll

    dataset = open_dataset(args.dir)
    row = dataset.row(args.piece_id)
    score = decode(dataset.tokenizer, dataset.piece_ids(row))
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in args.piece_id)
    out = Path(args.out) if args.out else dataset.root / "pianorolls" / f"{safe_name}.png"
    title = f"{row['id']}: {row.get('title') or ''} ({row.get('composer') or 'unknown'}, {row.get('key') or 'key unknown'})"
    plot_pianoroll(score, out, title=title)
    print(out)
    return 0


def _pretrain(args) -> int:
    from musefm.recipes.pretrain import load_config, main as pretrain

    flags = {"data": args.data, "out": args.out, "preset": args.preset}
    config = load_config(args.config, args.model, flags, args.overrides)
    summary = pretrain(config, resume=args.resume, overwrite=args.overwrite)
    valid = summary.get("valid") or {}
    scores = f", valid loss {valid['loss']:.4f} (perplexity {valid['perplexity']:.2f})" if valid else ""
    print(f"{config.out}: trained to step {summary['step']}{scores}; best model in {config.out}/best")
    return 0


def _generate(args) -> int:
    from musefm.config import from_dict
    from musefm.recipes.generate import GenerateConfig, main as generate

    low, high = args.pitch_range if args.pitch_range else (None, None)
    programs = [int(p) for p in args.programs.split(",")] if args.programs else None
    config = from_dict(GenerateConfig, {
        "model": args.model, "out": args.out, "prompt": args.prompt, "prompt_bars": args.prompt_bars,
        "num_samples": args.num_samples, "seed": args.seed, "temperature": args.temperature, "top_k": args.top_k,
        "top_p": args.top_p, "beam": args.beam, "max_tokens": args.max_tokens, "bars": args.bars,
        "seconds": args.seconds, "key": args.key, "pitch_low": low, "pitch_high": high, "programs": programs,
        "time_signature": args.time_signature, "constrained": not args.no_constraint, "render": not args.no_audio,
        "max_notes_per_onset": args.max_notes_per_onset, "infill": args.infill,
        "infill_candidates": args.infill_candidates, "infill_iterations": args.infill_iterations,
    })
    written = generate(config)
    print(f"{len(written)} sample(s) written to {config.out}")
    return 0


def _evaluate(args) -> int:
    if args.kind == "transcription":
        return _evaluate_transcription(args)
    if args.kind == "audio":
        return _evaluate_audio(args)
    if not (args.generated and args.reference and args.out):
        raise MusefmError("evaluate needs --generated, --reference and --out (or: musefm evaluate transcription --pred --ref)")
    from musefm.recipes.evaluate import EvaluateConfig, main as evaluate

    config = EvaluateConfig(generated=args.generated, reference=args.reference, train=args.train, out=args.out,
                            limit=args.limit)
    results = evaluate(config)
    if args.json:
        print(json.dumps(results, indent=2, default=float))
    else:
        print(f"report written to {Path(config.out) / 'report.md'}")
    return 0


def _evaluate_transcription(args) -> int:
    from musefm.evaluation.transcription import evaluate_transcription_dirs

    if not args.pred or not args.ref:
        raise MusefmError("evaluate transcription needs --pred DIR and --ref DIR")
    report = evaluate_transcription_dirs(Path(args.pred), Path(args.ref))
    out = Path(args.out) if args.out else Path(args.pred)
    report.write(out)
    if args.json:
        print(report.to_json())
    else:
        print(report.to_markdown())
        print(f"report written to {out / 'report.md'}")
    return 0


def _evaluate_audio(args) -> int:
    from musefm.evaluation.audio import evaluate_audio_sets

    if not (args.generated and args.reference and args.out):
        raise MusefmError("evaluate audio needs --generated DIR, --reference DIR and --out DIR")
    result = evaluate_audio_sets(Path(args.generated), Path(args.reference), embedding=args.embedding, out=Path(args.out))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.to_markdown())
        print(f"report written to {Path(args.out) / 'audio_report.md'}")
    return 0


def _render(args) -> int:
    from musefm.audio.render import RenderJob, render_batch, soundfont_path
    from musefm.progress import Progress

    if args.program is not None and not 0 <= args.program <= 127:
        raise MusefmError(f"--program must be a General MIDI program 0..127, got {args.program}")
    soundfont_path(args.soundfont or "timgm6mb")  # a missing soundfont fails before any work
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [RenderJob(Path(path), out / f"{Path(path).stem}.wav", args.soundfont, args.program) for path in args.inputs]
    with Progress(len(jobs), "render", quiet=len(jobs) == 1) as bar:
        failures = render_batch(jobs, sample_rate=args.sample_rate, workers=args.workers, progress=bar)
    problems = [reason for reason in failures if reason]
    if len(jobs) == 1 and problems:
        raise MusefmError(problems[0])
    for reason in problems:
        print(f"musefm: skipped {reason}", file=sys.stderr)
    print(f"{len(jobs) - len(problems)} of {len(jobs)} file(s) rendered to {out}")
    return 1 if problems else 0


def _train_transcriber(args) -> int:
    from musefm.recipes.train_transcriber import load_config, main as train

    config = load_config(args.config, {"data": args.data, "out": args.out, "preset": args.preset}, args.overrides)
    summary = train(config, resume=args.resume, overwrite=args.overwrite)
    final = summary.get("final")
    scores = (f"; {final['split']} note F1 {final.get('note_f1', 0):.3f}, with offsets {final.get('note_offset_f1', 0):.3f}"
              if final else "")
    print(f"{config.out}: trained to step {summary['step']}{scores}; best model in {config.out}/best")
    return 0


def _transcribe(args) -> int:
    import dataclasses

    from musefm.transcription.transcribe import load_transcriber, transcribe_paths

    model = load_transcriber(args.model, device=args.device)
    decode = dataclasses.replace(  # the model's validation-tuned thresholds unless given here
        model.decode_config,
        **{name: getattr(args, name) for name in ("onset_threshold", "frame_threshold", "frame_onset_threshold")
           if getattr(args, name) is not None})
    summary = transcribe_paths([Path(path) for path in args.inputs], Path(args.out), model, sonify=args.sonify,
                               soundfont=args.soundfont, decode=decode)
    if len(args.inputs) > 1:
        for row in summary["rejected"]:
            print(f"musefm: skipped {row['path']}: {row['reason']}", file=sys.stderr)
    if not summary["done"]:
        if len(args.inputs) == 1:
            row = summary["rejected"][0]
            raise MusefmError(f"{row['path']}: {row['reason']}")
        raise MusefmError(f"none of the {len(args.inputs)} files could be transcribed (see {args.out}/rejected.jsonl)")
    notes = sum(row["notes"] for row in summary["done"])
    print(f"{len(summary['done'])} file(s) transcribed to {args.out}: {notes} notes, "
          f"{summary['audio_seconds']:.1f} s of audio at {summary['real_time_factor']:.3f}x real time"
          + (f"; {len(summary['rejected'])} skipped (rejected.jsonl)" if summary["rejected"] else ""))
    return 1 if summary["rejected"] else 0


def _finetune(args) -> int:
    from musefm.config import apply_overrides, from_dict
    from musefm.recipes.finetune import FinetuneConfig, main as finetune

    given = {"model": args.model, "data": args.data, "out": args.out, "task": args.task, "labels_csv": args.labels,
             "linear_probe": args.linear_probe, "freeze_layers": args.freeze_layers, "pooling": args.pooling,
             "balance": args.balance, "label_fraction": args.label_fraction, "steps": args.steps, "seed": args.seed,
             "neutral_fields": args.neutral_fields.split(",") if args.neutral_fields else None}
    config = from_dict(FinetuneConfig, {key: value for key, value in given.items() if value is not None})
    config = apply_overrides(config, args.overrides)
    summary = finetune(config, overwrite=args.overwrite)
    scores = (f": {summary['split']} accuracy {summary['accuracy']:.3f}, macro-F1 {summary['macro_f1']:.3f}"
              if "accuracy" in summary else "")
    print(f"{config.out}{scores} (metrics.json, confusion_matrix.png)")
    return 0


def _predict(args) -> int:
    from musefm.recipes.finetune import predict

    for piece, (label, probability) in zip(args.pieces, predict(args.model, args.pieces, data=args.data)):
        print(f"{piece}\t{label}\t{probability:.3f}")
    return 0


def _embed(args) -> int:
    from musefm.config import from_dict
    from musefm.recipes.embed import EmbedConfig, main as embed

    given = {"model": args.model, "source": args.source, "out": args.out, "pooling": args.pooling,
             "per_bar": args.per_bar, "map": args.map, "color_by": args.color_by}
    summary = embed(from_dict(EmbedConfig, {key: value for key, value in given.items() if value is not None}))
    print(f"{summary['pieces']} pieces x {summary['dimension']} dimensions written to {summary['out']}")
    return 0


def _demo(args) -> int:
    from musefm.recipes.demo import run_demo

    run_demo(Path(args.out), quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musefm", description="Music foundation models: data, training, use, evaluation.")
    parser.add_argument("--version", action="version", version=f"musefm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="build and inspect datasets").add_subparsers(dest="data_command", required=True)
    build = data.add_parser("build", help="sources -> tokenized dataset with splits and a card")
    build.add_argument("--source", action="append", help="music21:<collection>, dir:<path> or maestro:<path> (repeatable)")
    build.add_argument("--out", help="dataset directory to write")
    build.add_argument("--tokenizer", choices=["remi", "tsd", "octuple"])
    build.add_argument("--bpe-vocab", type=int, help="train BPE up to this vocabulary size")
    build.add_argument("--limit", type=int, help="read only the first N files of each source")
    build.add_argument("--workers", type=int, help="worker processes (default: one per core)")
    build.add_argument("--valid-fraction", type=float)
    build.add_argument("--test-fraction", type=float)
    build.add_argument("--cache-dir", help="music21 conversion cache (default ~/.cache/musefm)")
    build.add_argument("--config", help="YAML file of build settings")
    build.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    build.add_argument("--render", action="store_true", help="paired audio + notes for transcription (soundfont renders; MAESTRO's recordings)")
    build.add_argument("--soundfonts", help="with --render: comma-separated soundfont names or .sf2/.sf3/.sfz/.cfg paths (timgm6mb, fluidr3, musescore, gmbank, freepats, salamander, salamander-mellow)")
    build.add_argument("--test-soundfonts", help="with --render: soundfonts for the test split only (held-out timbre)")
    build.add_argument("--sample-rate", type=int, help="with --render: audio sample rate (default 16000)")
    build.add_argument("--max-seconds", type=float, help="with --render: cut pieces longer than this")
    build.add_argument("overrides", nargs="*", help="key=value settings, e.g. tokenizer_settings.num_velocities=16")
    build.set_defaults(func=_data_build)

    stats = data.add_parser("stats", help="print a dataset's card numbers")
    stats.add_argument("dir")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=_data_stats)

    show = data.add_parser("show", help="piano roll PNG of one piece")
    show.add_argument("dir")
    show.add_argument("piece_id")
    show.add_argument("-o", "--out", help="PNG path (default DIR/pianorolls/PIECE.png)")
    show.set_defaults(func=_data_show)

    pretrain = commands.add_parser("pretrain", help="self-supervised pretraining (torchrun for several processes)")
    pretrain.add_argument("--model", choices=["music-lm", "music-bert"], help="model family")
    pretrain.add_argument("--data", help="dataset directory (musefm data build)")
    pretrain.add_argument("--preset", help="named size: debug, small, base")
    pretrain.add_argument("--out", help="run directory")
    pretrain.add_argument("--config", help="YAML config file, or the name of a shipped one (e.g. music_lm_small)")
    pretrain.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    pretrain.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    pretrain.add_argument("overrides", nargs="*", help="key=value, e.g. train.lr=1e-3 model_settings.d_model=128")
    pretrain.set_defaults(func=_pretrain)

    generate = commands.add_parser("generate", help="continue a prompt or generate from scratch with a MusicLM; "
                                                     "infill bars with a MusicLM or MusicBERT")
    generate.add_argument("--model", required=True, help="run or model directory")
    generate.add_argument("--prompt", help="MIDI/MusicXML/ABC file or corpus id (music21:bach/bwv66.6)")
    generate.add_argument("--prompt-bars", type=int, default=0, help="keep the prompt's first N bars (0: all)")
    generate.add_argument("--out", required=True)
    generate.add_argument("--num-samples", type=int, default=1)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=0.95)
    generate.add_argument("--beam", type=int, default=0, help="length-normalised beam search with N beams")
    generate.add_argument("--max-tokens", type=int, default=0)
    generate.add_argument("--bars", type=int, default=0)
    generate.add_argument("--seconds", type=float, default=0.0)
    generate.add_argument("--key", help='keep pitches in a scale, e.g. "G major"')
    generate.add_argument("--pitch-range", type=int, nargs=2, metavar=("LOW", "HIGH"))
    generate.add_argument("--programs", help="allowed MIDI programs, e.g. 0,40 (-1 = drums)")
    generate.add_argument("--time-signature", help="e.g. 3/4")
    generate.add_argument("--max-notes-per-onset", type=int, default=12, help="cap on notes starting together (0: none)")
    generate.add_argument("--no-constraint", action="store_true", help="sample without the token grammar")
    generate.add_argument("--no-audio", action="store_true", help="skip the WAV rendering")
    generate.add_argument("--infill", metavar="I:J", help="regenerate bars I..J of --prompt, the rest unchanged "
                          "(bars numbered from 1 as in a score, both included; e.g. 5:8)")
    generate.add_argument("--infill-candidates", type=int, default=8,
                          help="music-lm infilling: candidates drawn, the one the following bars fit best is kept")
    generate.add_argument("--infill-iterations", type=int, default=10, help="music-bert infilling: mask-predict passes")
    generate.set_defaults(func=_generate)

    evaluate = commands.add_parser("evaluate", help="metrics of generated music, or of transcriptions (evaluate transcription)")
    evaluate.add_argument("kind", nargs="?", choices=["music", "transcription", "audio"], default="music",
                          help="music (default): generated vs reference pieces; transcription: --pred vs --ref notes; "
                               "audio: FAD of --generated vs --reference audio")
    evaluate.add_argument("--embedding", choices=["logmel", "transcriber"], default="logmel",
                          help="audio: the embedding FAD is computed in")
    evaluate.add_argument("--generated", help="folder or source spec of generated pieces")
    evaluate.add_argument("--reference", help="source spec (music21:bach, dir:...) or folder")
    evaluate.add_argument("--pred", help="transcription: folder of transcribed .mid/.csv files")
    evaluate.add_argument("--ref", help="transcription: folder of reference .mid/.csv files (same stems)")
    evaluate.add_argument("--train", help="dataset directory, for the memorization check")
    evaluate.add_argument("--out", help="report folder (transcription: default --pred)")
    evaluate.add_argument("--limit", type=int, default=0, help="at most N pieces per set")
    evaluate.add_argument("--json", action="store_true", help="print the results as JSON")
    evaluate.set_defaults(func=_evaluate)

    finetune = commands.add_parser("finetune", help="fine-tune or probe a pretrained model on a labelled task")
    finetune.add_argument("--model", required=True, help="pretrained run or model directory")
    finetune.add_argument("--data", required=True, help="dataset directory (same tokenizer as the model)")
    finetune.add_argument("--task", choices=["composer", "collection", "key", "mode", "meter", "labels"])
    finetune.add_argument("--labels", help="CSV of piece,label (task labels)")
    finetune.add_argument("--out", required=True)
    finetune.add_argument("--linear-probe", action="store_true", default=None, help="train only the head")
    finetune.add_argument("--freeze-layers", type=int, help="freeze the embeddings and the first N blocks")
    finetune.add_argument("--pooling", choices=["mean", "first", "last"])
    finetune.add_argument("--balance", choices=["none", "weights", "sampling"])
    finetune.add_argument("--label-fraction", type=float, help="use this share of the training labels")
    finetune.add_argument("--neutral-fields", help="Octuple fields set to one value in every note, e.g. "
                          "tempo,timesig,program,velocity (the label must come from the notes)")
    finetune.add_argument("--steps", type=int)
    finetune.add_argument("--seed", type=int)
    finetune.add_argument("--overwrite", action="store_true")
    finetune.add_argument("overrides", nargs="*", help="key=value, e.g. lr=3e-4 batch_size=32")
    finetune.set_defaults(func=_finetune)

    predict = commands.add_parser("predict", help="labels of pieces from a fine-tuned classifier")
    predict.add_argument("--model", required=True, help="classifier run or model directory")
    predict.add_argument("--data", help="dataset, to name pieces by manifest id")
    predict.add_argument("pieces", nargs="+", help="music files, corpus ids or manifest ids")
    predict.set_defaults(func=_predict)

    embed = commands.add_parser("embed", help="one vector per piece (and per bar) with a 2-D map")
    embed.add_argument("--model", required=True)
    embed.add_argument("--source", required=True, help="dataset directory, corpus spec or folder")
    embed.add_argument("--out", required=True)
    embed.add_argument("--pooling", choices=["mean", "first", "last"])
    embed.add_argument("--per-bar", action="store_true", default=None)
    embed.add_argument("--map", choices=["pca", "tsne", "umap", "none"], help="2-D map of the pieces (default pca)")
    embed.add_argument("--color-by", help="manifest field colouring the map (e.g. composer)")
    embed.set_defaults(func=_embed)

    render = commands.add_parser("render", help="MIDI files -> WAV with a soundfont (FluidSynth)")
    render.add_argument("inputs", nargs="+", help="MIDI files")
    render.add_argument("-o", "--out", required=True, help="output folder")
    render.add_argument("--soundfont", help="timgm6mb (default), fluidr3, musescore, gmbank, freepats, salamander or salamander-mellow (make piano-samples), or a .sf2/.sf3/.sfz path or TiMidity++ .cfg")
    render.add_argument("--program", type=int, help="play every non-drum part with this General MIDI program (0: piano)")
    render.add_argument("--sample-rate", type=int, default=44100)
    render.add_argument("--workers", type=int, default=0, help="parallel renders (default: one per core)")
    render.set_defaults(func=_render)

    train_transcriber = commands.add_parser("train-transcriber", help="train the piano transcriber on paired audio")
    train_transcriber.add_argument("--data", help="audio dataset (musefm data build --render); several: comma-separated")
    train_transcriber.add_argument("--out", help="run directory")
    train_transcriber.add_argument("--preset", help="debug, small (shipped size) or base")
    train_transcriber.add_argument("--config", help="YAML config, or a shipped one (transcriber_small, transcriber_debug)")
    train_transcriber.add_argument("--resume", action="store_true")
    train_transcriber.add_argument("--overwrite", action="store_true")
    train_transcriber.add_argument("overrides", nargs="*", help="key=value, e.g. train.max_steps=2000 segment_seconds=8")
    train_transcriber.set_defaults(func=_train_transcriber)

    transcribe = commands.add_parser("transcribe", help="audio files -> MIDI, notes CSV and piano roll")
    transcribe.add_argument("inputs", nargs="+", help="audio files (wav, flac, ogg, mp3)")
    transcribe.add_argument("-o", "--out", required=True, help="output folder")
    transcribe.add_argument("--model", help="transcriber model or run directory (default: the shipped piano model)")
    transcribe.add_argument("--sonify", action="store_true", help="also render each MIDI back to WAV")
    transcribe.add_argument("--soundfont", help="soundfont for --sonify (name or path)")
    transcribe.add_argument("--onset-threshold", type=float, help="default: the model's (tuned on validation data)")
    transcribe.add_argument("--frame-threshold", type=float, help="default: the model's (tuned on validation data)")
    transcribe.add_argument("--frame-onset-threshold", type=float,
                            help="a weaker onset peak that starts a note where the frame activation rises "
                                 "(default: the model's, tuned on validation data)")
    transcribe.add_argument("--device", default="cpu")
    transcribe.set_defaults(func=_transcribe)

    demo = commands.add_parser("demo", help="the main job on the bundled corpus")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="a smaller run (tests, smoke checks)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MusefmError as error:
        if args.debug:
            traceback.print_exc()
        print(f"musefm: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("musefm: interrupted", file=sys.stderr)
        return 130
