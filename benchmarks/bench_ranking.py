"""MusicBERT's ranking tasks on the Bach chorales: does pretraining help pick the right candidate?

Melody completion (the melody of the next segment) and accompaniment suggestion (the lower voices
of the same segment), each query ranked against ``num_candidates`` candidates (the true one and
parts of other test pieces), scored with MAP and HITS@k as in the MusicBERT paper
(``musefm.recipes.ranking`` states the definitions). Three systems on each task:

- ``pretrained``: MusicBERT pretrained (bar-masked Octuple modelling) on the training split of the
  chorales, then fine-tuned as a pair classifier;
- ``scratch``: the same architecture randomly initialised, fine-tuned for the same steps;
- ``random``: a ranker that orders candidates at random (expected MAP = H_K / K, HITS@k = k / K).

Pretraining and fine-tuning see training-split chorales only; ranking is measured on test-split
chorales. The pretrained model is cached in the work directory (``--retrain`` forces it), or given
with ``--model``; the dataset is built there too (the music21 conversion cache makes that quick),
or given with ``--data``.

Run: ``python benchmarks/bench_ranking.py [--quick] [--work DIR] [--data DIR] [--model DIR]``.
Writes ``DIR/results.json``. Last line: ``RESULT melody_map_pretrained=.. melody_map_scratch=..
melody_map_random=.. accomp_map_pretrained=.. ...`` (MAP and HITS@1 as fractions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_finetune import pretrain, random_backbone  # noqa: E402  (the same backbone protocol)

TASKS = {"melody": "melody_completion", "accomp": "accompaniment"}
SYSTEMS = ("pretrained", "scratch", "random")

# --quick: a narrow 2-layer MusicBERT, 10 candidates and 100 test queries, so that everything
# (build, ~1 minute of pretraining, 4 fine-tuning runs) stays within ~3-4 minutes on 2 cores.
QUICK = dict(limit=0, pretrain_minutes=1.0, steps=200, batch_size=16, lr=1e-3, num_candidates=10, max_queries=100,
             seq_len=128, pair_len={"melody": 0, "accomp": 96},
             model_settings=dict(d_model=128, n_layers=2, n_heads=4, d_ff=512, max_seq_len=128, max_relative=128))
FULL = dict(limit=0, pretrain_minutes=10.0, steps=1500, batch_size=16, lr=5e-4, num_candidates=50, max_queries=0,
            seq_len=256, pair_len={"melody": 0, "accomp": 160},
            model_settings=dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024, max_seq_len=256, max_relative=256))


def build(work: Path, limit: int, quiet) -> Path:
    from musefm.data.build import BuildConfig, build_dataset

    out = work / f"bach-octuple-{limit or 'all'}"
    # A larger test split than the default 5%: each test piece gives ~10 queries.
    build_dataset(BuildConfig(sources=["music21:bach"], out=str(out), tokenizer="octuple", limit=limit, workers=2,
                              valid_fraction=0.05, test_fraction=0.15), stream=quiet)
    return out


def rank_one(system: str, short: str, backbones: dict, data: Path, work: Path, sizes: dict, args, quiet) -> dict:
    from musefm.recipes.ranking import RankingConfig, main

    config = RankingConfig(model=str(backbones[system]), data=str(data), out=str(work / "runs" / f"{short}-{system}"),
                           task=TASKS[short], num_candidates=sizes["num_candidates"], max_queries=sizes["max_queries"],
                           seq_len=sizes["pair_len"][short], steps=sizes["steps"], batch_size=sizes["batch_size"],
                           lr=sizes["lr"], warmup_steps=20, eval_every=max(1, sizes["steps"] // 2), eval_batches=10,
                           seed=args.seed, precision=args.precision, device=args.device)
    started = time.perf_counter()
    result = main(config, overwrite=True, stream=quiet)
    return result | {"seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, 10 candidates (~3-4 minutes on 2 cores)")
    parser.add_argument("--work", default="runs/bench-ranking")
    parser.add_argument("--data", help="an Octuple dataset of the chorales (default: build one in the work dir)")
    parser.add_argument("--model", help="a pretrained music-bert run (default: pretrain one in the work dir)")
    parser.add_argument("--pretrain-minutes", type=float, default=None)
    parser.add_argument("--limit", type=int, default=None, help="chorales read (0 = all)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run")
    parser.add_argument("--candidates", type=int, default=None, help="candidates per query")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true", help="pretrain again even if a cached model exists")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    args = parser.parse_args()
    sizes = dict(QUICK if args.quick else FULL)
    for key, value in (("pretrain_minutes", args.pretrain_minutes), ("limit", args.limit), ("steps", args.steps),
                       ("num_candidates", args.candidates)):
        if value is not None:
            sizes[key] = value
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    quiet = open(os.devnull, "w")
    started = time.perf_counter()

    from musefm.data.dataset import open_dataset
    from musefm.recipes.ranking import random_ranker_metrics

    data = Path(args.data) if args.data else build(work, sizes["limit"], quiet)
    splits = {}
    for row in open_dataset(data).manifest:
        splits[row["split"]] = splits.get(row["split"], 0) + 1
    print(f"data: {data} ({json.dumps(splits)} pieces)  [{time.perf_counter() - started:.0f}s]")

    if args.model:
        pretrained, info = Path(args.model), {"given": True}
        print(f"pretrain: using {pretrained}")
    else:
        pretrained, info = pretrain(work, data, sizes, args, quiet)
        print(f"pretrain: music-bert {sizes['model_settings']}, {info['steps']} steps in {info['seconds']:.0f}s "
              f"(valid loss {info['valid_loss']}){' [cached]' if info.get('cached') else ''}  "
              f"[{time.perf_counter() - started:.0f}s]")
    backbones = {"pretrained": pretrained, "scratch": random_backbone(work, data, pretrained)}

    results = {short: {} for short in TASKS}
    for short in TASKS:
        for system in ("pretrained", "scratch"):
            results[short][system] = rank_one(system, short, backbones, data, work, sizes, args, quiet)
            print(f"{TASKS[short]} {system}: MAP {results[short][system]['map']:.3f} "
                  f"({results[short][system]['seconds']:.0f}s)  [{time.perf_counter() - started:.0f}s]")
        results[short]["random"] = random_ranker_metrics(sizes["num_candidates"]) | {
            "queries": results[short]["pretrained"]["queries"]}

    candidates = sizes["num_candidates"]
    hits = [key for key in results["melody"]["pretrained"] if key.startswith("hits@")]
    print()
    print(f"{candidates} candidates per query; {sizes['steps']} fine-tuning steps x {sizes['batch_size']} pairs; "
          f"test-split queries: {results['melody']['pretrained']['queries']} (melody), "
          f"{results['accomp']['pretrained']['queries']} (accompaniment)")
    print(f"{'task':<20} {'system':<11} {'MAP':>6} " + " ".join(f"{k.upper():>8}" for k in hits))
    for short in TASKS:
        for system in SYSTEMS:
            row = results[short][system]
            print(f"{TASKS[short]:<20} {system:<11} {row['map']:6.3f} " + " ".join(f"{row[k]:8.3f}" for k in hits))
    print("(random = expected values of a random ranker: MAP = H_K / K, HITS@k = k / K)")

    record = {"quick": args.quick, "sizes": sizes, "data": str(data), "splits": splits, "pretrain": info,
              "seed": args.seed, "results": results}
    (work / "results.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"wrote {work / 'results.json'}  [total {time.perf_counter() - started:.0f}s]")
    figures = []
    for short in TASKS:
        figures += [f"{short}_map_{system}={results[short][system]['map']:.3f}" for system in SYSTEMS]
        figures += [f"{short}_hits1_{system}={results[short][system]['hits@1']:.3f}" for system in SYSTEMS]
    print("RESULT " + " ".join(figures))


if __name__ == "__main__":
    main()
