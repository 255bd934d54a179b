"""Sampling continuations from a causal model with its KV cache.

Temperature, top-k and nucleus (top-p) filtering, a seeded generator (the same seed gives the same
music), a sliding cache window so generation can run past the training context at a flat cost
per token, and an optional grammar constraint (``musefm.generation.constraints``) whose disallowed
tokens get -inf before any filtering. ``sample_batch`` draws several continuations of one prompt
in one batch: a step costs about the same for 1 row as for 50, since small models are bound by
per-step overhead rather than arithmetic.
"""

from __future__ import annotations

import torch

from musefm.data.dataset import EOS
from musefm.errors import MusefmError


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


def constrain_logits(logits: torch.Tensor, constraint, states: list) -> torch.Tensor:
    """Logits (B, V) with the tokens ``constraint`` forbids after each row's state set to -inf.

    A model whose vocabulary is wider than the tokenizer's (padded for speed) never gets the extra ids.
    """
    allowed = torch.stack([constraint.allowed(state) for state in states]).to(logits.device)  # (B, V_grammar)
    if allowed.size(-1) > logits.size(-1):
        raise MusefmError(f"constraint: its tokenizer has {allowed.size(-1)} tokens but the model only "
                          f"{logits.size(-1)}")
    if allowed.size(-1) < logits.size(-1):
        allowed = torch.nn.functional.pad(allowed, (0, logits.size(-1) - allowed.size(-1)), value=False)
    return logits.masked_fill(~allowed, float("-inf"))


def token_decoder(model):
    """``(tokens (B,), cache) -> next-token logits (B, V)``: the model's fast ``decoder()`` when it has
    one, else its cached forward pass over one token per row."""
    if hasattr(model, "decoder"):
        return model.decoder()
    return lambda tokens, cache: model(tokens[:, None], cache=cache).logits[:, -1]


@torch.no_grad()
def sample_batch(model, prompt: torch.Tensor, num_samples: int, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
                 window: int | None = None, constraint=None, decoder=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``num_samples`` continuations of ``prompt`` (T,), drawn together; per row (new tokens (N,), log-probs (N,)).

    The cache keeps the last ``window`` positions (default: the model's training context).
    ``constraint``: a ``GrammarConstraint`` (or any object with ``start``/``allowed``/``advance``); it
    reads the whole prompt, even the part that falls outside the window. Log-probs are those of the
    model's distribution before temperature and top-k/top-p, restricted to the allowed tokens when
    constrained. With ``stop_at_eos`` a row ends at its EOS (included) and the batch ends once all have.
    ``decoder``: ``token_decoder(model)`` made once by a caller that samples many times (making one
    transposes the weights).
    """
    model.eval()
    device = next(model.parameters()).device
    window = window or model.config.max_seq_len
    states = [constraint.start(prompt)] * num_samples if constraint is not None else None
    context = prompt[-window:].to(device).unsqueeze(0).expand(num_samples, -1)  # (B, T)
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = model.init_cache(num_samples, max_length=window)
    logits = model(context, cache=cache).logits[:, -1]  # (B, V)
    decode_step = decoder or token_decoder(model)
    tokens, log_probs = [], []  # per step (B,)
    lengths = torch.full((num_samples,), max_new_tokens)  # (B,) tokens kept per row
    finished = torch.zeros(num_samples, dtype=torch.bool)  # (B,)
    for step in range(max_new_tokens):
        logits = logits.float()
        if constraint is not None:
            logits = constrain_logits(logits, constraint, states)
        filtered = filter_logits(logits, temperature, top_k, top_p)
        probabilities = torch.softmax(filtered, dim=-1)
        token = torch.multinomial(probabilities, 1, generator=generator)  # (B, 1)
        tokens.append(token[:, 0].cpu())
        log_probs.append(torch.log_softmax(logits, dim=-1).gather(-1, token)[:, 0].cpu())
        if constraint is not None:
            # A finished row's later draws are discarded; its state stays at EOS (only EOS allowed).
            states = [state if done else constraint.advance(state, int(next_id))
                      for state, done, next_id in zip(states, finished.tolist(), token[:, 0].tolist())]
        if stop_at_eos:
            ended = (token[:, 0].cpu() == EOS) & ~finished
            lengths[ended] = step + 1
            finished |= ended
            if bool(finished.all()):
                break
        logits = decode_step(token[:, 0], cache)  # (B, V)
    tokens = torch.stack(tokens, dim=1).long() if tokens else torch.zeros(num_samples, 0, dtype=torch.long)  # (B, N)
    log_probs = torch.stack(log_probs, dim=1) if log_probs else torch.zeros(num_samples, 0)  # (B, N)
    return [(tokens[row, : lengths[row]], log_probs[row, : lengths[row]]) for row in range(num_samples)]


def sample(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True, window: int | None = None,
           constraint=None, decoder=None):
    """Continue ``prompt`` (T,) by up to ``max_new_tokens``; returns (new tokens (N,), log-probs (N,)).

    The cache keeps the last ``window`` positions (default: the model's training context).
    ``constraint``: a ``GrammarConstraint``; tokens it forbids get -inf before filtering.
    ``decoder``: as in ``sample_batch``.
    """
    return sample_batch(model, prompt, 1, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos,
                        window, constraint, decoder)[0]
