"""Label efficiency (issue 5): what does pretraining buy when labels are scarce?

Collection classification (which music21 collection a piece comes from: Bach chorales, Palestrina
masses, Monteverdi madrigals, Trecento pieces) with 5%, 10%, 25% and 100% of the
training labels, for three systems on the same architecture:

- ``pretrained``: MusicBERT pretrained (masked Octuple modelling) on unlabelled pieces, fine-tuned;
- ``probe``: the same pretrained backbone frozen, a linear head trained;
- ``scratch``: the same architecture randomly initialised, fine-tuned fully for the same steps.

The collections also differ in metadata that says nothing about the music: Palestrina is mostly
notated in 4/2, the Trecento pieces in 6/8, 3/4 and 2/4 and some with program 52, several chorales
carry their own tempo. A model reads those off one token, so by default the classifier sets tempo,
time signature, program and velocity to one value in every note (``--neutral-fields``, see
``musefm finetune --neutral-fields``) and the label has to come from pitches, rhythm and texture;
``--neutral-fields none`` keeps them.

Each cell is run over 3 seeds (the seed draws the labelled subset, the head and the batches); the
metrics are macro-F1 and accuracy per piece on the test split. Pretraining reads the training split
of a build of the same collections with ``--pretrain-limit`` files each (the full study: every file,
about 1,900 pieces, 5x the labelled pool, as a foundation model sees far more music than labels).
Splits follow each piece's note fingerprint, so that build's training split holds no valid or test
piece of the labelled one. It is bounded by ``--pretrain-minutes``; its model is cached in the work
directory, so a re-run skips it (``--retrain`` forces it).

Run: ``python benchmarks/bench_finetune.py [--quick | --size quick|full|large] [--work DIR] [--device cpu|cuda]``.
Writes ``DIR/results.json`` and ``DIR/label_efficiency.png`` (macro-F1 vs label fraction).
Last line: ``RESULT f1_pretrained_10=.. f1_probe_10=.. f1_scratch_10=.. gain_at_10=..`` (macro-F1 in
points; gain = pretrained fine-tuned minus scratch at 10%). Goal: gain_at_10 >= 10.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Four collections of vocal polyphony: close enough in style that the task is not trivial (a first
# version with Ryan's fiddle tunes let every system reach ~90 F1 from 4 labelled pieces).
SOURCES = ["music21:bach", "music21:palestrina", "music21:monteverdi", "music21:trecento"]
FRACTIONS = (0.05, 0.10, 0.25, 1.0)
SYSTEMS = ("pretrained", "probe", "scratch")
SEEDS = (0, 1, 2)

# Sizes: --quick uses a narrow 2-layer MusicBERT so 36 fine-tuning runs fit in ~2 minutes on 2 cores;
# the full study labels 4x the pieces, pretrains a 4-layer model 20x longer on every file of the
# collections and fine-tunes 5x longer (about 45 minutes on 2 cores; a 256-wide model at 256 tokens
# would take ~4 hours there).
QUICK = dict(limit=30, pretrain_limit=30, pretrain_minutes=1.5, pretrain_steps=100000, steps=20, batch_size=16,
             seq_len=128, model_settings=dict(d_model=128, n_layers=2, n_heads=4, d_ff=512, max_seq_len=128, max_relative=128))
FULL = dict(limit=120, pretrain_limit=0, pretrain_minutes=30.0, pretrain_steps=100000, steps=100, batch_size=16,
            seq_len=128, model_settings=dict(d_model=128, n_layers=4, n_heads=4, d_ff=512, max_seq_len=128, max_relative=128))
# --size large is for a GPU: the full study's data and fine-tuning steps with a 6-layer, 256-wide
# MusicBERT pretrained in batches of 64 (5.5 minutes in all on one H200); the wider model fine-tunes
# with a smaller step (both systems alike).
LARGE = dict(FULL, pretrain_minutes=3.5, pretrain_batch_size=64, finetune_lr=2e-4,
             model_settings=dict(d_model=256, n_layers=6, n_heads=4, d_ff=1024, max_seq_len=128, max_relative=128))
SIZES = {"quick": QUICK, "full": FULL, "large": LARGE}


def build(work: Path, limit: int, quiet) -> Path:
    from musefm.data.build import BuildConfig, build_dataset

    out = work / f"data-{limit or 'all'}"
    # A generous test split: macro-F1 over a handful of test pieces per class is otherwise all noise.
    config = BuildConfig(sources=SOURCES, out=str(out), tokenizer="octuple", limit=limit, workers=2,
                         valid_fraction=0.1, test_fraction=0.25)
    info = json.loads((out / "dataset.json").read_text()) if (out / "dataset.json").is_file() else {}
    if info.get("status") == "complete" and info.get("identity") == config.identity():
        return out  # built: reused without listing the corpus (a GPU host need not have music21)
    build_dataset(config, stream=quiet)
    return out


def pretrain(work: Path, data: Path, sizes: dict, args, quiet) -> tuple[Path, dict]:
    """MusicBERT pretrained on the dataset's training split; cached under work/pretrained-*/."""
    from musefm.recipes.pretrain import load_config, main

    out = work / f"pretrained-{data.name}-{sizes['model_settings']['d_model']}x{sizes['model_settings']['n_layers']}"
    done = out / "bench_done.json"
    if done.is_file() and not args.retrain:
        return out, json.loads(done.read_text()) | {"cached": True}
    extra = [f"train.max_steps={sizes.get('pretrain_steps', 100000)}", f"train.max_minutes={sizes['pretrain_minutes']}",
             "train.warmup_steps=50", "train.eval_every=200", "train.save_every=200", "train.eval_batches=10",
             "train.log_every=50", "train.seed=0", f"seq_len={sizes['seq_len']}", f"train.device={args.device}",
             f"train.precision={args.precision}", f"train.batch_size={sizes.get('pretrain_batch_size', 16)}"]
    config = load_config("music_bert_small", None, {"data": str(data), "out": str(out)}, extra)
    config.model_settings.update(sizes["model_settings"])
    started = time.perf_counter()
    summary = main(config, overwrite=True, stream=quiet)
    valid = summary.get("valid") or {}
    info = {"steps": summary.get("step"), "seconds": time.perf_counter() - started,
            "valid_loss": round(summary.get("best_valid_loss") or valid.get("loss") or float("nan"), 3)}
    done.write_text(json.dumps(info))
    return out, info


