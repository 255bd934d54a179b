"""Continuations of a prompt with a causal model (MusicLM): the Python side of ``musefm generate``.

``generate(model, tokenizer, prompt_ids, ...) -> (ids, Score)`` for one continuation and
``generate_samples`` for several, with per-token log-probabilities; stop rules (a token cap, a bar
count or a duration), sampling settings, beam search and a grammar constraint.

Decisions:

- Sample ``k`` is drawn with seed ``seed + k`` on its own (not in a shared batch), so any sample is
  reproduced alone by ``--seed S+k --num-samples 1``, whatever ``--num-samples`` was.
- ``max_tokens`` is a cap: the model may end the piece earlier with EOS. ``bars`` and ``seconds`` are
  targets: EOS is held back until they are reached, then the continuation is cut exactly there (before
  the Bar token that would open one bar too many; at the shortest prefix whose music lasts long
  enough). They are generated in chunks of ``CHUNK_TOKENS`` through the sampler's sliding cache
  window, so they run past the training context, up to ``max_tokens`` or ``HARD_CAP_CONTEXTS`` x the
  context.
- Beam search (``beam > 0``) is deterministic and ranks by mean log-probability per token; it stops
  on ``max_tokens`` only (a beam cannot be cut at a bar count and resumed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from symusic import Score

from musefm.data.dataset import EOS
from musefm.data.tokenize import bar_token_ids
from musefm.errors import MusefmError
from musefm.generation.sampling import constrain_logits, sample, token_decoder

CHUNK_TOKENS = 64  # bars/seconds rules: new tokens drawn between two checks of the rule
HARD_CAP_CONTEXTS = 16  # bars/seconds rules: at most this many training contexts of new tokens
DEFAULT_MAX_TOKENS = 512  # when no stop rule is given


@dataclass
class Sample:
    """One generated continuation: model ids (BOS, prompt, new tokens) and what they decode to."""

    ids: np.ndarray  # (T,) model ids, BOS first; BPE ids for a BPE tokenizer
    prompt_length: int  # ids[:prompt_length] is the prompt (BOS included)
    log_probs: np.ndarray  # (T - prompt_length,) per new token, under the (constrained) model
    score: Score  # prompt + continuation
    stopped: str  # "eos", "max_tokens", "bars", "seconds" or "cap"
    seed: int | None  # None for beam search

    @property
    def new_ids(self) -> np.ndarray:
        return self.ids[self.prompt_length:]


# -- tokens and music ------------------------------------------------------------------------------------


def music_ids(tokenizer, ids) -> np.ndarray:
    """Base ids of the musical tokens of model ids (special tokens dropped, BPE undone)."""
    from musefm.data.tokenize import undo_bpe

    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[~np.isin(ids, tokenizer.special_tokens_ids)]
    return np.asarray(undo_bpe(tokenizer, ids), dtype=np.int64)


def decode_ids(tokenizer, ids) -> Score:
    """A Score from model ids (specials and BPE handled); an empty Score when no music is left."""
    from musefm.data.tokenize import decode

    base = music_ids(tokenizer, ids)
    return decode(tokenizer, base) if len(base) else Score(tokenizer.time_division)


def seconds_of(score: Score) -> float:
    return float(score.to("second").end()) if score.note_num() else 0.0


def check_compatible(model, tokenizer, label: str = "tokenizer") -> None:
    """MusefmError unless ``tokenizer`` can drive ``model`` (single stream, vocabulary within the model's)."""
    if tokenizer.is_multi_voc:
        raise MusefmError(f"{label}: {type(tokenizer).__name__} has one vocabulary per note element, but a "
                          f"music-lm reads a single token stream (REMI or TSD)")
    vocab_size = model.config.vocab_size
    if len(tokenizer) > vocab_size:
        raise MusefmError(f"{label}: {len(tokenizer)} tokens, but the model was trained on a {vocab_size}-token "
                          f"vocabulary")


def check_prompt_ids(model, prompt_ids) -> torch.Tensor:
    """The prompt as a (T,) long tensor; MusefmError when it is not ids of the model's vocabulary."""
    prompt = torch.as_tensor(np.asarray(prompt_ids), dtype=torch.long)
    if prompt.ndim != 1 or len(prompt) == 0:
        raise MusefmError(f"prompt: expected a non-empty (T,) sequence of token ids, got shape {tuple(prompt.shape)}")
    if int(prompt.min()) < 0 or int(prompt.max()) >= model.config.vocab_size:
        raise MusefmError(f"prompt: ids must lie in 0..{model.config.vocab_size - 1} (the model's vocabulary), "
                          f"got {int(prompt.min())}..{int(prompt.max())}")
    return prompt


class HoldEnd:
    """A constraint (or none) that also forbids EOS: used while a bars/seconds target is not reached."""

    def __init__(self, inner, vocab_size: int):
        self.inner = inner
        self.vocab_size = inner.vocab_size if inner is not None else vocab_size
        self._masks: dict = {}

    def start(self, prefix_ids):
        return self.inner.start(prefix_ids) if self.inner is not None else None

    def allowed(self, state) -> torch.Tensor:
        mask = self._masks.get(state)
        if mask is None:
            mask = self.inner.allowed(state).clone() if self.inner is not None else torch.ones(self.vocab_size, dtype=torch.bool)
            mask[EOS] = False
            self._masks[state] = mask
        return mask

    def advance(self, state, token_id: int):
        return self.inner.advance(state, token_id) if self.inner is not None else None


def _chunk_seed(seed: int, chunk: int) -> int:
    """Chunk 0 uses the seed itself (its tokens equal a one-call run's); later ones derive from it."""
    if chunk == 0:
        return seed
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, chunk]).generate_state(1)[0])


