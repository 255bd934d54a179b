"""Generation speed: MusicLM with its KV cache vs Hugging Face GPT-2 ``generate`` (same dimensions)
and vs MusicLM without a cache; per-token latency at 1x, 2x and 4x the training context.

Greedy decoding (top-k 1) of the same number of new tokens from the same prompt, batch 1, random
weights (speed does not depend on them; no EOS stop). musefm generates through
``musefm.generation.sampling.sample`` (what users call, sliding window = training context); the
no-cache baseline re-runs the full forward over the last ``context`` tokens for every new token.
Throughputs are the best of ``--repeats`` interleaved runs (this shared 2-core VM has bursts of
noise that a single run can land in). Latency: one long greedy run of 4x the context with the
sliding window, timed per token; the median over the 64 tokens before each multiple of the context.

Run: ``python benchmarks/bench_generate.py [--quick] [--device cpu|cuda]``. transformers is a
benchmark-only extra. Last line: ``RESULT ...``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from musefm.generation.sampling import filter_logits, sample  # noqa: E402
from musefm.models.music_lm import MusicLM, config_from_preset  # noqa: E402


@torch.no_grad()
def musefm_cached(model, prompt, new_tokens) -> float:
    started = time.perf_counter()
    tokens, _ = sample(model, prompt, new_tokens, top_k=1, stop_at_eos=False)
    assert len(tokens) == new_tokens
    return new_tokens / (time.perf_counter() - started)


@torch.no_grad()
def musefm_uncached(model, prompt, new_tokens, context) -> float:
    sequence = prompt.unsqueeze(0)  # (1, T)
    started = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(sequence[:, -context:]).logits[:, -1]
        token = filter_logits(logits, top_k=1).argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, token], dim=1)
    return new_tokens / (time.perf_counter() - started)


@torch.no_grad()
def gpt2_generate(config, vocab, prompt, new_tokens, device) -> float:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=max(1024, len(prompt) + new_tokens),
                                      n_embd=config.d_model, n_layer=config.n_layers, n_head=config.n_heads,
                                      n_inner=config.d_ff, activation_function="gelu")).to(device).eval()
    inputs = prompt.unsqueeze(0).to(device)
    gpt2.generate(inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)  # warm-up
    started = time.perf_counter()
    output = gpt2.generate(inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0, use_cache=True)
    elapsed = time.perf_counter() - started
    assert output.shape[1] - inputs.shape[1] == new_tokens
    return new_tokens / elapsed


@torch.no_grad()
def latency_by_context(model, prompt, context) -> dict[int, float]:
    """Median milliseconds per token just before 1x, 2x and 4x the context (sliding window = context)."""
    model.eval()
    cache = model.init_cache(1, max_length=context)
    logits = model(prompt.unsqueeze(0), cache=cache).logits[:, -1]
    decode_step = model.decoder()
    times = []
    for _ in range(4 * context):
        started = time.perf_counter()
        token = logits.argmax(-1)  # (1,)
        logits = decode_step(token, cache)
        times.append(time.perf_counter() - started)
    position = len(prompt)
    return {k: 1000 * float(np.median(times[k * context - 64 - position : k * context - position])) for k in (1, 2, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=530)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.context, args.repeats = 96, 128, 2
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = config_from_preset(args.preset, vocab_size=args.vocab, max_seq_len=args.context)
    model = MusicLM(config).to(device).eval()
    prompt = torch.randint(4, args.vocab, (32,), generator=torch.Generator().manual_seed(0)).to(device)
    sample(model, prompt, 8, top_k=1, stop_at_eos=False)  # warm-up

    cached = uncached = gpt2 = 0.0
    for _ in range(args.repeats):
        cached = max(cached, musefm_cached(model, prompt, args.new_tokens))
        uncached = max(uncached, musefm_uncached(model, prompt, args.new_tokens, args.context))
        gpt2 = max(gpt2, gpt2_generate(config, args.vocab, prompt, args.new_tokens, device))
    latency = latency_by_context(model, prompt, args.context)
    print(f"musefm, KV cache:    {cached:8.1f} tokens/s")
    print(f"musefm, no cache:    {uncached:8.1f} tokens/s  (cache: {cached / uncached:.2f}x)")
    print(f"GPT-2 generate:      {gpt2:8.1f} tokens/s  (musefm: {cached / gpt2:.2f}x)")
    print("ms per token at " + ", ".join(f"{k}x context {v:.2f}" for k, v in latency.items())
          + f"  (4x / 1x: {latency[4] / latency[1]:.2f})")
    print(f"RESULT device={args.device} preset={args.preset} context={args.context} new_tokens={args.new_tokens} "
          f"musefm_tokens_per_s={cached:.1f} no_cache_tokens_per_s={uncached:.1f} gpt2_tokens_per_s={gpt2:.1f} "
          f"ratio_vs_gpt2={cached / gpt2:.2f} ratio_vs_no_cache={cached / uncached:.2f} "
          f"ms_per_token_1x={latency[1]:.2f} ms_per_token_2x={latency[2]:.2f} ms_per_token_4x={latency[4]:.2f} "
          f"latency_4x_over_1x={latency[4] / latency[1]:.2f}")


if __name__ == "__main__":
    main()
