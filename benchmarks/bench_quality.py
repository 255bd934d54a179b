"""Pretraining quality on the Bach chorales, against honest baselines.

- MusicLM (recipe ``music_lm_small``: bar-aligned windows, transposition / tempo / velocity
  augmentation) vs the best smoothed n-gram (interpolated Kneser-Ney, n = 2..5 chosen on the
  validation split), both scored on every token of the held-out test pieces. Goal: MusicLM's test
  perplexity below 0.7x the n-gram's.
- MusicBERT (recipe ``music_bert_small``, bar-level masking) masked-element accuracy per element
  type on the test pieces, beside a frequency baseline (the most common value of each element).

Run: ``python benchmarks/bench_quality.py [--quick] [--minutes 12]``. Models train for a bounded
time on this machine (``--minutes``; --quick: 1.5 each). Last line: ``RESULT ...``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from musefm.data.build import BuildConfig, build_dataset  # noqa: E402
from musefm.data.dataset import BOS, EOS, TokenDataset, open_dataset  # noqa: E402
from musefm.models.base import load_pretrained  # noqa: E402
from musefm.models.ngram import KneserNeyLM  # noqa: E402
from musefm.recipes.pretrain import load_config, main as pretrain  # noqa: E402
from musefm.training.checkpoint import resolve_model_dir  # noqa: E402


def framed(dataset, row) -> np.ndarray:
    return np.concatenate([[BOS], np.asarray(dataset.piece_ids(row), dtype=np.int64), [EOS]])


def ngram_baseline(dataset) -> tuple[int, float, dict]:
    train = [framed(dataset, r) for r in dataset.rows("train")]
    valid = [framed(dataset, r) for r in dataset.rows("valid")]
    test = [framed(dataset, r) for r in dataset.rows("test")]
    valid_ppl = {}
    for order in range(2, 6):
        valid_ppl[order] = KneserNeyLM(order, vocab_size=len(dataset.tokenizer)).fit(train).perplexity(valid)
    best = min(valid_ppl, key=valid_ppl.get)
    test_ppl = KneserNeyLM(best, vocab_size=len(dataset.tokenizer)).fit(train).perplexity(test)
    return best, test_ppl, valid_ppl


@torch.no_grad()
def music_lm_test_perplexity(model, dataset, context: int) -> float:
    """Every token after BOS of every test piece predicted once; windows of ``context`` tokens that
    overlap by one, so each window's first token is the previous window's last prediction."""
    model.eval()
    total, count = 0.0, 0
    for row in dataset.rows("test"):
        ids = torch.from_numpy(framed(dataset, row))
        start = 0
        while start < len(ids) - 1:
            window = ids[start : start + context].unsqueeze(0)  # (1, L)
            logits = model(window).logits[0, :-1].float()  # (L - 1, V)
            targets = window[0, 1:]
            total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            count += len(targets)
            start += context - 1
    return math.exp(total / count)


@torch.no_grad()
def music_bert_accuracy(model, dataset, seq_len: int) -> tuple[dict, dict]:
    """Masked-element accuracy per field on the test split, and the frequency baseline's."""
    model.eval()
    names = model.config.field_names
    train_rows = [np.asarray(dataset.piece_ids(r)) for r in dataset.rows("train")]
    train_ids = np.concatenate(train_rows)
    most_common = [Counter(train_ids[:, f][train_ids[:, f] > 3].tolist()).most_common(1)[0][0] for f in range(len(names))]
    test = TokenDataset(dataset, "test", seq_len=seq_len, window="sequential")
    generator = torch.Generator().manual_seed(0)
    correct, baseline, counted = np.zeros(len(names)), np.zeros(len(names)), np.zeros(len(names))
    for index in range(len(test)):
        item = test[index]
        input_ids, mask = item["input_ids"].unsqueeze(0), item["attention_mask"].unsqueeze(0)
        masked, labels = model.mask_batch(input_ids, mask, generator=generator)
        logits = model(masked, mask).logits
        for field in range(len(names)):
            chosen = labels[..., field] != -100
            if chosen.any():
                predicted = logits[field].argmax(-1)[chosen]
                truth = labels[..., field][chosen]
                correct[field] += float((predicted == truth).sum())
                baseline[field] += float((truth == most_common[field]).sum())
                counted[field] += int(chosen.sum())
    accuracy = {n: correct[f] / max(1, counted[f]) for f, n in enumerate(names)}
    frequency = {n: baseline[f] / max(1, counted[f]) for f, n in enumerate(names)}
    return accuracy, frequency