def _bars_cut(tokenizer, new_ids: list[int], bars: int, bar_ids: np.ndarray, expansions: dict) -> int | None:
    """Index of the new token that opens bar ``bars + 1`` (cut before it), or None if not reached."""
    from musefm.data.tokenize import undo_bpe

    seen = 0
    for index, token_id in enumerate(new_ids):
        if token_id not in expansions:
            expansions[token_id] = int(np.isin(undo_bpe(tokenizer, np.array([token_id])), bar_ids).sum())
        if expansions[token_id]:
            if seen >= bars:
                return index
            seen += expansions[token_id]
    return None


def _seconds_cut(tokenizer, prompt: list[int], new_ids: list[int], seconds: float) -> int | None:
    """The shortest number of new tokens whose music lasts ``seconds`` past the prompt, or None."""
    start = seconds_of(decode_ids(tokenizer, prompt))

    def lasts(length: int) -> bool:
        return seconds_of(decode_ids(tokenizer, prompt + new_ids[:length])) - start >= seconds

    if not lasts(len(new_ids)):
        return None
    low, high = 0, len(new_ids)  # lasts(high) holds; the end time only grows with the prefix
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if lasts(middle) else (middle + 1, high)
    return high


def _sample_one(model, tokenizer, prompt: torch.Tensor, seed: int, max_tokens: int, bars: int, seconds: float,
                temperature: float, top_k: int, top_p: float, constraint,
                decoder) -> tuple[list[int], list[float], str]:
    window = model.config.max_seq_len
    if not (bars or seconds):
        tokens, log_probs = sample(model, prompt, max_tokens, temperature, top_k, top_p, seed, window=window,
                                   constraint=constraint, decoder=decoder)
        stopped = "eos" if len(tokens) and int(tokens[-1]) == EOS else "max_tokens"
        return tokens.tolist(), log_probs.tolist(), stopped

    limit = max_tokens or HARD_CAP_CONTEXTS * window
    hold_end = HoldEnd(constraint, model.config.vocab_size)
    prompt_list, bar_ids, expansions = prompt.tolist(), bar_token_ids(tokenizer), {}
    new_ids: list[int] = []
    new_log_probs: list[float] = []
    chunk = 0
    while len(new_ids) < limit:
        context = torch.tensor(prompt_list + new_ids, dtype=torch.long)
        tokens, log_probs = sample(model, context, min(CHUNK_TOKENS, limit - len(new_ids)), temperature, top_k,
                                   top_p, _chunk_seed(seed, chunk), stop_at_eos=False, window=window,
                                   constraint=hold_end, decoder=decoder)
        new_ids += tokens.tolist()
        new_log_probs += log_probs.tolist()
        chunk += 1
        cut = (_bars_cut(tokenizer, new_ids, bars, bar_ids, expansions) if bars
               else _seconds_cut(tokenizer, prompt_list, new_ids, seconds))
        if cut is not None:
            return new_ids[:cut], new_log_probs[:cut], "bars" if bars else "seconds"
    return new_ids, new_log_probs, "max_tokens" if max_tokens else "cap"


