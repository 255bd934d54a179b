"""Sampling continuations from a causal model with its KV cache.

Temperature, top-k and nucleus (top-p) filtering, a seeded generator (the same seed gives the same
music), and a sliding cache window so generation can run past the training context at a flat cost
per token.
"""

from __future__ import annotations

import torch

from musefm.data.dataset import EOS


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits (B, V) after temperature, top-k and top-p: removed entries become -inf."""
    logits = logits / max(temperature, 1e-6)
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def sample(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True, window: int | None = None):
    """Continue ``prompt`` (T,) by up to ``max_new_tokens``; returns (new tokens (N,), log-probs (N,)).

    The cache keeps the last ``window`` positions (default: the model's training context).
    """
    model.eval()
    device = next(model.parameters()).device
    window = window or model.config.max_seq_len
    prompt = prompt[-window:].to(device).unsqueeze(0)  # (1, T)
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = model.init_cache(1, max_length=window)
    logits = model(prompt, cache=cache).logits[:, -1]  # (1, V)
    tokens, log_probs = [], []
    for _ in range(max_new_tokens):
        filtered = filter_logits(logits.float(), temperature, top_k, top_p)
        probabilities = torch.softmax(filtered, dim=-1)
        token = torch.multinomial(probabilities, 1, generator=generator)  # (1, 1)
        tokens.append(int(token))
        log_probs.append(float(torch.log_softmax(logits.float(), dim=-1)[0, token]))
        if stop_at_eos and int(token) == EOS:
            break
        logits = model(token, cache=cache).logits[:, -1]
    return torch.tensor(tokens, dtype=torch.long), torch.tensor(log_probs)