def random_backbone(work: Path, data: Path, pretrained: Path) -> Path:
    """The pretrained model's architecture with its random initialisation (seed 0), saved like a run."""
    from musefm.models.base import family_class, load_pretrained
    import torch

    out = work / f"scratch-{pretrained.name}"
    if (out / "tokenizer.json").is_file():
        return out
    from musefm.training.checkpoint import resolve_model_dir

    model, _ = load_pretrained(resolve_model_dir(pretrained))
    torch.manual_seed(0)
    family_class("music-bert")(model.config).save_pretrained(out)
    shutil.copyfile(data / "tokenizer.json", out / "tokenizer.json")
    return out


def finetune_one(system: str, fraction: float, seed: int, backbones: dict, data: Path, work: Path, sizes, args,
                 quiet) -> dict:
    from musefm.recipes.finetune import FinetuneConfig, main

    probe = system == "probe"
    # The probe trains only a head, so it takes a larger step; fine-tuning and scratch share theirs.
    config = FinetuneConfig(model=str(backbones["scratch" if system == "scratch" else "pretrained"]), data=str(data),
                            out=str(work / "runs" / f"{system}-{fraction:g}-{seed}"), task="collection",
                            linear_probe=probe, label_fraction=fraction, steps=sizes["steps"],
                            batch_size=sizes["batch_size"], lr=3e-3 if probe else sizes.get("finetune_lr", 5e-4), warmup_steps=5,
                            eval_every=sizes["steps"], eval_batches=4, seq_len=sizes["seq_len"], seed=seed,
                            precision=args.precision, device=args.device, neutral_fields=args.neutral_fields)
    result = main(config, overwrite=True, stream=quiet)
    return {"macro_f1": result["macro_f1"], "accuracy": result["accuracy"], "pieces": result["pieces"],
            "train_pieces": result["train_pieces"], "split": result["split"]}