@torch.no_grad()
def generate_samples(model, tokenizer, prompt_ids, *, num_samples: int = 1, max_tokens: int = 0, bars: int = 0,
                     seconds: float = 0.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.95,
                     seed: int = 0, beam: int = 0, constraint=None) -> list[Sample]:
    """``num_samples`` continuations of ``prompt_ids`` (model ids, BOS first; ``[BOS]`` = from scratch).

    Sampling draws sample ``k`` with seed ``seed + k``; ``beam > 0`` returns the best ``num_samples``
    beams of one beam search. Stop rules as in ``GenerateConfig`` (none given: ``DEFAULT_MAX_TOKENS``).
    ``constraint``: a ``GrammarConstraint`` over ``tokenizer``.
    """
    from musefm.generation.beam import beam_search

    check_compatible(model, tokenizer)
    prompt = check_prompt_ids(model, prompt_ids)
    if bars and not len(bar_token_ids(tokenizer)):
        raise MusefmError(f"bars: counts Bar tokens, which {type(tokenizer).__name__} has none of; use seconds")
    if not (max_tokens or bars or seconds):
        max_tokens = DEFAULT_MAX_TOKENS
    model.eval()
    decoder = token_decoder(model)  # one for every sample and chunk
    runs = []
    if beam:
        if bars or seconds:
            raise MusefmError("beam: beam search stops on max_tokens only; bars and seconds need sampling")
        for tokens, _ in beam_search(model, prompt, beam, max_tokens, length_penalty=1.0, constraint=constraint)[:num_samples]:
            # Per-token log-probabilities of the chosen beam, under the same (constrained) distribution.
            runs.append((tokens.tolist(), _score_tokens(model, prompt, tokens, constraint, decoder), None))
    else:
        for k in range(num_samples):
            tokens, log_probs, stopped = _sample_one(model, tokenizer, prompt, seed + k, max_tokens, bars, seconds,
                                                     temperature, top_k, top_p, constraint, decoder)
            runs.append((tokens, log_probs, (stopped, seed + k)))
    samples = []
    for tokens, log_probs, sampled in runs:
        ids = np.array(prompt.tolist() + list(tokens), dtype=np.int64)
        stopped = sampled[0] if sampled else ("eos" if tokens and tokens[-1] == EOS else "max_tokens")
        samples.append(Sample(ids=ids, prompt_length=len(prompt), log_probs=np.asarray(log_probs, dtype=np.float64),
                              score=decode_ids(tokenizer, ids), stopped=stopped, seed=sampled[1] if sampled else None))
    return samples


def _score_tokens(model, prompt: torch.Tensor, tokens: torch.Tensor, constraint, decoder) -> list[float]:
    """Log-probabilities of ``tokens`` after ``prompt``, restricted to the allowed tokens when constrained."""
    window = model.config.max_seq_len
    cache = model.init_cache(1, max_length=window)
    device = next(model.parameters()).device
    logits = model(prompt[-window:].to(device).unsqueeze(0), cache=cache).logits[:, -1]  # (1, V)
    state = constraint.start(prompt) if constraint is not None else None
    log_probs = []
    for token in tokens.tolist():
        logits = logits.float()
        if constraint is not None:
            logits = constrain_logits(logits, constraint, [state])
            state = constraint.advance(state, token)
        log_probs.append(float(torch.log_softmax(logits, dim=-1)[0, token]))
        logits = decoder(torch.tensor([token], device=device), cache)  # (1, V)
    return log_probs


def generate(model, tokenizer, prompt_ids, *, max_tokens: int = 0, bars: int = 0, seconds: float = 0.0,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 0.95, seed: int = 0, beam: int = 0,
             constraint=None) -> tuple[np.ndarray, Score]:
    """One continuation of ``prompt_ids``: (model ids (T,), prompt + new tokens; the Score they decode to).

    The Python entry point; ``main`` runs the same code (``generate_samples``) for several samples.
    """
    sample = generate_samples(model, tokenizer, prompt_ids, num_samples=1, max_tokens=max_tokens, bars=bars,
                              seconds=seconds, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                              beam=beam, constraint=constraint)[0]
    return sample.ids, sample.score