def ensure_dataset(out: Path, tokenizer: str) -> Path:
    build_dataset(BuildConfig(sources=["music21:bach"], out=str(out), tokenizer=tokenizer), stream=open(os.devnull, "w"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--minutes", type=float, default=12.0, help="training time of each model")
    parser.add_argument("--steps-per-minute", type=float, default=40.0,
                        help="sets max_steps so the cosine schedule ends near the time limit (2-core CPU, bf16)")
    parser.add_argument("--work", default="runs/bench-quality")
    parser.add_argument("--skip-bert", action="store_true")
    parser.add_argument("--datasets", help="folder holding bach-remi/ and bach-octuple/ already built (skips building)")
    args = parser.parse_args()
    minutes = 1.5 if args.quick else args.minutes
    steps = max(20, int(minutes * args.steps_per_minute))
    limits = [f"train.max_minutes={minutes * 1.3}", f"train.max_steps={steps}", "train.eval_every=100",
              "train.save_every=100", "train.log_every=25", f"train.warmup_steps={max(5, steps // 10)}"]
    work = Path(args.work)

    source = Path(args.datasets) if args.datasets else work
    prepare = (lambda path, _tokenizer: path) if args.datasets else ensure_dataset
    remi = open_dataset(prepare(source / "bach-remi", "remi"))
    order, ngram_ppl, valid_ppl = ngram_baseline(remi)
    print("n-gram validation perplexity: " + ", ".join(f"n={n} {p:.3f}" for n, p in valid_ppl.items()), flush=True)
    print(f"n-gram (n={order}) test perplexity {ngram_ppl:.3f}", flush=True)

    config = load_config("music_lm_small", None, {"data": str(source / "bach-remi"), "out": str(work / "music-lm")},
                         limits)
    pretrain(config, overwrite=True)
    model, _ = load_pretrained(resolve_model_dir(work / "music-lm"))
    lm_ppl = music_lm_test_perplexity(model, remi, model.config.max_seq_len)
    ratio = lm_ppl / ngram_ppl
    print(f"MusicLM small test perplexity {lm_ppl:.3f} = {ratio:.2f}x the n-gram's (goal < 0.70)", flush=True)

    result = (f"RESULT ngram_order={order} ngram_test_ppl={ngram_ppl:.3f} music_lm_test_ppl={lm_ppl:.3f} "
              f"ratio_vs_ngram={ratio:.3f} minutes_per_model={minutes}")
    if not args.skip_bert:
        octuple = open_dataset(prepare(source / "bach-octuple", "octuple"))
        config = load_config("music_bert_small", None, {"data": str(source / "bach-octuple"), "out": str(work / "music-bert")},
                             limits)
        pretrain(config, overwrite=True)
        bert, _ = load_pretrained(resolve_model_dir(work / "music-bert"))
        accuracy, frequency = music_bert_accuracy(bert, octuple, config.seq_len or bert.config.max_seq_len)
        for name in accuracy:
            print(f"MusicBERT masked {name:10s} accuracy {accuracy[name]:.3f}  (frequency baseline {frequency[name]:.3f})")
        mean_accuracy = float(np.mean(list(accuracy.values())))
        mean_baseline = float(np.mean(list(frequency.values())))
        result += f" bert_mean_accuracy={mean_accuracy:.3f} bert_frequency_baseline={mean_baseline:.3f}"
    print(result)


if __name__ == "__main__":
    main()