def plot(results: dict, fractions, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for system in SYSTEMS:
        means = [100 * np.mean([r["macro_f1"] for r in results[system][str(f)]]) for f in fractions]
        stds = [100 * np.std([r["macro_f1"] for r in results[system][str(f)]]) for f in fractions]
        axis.errorbar([100 * f for f in fractions], means, yerr=stds, marker="o", capsize=3, label=system)
    axis.set_xscale("log")
    axis.set_xticks([100 * f for f in fractions], [f"{100 * f:g}%" for f in fractions])
    axis.set_xlabel("training labels used")
    axis.set_ylabel("test macro-F1 (points)")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small corpus and model (~2-3 minutes on 2 cores)")
    parser.add_argument("--size", choices=tuple(SIZES), default=None,
                        help="quick, full (the default; ~45 minutes on 2 cores) or large (for a GPU)")
    parser.add_argument("--work", default="runs/bench-finetune")
    parser.add_argument("--pretrain-minutes", type=float, default=None)
    parser.add_argument("--limit", type=int, default=None, help="files read per source (labelled pool)")
    parser.add_argument("--pretrain-limit", type=int, default=None,
                        help="files read per source for pretraining (0: all)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run")
    parser.add_argument("--fractions", default=",".join(map(str, FRACTIONS)), help="label fractions to run")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="seeds of every cell")
    parser.add_argument("--retrain", action="store_true", help="pretrain again even if a cached model exists")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--neutral-fields", default="tempo,timesig,program,velocity",
                        help="Octuple fields the classifier sets to one value ('none': keep them all)")
    args = parser.parse_args()
    args.neutral_fields = [] if args.neutral_fields == "none" else args.neutral_fields.split(",")
    fractions = [float(f) for f in args.fractions.split(",")]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    args.size = args.size or ("quick" if args.quick else "full")
    sizes = dict(SIZES[args.size])
    if args.pretrain_minutes is not None:
        sizes["pretrain_minutes"] = args.pretrain_minutes
    sizes["limit"] = args.limit or sizes["limit"]
    sizes["steps"] = args.steps or sizes["steps"]
    if args.pretrain_limit is not None:
        sizes["pretrain_limit"] = args.pretrain_limit
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    quiet = open(os.devnull, "w")
    started = time.perf_counter()

    data = build(work, sizes["limit"], quiet)
    from musefm.data.dataset import open_dataset

    rows = open_dataset(data).manifest
    counts = {}
    for row in rows:
        counts.setdefault(row["split"], {}).setdefault(row["collection"], 0)
        counts[row["split"]][row["collection"]] += 1
    print(f"data: {len(rows)} pieces from {', '.join(s.split(':')[1] for s in SOURCES)} (limit {sizes['limit']} "
          f"files each); per split: {json.dumps(counts)}  [{time.perf_counter() - started:.0f}s]")

    unlabelled = data
    if sizes["pretrain_limit"] != sizes["limit"]:
        unlabelled = build(work, sizes["pretrain_limit"], quiet)
        print(f"pretraining corpus: {len(open_dataset(unlabelled).rows('train'))} training pieces "
              f"({sizes['pretrain_limit'] or 'all'} files per collection)  [{time.perf_counter() - started:.0f}s]")
    pretrained, info = pretrain(work, unlabelled, sizes, args, quiet)
    print(f"pretrain: music-bert {sizes['model_settings']}, {info['steps']} steps in {info['seconds']:.0f}s "
          f"(valid loss {info['valid_loss']}){' [cached]' if info.get('cached') else ''}  "
          f"[{time.perf_counter() - started:.0f}s]")
    backbones = {"pretrained": pretrained, "scratch": random_backbone(work, data, pretrained)}

    results = {system: {str(f): [] for f in fractions} for system in SYSTEMS}
    finetune_started = time.perf_counter()
    for fraction in fractions:
        for system in SYSTEMS:
            for seed in seeds:
                results[system][str(fraction)].append(
                    finetune_one(system, fraction, seed, backbones, data, work, sizes, args, quiet))
    train_pieces = {str(f): results["pretrained"][str(f)][0]["train_pieces"] for f in fractions}
    test_pieces = results["pretrained"][str(fractions[0])][0]["pieces"]
    split = results["pretrained"][str(fractions[0])][0]["split"]
    print(f"fine-tune: {len(fractions) * len(SYSTEMS) * len(seeds)} runs of {sizes['steps']} steps x "
          f"{sizes['batch_size']} windows of {sizes['seq_len']} in {time.perf_counter() - finetune_started:.0f}s; "
          f"evaluated on {test_pieces} {split} pieces")
    print()
    print(f"{'labels':>8} {'pieces':>6}  " + "  ".join(f"{s + ' F1':>14} {s + ' acc':>14}" for s in SYSTEMS))
    summary = {}
    for fraction in fractions:
        cells = []
        for system in SYSTEMS:
            f1 = 100 * np.array([r["macro_f1"] for r in results[system][str(fraction)]])
            accuracy = 100 * np.array([r["accuracy"] for r in results[system][str(fraction)]])
            summary[(system, fraction)] = (f1.mean(), f1.std(), accuracy.mean(), accuracy.std())
            cells.append(f"{f1.mean():7.1f} ± {f1.std():4.1f} {accuracy.mean():7.1f} ± {accuracy.std():4.1f}")
        print(f"{100 * fraction:7g}% {train_pieces[str(fraction)]:>6}  " + "  ".join(cells))
    print("(macro-F1 and accuracy in points, mean ± std over seeds "
          f"{', '.join(map(str, seeds))}; 'pieces' = labelled training pieces)")

    title = (f"collection classification, {len(SYSTEMS)} systems x {len(seeds)} seeds, "
             f"neutral: {','.join(args.neutral_fields) or 'none'}"
             f"{'' if args.size == 'full' else f' (--size {args.size})'}")
    picture = plot(results, fractions, work / "label_efficiency.png", title)
    record = {"quick": args.size == "quick", "size": args.size, "neutral_fields": args.neutral_fields, "sizes": sizes, "sources": SOURCES,
              "pretrain": info, "split": split, "test_pieces": test_pieces, "train_pieces": train_pieces, "seeds": seeds, "results": results}
    (work / "results.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"wrote {work / 'results.json'} and {picture}  [total {time.perf_counter() - started:.0f}s]")

    figures = []
    for fraction in fractions:
        key = f"{round(100 * fraction)}"
        figures += [f"f1_{system}_{key}={summary[(system, fraction)][0]:.1f}" for system in SYSTEMS]
    if 0.1 in fractions:
        gain = summary[("pretrained", 0.1)][0] - summary[("scratch", 0.1)][0]
        verdict = "met" if gain >= 10 else "NOT met"
        print(f"goal (pretrained beats scratch by >= 10 macro-F1 points at 10% labels): {verdict} (gain {gain:+.1f})")
        figures.append(f"gain_at_10={gain:.1f}")
    print("RESULT " + " ".join(figures))


if __name__ == "__main__":
    main()
