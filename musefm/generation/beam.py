"""Beam search over a causal model with its KV cache.

The live beams run as one batch through the model; when beams are reselected, every cached key and
value row is gathered from the beam it continues (``reorder_cache``), so each step feeds one token
per beam instead of re-reading the whole sequence.

Hypotheses are ranked by length-normalised log-probability, ``sum log p / length ** length_penalty``
(length = new tokens, EOS included): 0 ranks by total log-probability (short sequences win), 1 by
mean log-probability per token. Search ends when ``beam_size`` hypotheses have ended with EOS and no
live beam scores better at its current length (the usual criterion: it makes a beam of 1 exactly
greedy decoding), or after ``max_new_tokens``.
"""

from __future__ import annotations

import torch

from musefm.data.dataset import EOS
from musefm.errors import MusefmError
from musefm.generation.sampling import constrain_logits, token_decoder
from musefm.modules.attention import KVCache


def reorder_cache(cache: KVCache, rows: torch.Tensor) -> None:
    """Make row ``i`` of ``cache`` a copy of its row ``rows[i]`` (the beam that row ``i`` continues).

    ``rows`` (B',) long; B' may differ from the cache's batch size (beams appear or run out).
    """
    for layer in range(cache.n_layers):
        if cache.keys[layer] is not None:
            rows_here = rows.to(cache.keys[layer].device)
            cache.keys[layer] = cache.keys[layer].index_select(0, rows_here)  # (B', H, capacity, Dh)
            cache.values[layer] = cache.values[layer].index_select(0, rows_here)  # (B', H, capacity, Dh)
    if cache.key_valid is not None:
        cache.key_valid = cache.key_valid.index_select(0, rows.to(cache.key_valid.device))  # (B', capacity)
    cache.batch_size = len(rows)


@torch.no_grad()
def beam_search(model, prompt: torch.Tensor, beam_size: int, max_new_tokens: int, length_penalty: float = 1.0,
                constraint=None, eos_id: int = EOS) -> list[tuple[torch.Tensor, float]]:
    """The best continuations of ``prompt`` (T,): up to ``beam_size`` (new token ids (N,), score), best first.

    ``constraint``: a ``GrammarConstraint`` (tokens it forbids are never chosen; log-probabilities
    are those of the model restricted to the allowed tokens, as in ``sample``).
    """
    if beam_size < 1:
        raise MusefmError(f"beam_size: must be at least 1, got {beam_size}")
    if max_new_tokens < 1:
        raise MusefmError(f"max_new_tokens: must be at least 1, got {max_new_tokens}")
    model.eval()
    device = next(model.parameters()).device
    window = model.config.max_seq_len
    states = [constraint.start(prompt)] if constraint is not None else None
    cache = model.init_cache(1, max_length=window)
    logits = model(prompt[-window:].to(device).unsqueeze(0), cache=cache).logits[:, -1]  # (1, V)
    decode_step = token_decoder(model)

    live_tokens: list[list[int]] = [[]]  # per live beam, its new tokens so far
    live_sums = torch.zeros(1, dtype=torch.float64)  # (L,) summed log-probabilities
    finished: list[tuple[float, list[int]]] = []  # (score, tokens), best first, at most beam_size

    def normalised(total: float, length: int) -> float:
        return total / length**length_penalty

    for step in range(max_new_tokens):
        length = step + 1
        logits = logits.float()
        if constraint is not None:
            logits = constrain_logits(logits, constraint, states)
        log_probs = torch.log_softmax(logits, dim=-1).cpu().double()  # (L, V)
        vocab_size = log_probs.size(-1)
        candidates = (live_sums[:, None] + log_probs).flatten()  # (L * V,)
        # Each beam has one EOS candidate, so the best 2B hold at least B that go on.
        values, indices = candidates.topk(min(2 * beam_size, candidates.numel()))
        parents, next_tokens, next_sums = [], [], []
        for rank, (total, index) in enumerate(zip(values.tolist(), indices.tolist())):
            if total == float("-inf"):
                break  # the rest are forbidden by the constraint
            parent, token = divmod(index, vocab_size)
            if token == eos_id:
                # An ended hypothesis counts only if it would have held one of the B beam slots.
                if rank < beam_size:
                    finished.append((normalised(total, length), live_tokens[parent] + [token]))
                continue
            parents.append(parent)
            next_tokens.append(token)
            next_sums.append(total)
            if len(parents) == beam_size:
                break
        finished = sorted(finished, key=lambda hypothesis: -hypothesis[0])[:beam_size]
        live_tokens = [live_tokens[parent] + [token] for parent, token in zip(parents, next_tokens)]
        live_sums = torch.tensor(next_sums, dtype=torch.float64)
        if not parents:
            break
        if len(finished) == beam_size and normalised(max(next_sums), length) <= finished[-1][0]:
            live_tokens = []  # none of them can enter the list at its current length
            break
        if constraint is not None:
            states = [constraint.advance(states[parent], token) for parent, token in zip(parents, next_tokens)]
        if step + 1 < max_new_tokens:
            reorder_cache(cache, torch.tensor(parents, dtype=torch.long))
            step_tokens = torch.tensor(next_tokens, dtype=torch.long, device=device)  # (L,)
            logits = decode_step(step_tokens, cache)  # (L, V)

    # Beams still running at the end compete with the ended ones at their own length.
    finished += [(normalised(float(total), len(tokens)), tokens) for total, tokens in zip(live_sums, live_tokens)]
    finished.sort(key=lambda hypothesis: -hypothesis[0])
    return [(torch.tensor(tokens, dtype=torch.long), score) for score, tokens in finished[:beam_size]]
