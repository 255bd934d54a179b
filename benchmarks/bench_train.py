"""Training throughput: musefm's MusicLM vs Hugging Face transformers' GPT-2 with identical
dimensions (layers, width, heads, feed-forward, context, vocabulary) on the same batches.

Each model trains in its own process (so peak memory is its own): AdamW, the same batches of
token ids (random ids, or real windows with ``--data``), dropout 0.1 on both. Reports tokens/s
after warm-up and peak memory (RSS on CPU, allocated memory on GPU): the best of ``--repeats``
interleaved runs per model, since single runs on this shared 2-core VM vary by ~10%.

Run: ``python benchmarks/bench_train.py [--quick] [--device cpu|cuda] [--dtype fp32|bf16]``.
transformers is a benchmark-only extra (``pip install transformers``). Last line: ``RESULT ...``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_batches(args) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    if args.data:
        from musefm.data.dataset import TokenDataset

        data = TokenDataset(args.data, "train", seq_len=args.seq_len, seed=0)
        order = torch.randperm(len(data), generator=generator)
        batches = []
        for start in range(0, args.batch * (args.steps + args.warmup), args.batch):
            items = [data[int(order[(start + k) % len(data)])]["input_ids"] for k in range(args.batch)]
            batches.append(torch.stack(items))
        return batches
    return [torch.randint(4, args.vocab, (args.batch, args.seq_len), generator=generator)
            for _ in range(args.steps + args.warmup)]


def build(name: str, args):
    from musefm.models.music_lm import MusicLM, config_from_preset

    config = config_from_preset(args.preset, vocab_size=args.vocab, max_seq_len=args.seq_len, dropout=0.1)
    if name == "musefm":
        return MusicLM(config), config
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2Config(vocab_size=args.vocab, n_positions=args.seq_len, n_embd=config.d_model, n_layer=config.n_layers,
                      n_head=config.n_heads, n_inner=config.d_ff, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                      activation_function="gelu", tie_word_embeddings=True)
    return GPT2LMHeadModel(gpt2, ).to(torch.float32), config


def train_one(name: str, args) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    model, config = build(name, args)
    if name == "gpt2":
        model.config._attn_implementation = "sdpa"
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    batches = make_batches(args)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step(batch):
        batch = batch.to(device)
        with autocast:
            if name == "musefm":
                loss, _, _ = model.loss({"input_ids": batch, "attention_mask": batch != 0})
            else:
                loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for batch in batches[: args.warmup]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for batch in batches[args.warmup :]:
        loss = step(batch)
    float(loss)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens = args.batch * args.seq_len * args.steps
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return {"tokens_per_s": tokens / seconds, "peak_mb": peak,
            "parameters": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=530, help="REMI's base vocabulary has about 530 tokens")
    parser.add_argument("--data", help="a dataset directory: real windows instead of random ids")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=3, help="runs per model; the fastest of each counts")
    parser.add_argument("--only", choices=["musefm", "gpt2"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats = 6, 2, 1
    if args.only:
        print(json.dumps(train_one(args.only, args)))
        return

    results = {}
    for repeat in range(args.repeats):  # interleaved, so a burst of noise does not favour one model
        for name in ("gpt2", "musefm"):
            command = [sys.executable, __file__, "--only", name] + [a for a in sys.argv[1:]]
            output = subprocess.run(command, capture_output=True, text=True, check=False)
            if output.returncode != 0:
                raise SystemExit(f"{name} run failed:\n{output.stderr[-3000:]}")
            r = json.loads(output.stdout.strip().splitlines()[-1])
            print(f"{name:7s} {r['parameters']:>11,} params  {r['tokens_per_s']:>10,.0f} tokens/s  peak {r['peak_mb']:,.0f} MB"
                  f"  (run {repeat + 1})", flush=True)
            if name not in results or r["tokens_per_s"] > results[name]["tokens_per_s"]:
                results[name] = r
    ratio = results["musefm"]["tokens_per_s"] / results["gpt2"]["tokens_per_s"]
    memory = results["musefm"]["peak_mb"] / results["gpt2"]["peak_mb"]
    print(f"RESULT device={args.device} dtype={args.dtype} preset={args.preset} seq_len={args.seq_len} batch={args.batch} "
          f"musefm_tokens_per_s={results['musefm']['tokens_per_s']:.0f} gpt2_tokens_per_s={results['gpt2']['tokens_per_s']:.0f} "
          f"ratio_vs_gpt2={ratio:.2f} musefm_peak_mb={results['musefm']['peak_mb']:.0f} "
          f"gpt2_peak_mb={results['gpt2']['peak_mb']:.0f} memory_ratio={memory:.2f}")


if __name__ == "__main__":
    main()
