"""Infilling with MusicLM (``infill_music_lm``): a causal model as trained (no fill-in-the-middle training), by sampling
and reranking: N candidates for bars i..j are drawn from the left context under the token grammar,
each ends where it opens bar j + 1 (or ends the piece when bar j was the last), and the original
right context (bars j + 1 ..) is appended. A candidate scores ``log p(candidate | left) +
log p(right | left, candidate)`` under the model; the best one (or one drawn by those scores) wins.
Only the right side can tell the candidates apart beyond their own likelihood, so this is
the posterior of the candidates given both sides, restricted to what the left-to-right model samples.
Rules on the candidates keep the right side exact: each bar restates the original time signature,
no Tempo is generated (a tempo change inside the original bars i..j is dropped, and the tempo in
force at bar j + 1 is restated there), and a bar longer than ``max_bar_tokens`` is closed.
"""

from __future__ import annotations

import numpy as np
import torch

from musefm.data.dataset import BOS, EOS
from musefm.data.tokenize import bar_token_ids, decode
from musefm.errors import MusefmError
from musefm.generation.infill import InfillResult, check_bars, piece_ids, piece_programs


class InfillGrammar:
    """A ``GrammarConstraint`` plus the rules that make a candidate fill exactly bars i..j.

    The candidate opens with a Bar; each bar restates its original TimeSig; no Tempo and no EOS,
    except that when bar i is the piece's first bar it opens with ``Position_0`` and the piece's
    ``opening_tempo``, as MidiTok writes a piece's start; a bar that reached ``max_bar_tokens`` may
    only finish its note group and close. The Bar that would open bar j + 1 (or, when ``may_end``,
    an EOS after bar j) ends the candidate: then only EOS is allowed, so the sampler stops the row.
    """

    def __init__(self, inner, num_bars: int, time_signatures: list[int | None], max_bar_tokens: int,
                 opening_tempo: int | None = None, may_end: bool = False):
        self.inner = inner
        self.vocab_size = inner.vocab_size
        self.num_bars, self.time_signatures, self.max_bar_tokens = num_bars, time_signatures, max_bar_tokens
        self.opening_tempo, self.may_end = opening_tempo, may_end
        types = np.asarray(inner.token_types)
        self.is_bar = torch.from_numpy(types == "Bar")
        self.is_tempo = torch.from_numpy(types == "Tempo")
        # What an over-long bar may still do: finish the note group in progress, or close.
        self.closing = torch.from_numpy(np.isin(types, ["Bar", "Pitch", "PitchDrum", "Velocity", "Duration"]))
        self.group_start = torch.from_numpy(types == "Program")
        self.forced = {}  # one-token masks
        position_0 = inner.position_ids[0] if len(inner.position_ids) else -1
        self.opening = [int(position_0), opening_tempo] if opening_tempo is not None and position_0 >= 0 else []
        self._masks: dict = {}

    def _only(self, token_id: int) -> torch.Tensor:
        if token_id not in self.forced:
            self.forced[token_id] = torch.zeros(self.vocab_size, dtype=torch.bool)
            self.forced[token_id][token_id] = True
        return self.forced[token_id]

    # A state: (inner state, bars opened, tokens in the current bar, opening tokens written, ended)
    def start(self, prefix_ids):
        return (self.inner.start(prefix_ids), 0, 0, 0, False)

    def allowed(self, state) -> torch.Tensor:
        mask = self._masks.get(state)
        if mask is None:
            mask = self._masks[state] = self._build(state)
        return mask

    def _build(self, state) -> torch.Tensor:
        inner_state, opened, in_bar, opening_written, ended = state
        if ended:
            return self._only(EOS)
        if opened == 0:
            return self.is_bar & self.inner.allowed(inner_state)
        if inner_state.kind == "Bar" and self.time_signatures[opened - 1] is not None:
            return self._only(self.time_signatures[opened - 1])
        if opened == 1 and opening_written < len(self.opening):
            return self._only(self.opening[opening_written])
        mask = self.inner.allowed(inner_state).clone()
        mask[self.is_tempo] = False
        end_here = self.may_end and opened == self.num_bars and bool(mask[EOS])
        if in_bar >= self.max_bar_tokens:
            closing = self.closing | self.group_start if inner_state.kind == "Position" else self.closing
            narrowed = mask & closing
            mask = narrowed if narrowed.any() else mask
        mask[EOS] = end_here
        return mask

    def advance(self, state, token_id: int):
        inner_state, opened, in_bar, opening_written, ended = state
        token_id = int(token_id)
        if ended or token_id == EOS:
            return (inner_state, opened, in_bar, opening_written, True)
        if self.is_bar[token_id]:
            if opened == self.num_bars:
                return (inner_state, opened, in_bar, opening_written, True)
            return (self.inner.advance(inner_state, token_id), opened + 1, 0, opening_written, False)
        if opened == 1 and opening_written < len(self.opening) and token_id == self.opening[opening_written]:
            opening_written += 1
        return (self.inner.advance(inner_state, token_id), opened, min(in_bar + 1, self.max_bar_tokens),
                opening_written, False)


def _tempos(types: np.ndarray, ids: np.ndarray) -> list[int]:
    """The Tempo ids among ``ids``, in order."""
    return [int(token) for token in ids if types[token] == "Tempo"]


def _restate_tempo(tokenizer, types: np.ndarray, right: np.ndarray, tempo: int) -> np.ndarray:
    """``right`` (starting at a Bar) with ``tempo`` stated at its first bar's Position_0."""
    head = 1 + int(len(right) > 1 and types[right[1]] == "TimeSig")  # after Bar (and TimeSig)
    position_0 = tokenizer.vocab["Position_0"]
    if head < len(right) and right[head] == position_0:
        if head + 1 < len(right) and types[right[head + 1]] == "Tempo":
            return right  # it states its own tempo
        return np.concatenate([right[: head + 1], [tempo], right[head + 1 :]])
    return np.concatenate([right[:head], [position_0, tempo], right[head:]])


@torch.no_grad()
def score_candidates(model, prompt: np.ndarray, candidates: list[np.ndarray], right: np.ndarray
                     ) -> list[tuple[np.ndarray, float]]:
    """Per candidate: (log p of each candidate token (n,), log p of ``right`` after it), both given ``prompt``.

    One pass per candidate over ``prompt[-W:] + candidate + right`` with the sampler's sliding window
    W (the training context): within W tokens this is a plain forward pass, and the candidate tokens
    get the log-probabilities the sampler drew them from (before temperature and filtering).
    """
    window = model.config.max_seq_len
    device = next(model.parameters()).device
    context = np.asarray(prompt, dtype=np.int64)[-window:]
    scores = []
    model.eval()
    for candidate in candidates:
        sequence = torch.as_tensor(np.concatenate([context, candidate, right]), dtype=torch.long, device=device)
        cache = model.init_cache(1, max_length=window)
        logits = model(sequence[None], cache=cache).logits[0, :-1].float()  # (T - 1, V): predicts sequence[1:]
        token_log_probs = torch.log_softmax(logits, -1).gather(-1, sequence[1:, None])[:, 0].cpu().numpy()
        first = len(context) - 1  # token_log_probs[first] is that of the candidate's first token
        middle = token_log_probs[first : first + len(candidate)]
        scores.append((middle, float(token_log_probs[first + len(candidate):].sum())))
    return scores


@torch.no_grad()
def infill_music_lm(model, tokenizer, piece, bars, *, num_candidates: int = 8, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0, select: str = "best",
                    right_context_tokens: int | None = None, max_bar_tokens: int | None = None,
                    constraint=None) -> InfillResult:
    """Regenerate bars ``bars = (i, j)`` (0-based, inclusive) of ``piece`` with a causal MusicLM.

    ``piece``: a Score or REMI base ids (T,) (a leading BOS / trailing EOS is dropped).
    ``num_candidates`` are drawn (``temperature``/``top_k``/``top_p``, ``seed``) and scored by
    ``log p(candidate | left) + log p(right | left, candidate)``; ``select`` "best" keeps the highest,
    "sample" draws one with probability proportional to exp(score). ``right_context_tokens``: how
    much of the right side is scored (default: the model's context, W; the whole right side ends
    with EOS). ``max_bar_tokens``: a longer bar is closed (default: twice the piece's longest bar).
    ``constraint``: a ``GrammarConstraint`` carrying musical constraints (default: the grammar, with
    the programs the piece uses).
    """
    from musefm.generation.constraints import GrammarConstraint
    from musefm.generation.sampling import sample_batch

    if tokenizer.is_multi_voc:
        raise MusefmError(f"{type(tokenizer).__name__}: MusicLM infilling needs a single token stream (REMI)")
    if num_candidates < 1:
        raise MusefmError(f"num_candidates: must be at least 1, got {num_candidates}")
    if select not in ("best", "sample"):
        raise MusefmError(f"select: must be 'best' or 'sample', got {select!r}")
    body = piece_ids(tokenizer, piece)
    bar_ids = bar_token_ids(tokenizer)
    if not len(bar_ids):
        raise MusefmError(f"{type(tokenizer).__name__} has no Bar tokens to infill between; use REMI")
    if len(tokenizer) > model.config.vocab_size:
        raise MusefmError(f"tokenizer: {len(tokenizer)} tokens, but the model has a {model.config.vocab_size}-token "
                          f"vocabulary")
    starts = np.flatnonzero(np.isin(body, bar_ids))  # bar k opens at starts[k]
    if not len(starts) or starts[0] != 0:
        raise MusefmError("piece: REMI tokens must open with a Bar")
    first, last = check_bars(bars, len(starts))
    end = int(starts[last + 1]) if last + 1 < len(starts) else len(body)
    left, middle, right = body[: starts[first]], body[starts[first] : end], body[end:]

    if constraint is None:  # the plain grammar, and the instruments the piece already plays
        constraint = GrammarConstraint(tokenizer, programs=piece_programs(tokenizer, body))
    types = np.asarray(constraint.token_types, dtype=object)
    bar_lengths = np.diff(np.append(starts, len(body)))
    max_bar_tokens = max_bar_tokens or max(16, 2 * int(bar_lengths.max()))
    bar_count = last - first + 1
    signatures = [int(body[s + 1]) if s + 1 < len(body) and types[body[s + 1]] == "TimeSig" else None
                  for s in starts[first : last + 1]]
    opening = _tempos(types, body[: starts[1] if len(starts) > 1 else len(body)])
    opening_tempo = opening[0] if first == 0 and opening else None  # the piece must state its tempo
    rules = InfillGrammar(constraint, bar_count, signatures, max_bar_tokens, opening_tempo, may_end=not len(right))
    prompt = np.concatenate([[BOS], left]).astype(np.int64)
    try:
        rules.start(prompt)
    except MusefmError as error:
        raise MusefmError(f"piece: the grammar rejects the music before bar {first} ({error})") from None

    # The tempo in force after bar j: restated at bar j + 1 when the new bars no longer lead to it.
    if len(right):
        after_original = (_tempos(types, np.concatenate([left, middle])) or [None])[-1]
        after_new = opening_tempo if first == 0 else (_tempos(types, left) or [None])[-1]
        if after_original is not None and after_original != after_new:
            right = _restate_tempo(tokenizer, types, right, after_original)

    runs = sample_batch(model, torch.as_tensor(prompt), num_candidates, bar_count * (max_bar_tokens + 6) + 2,
                        temperature, top_k, top_p, seed, stop_at_eos=True, constraint=rules)
    candidates = []
    for tokens, _ in runs:  # each ends at the Bar opening bar j + 1, or at EOS after bar j
        tokens = tokens.numpy()
        opened = np.flatnonzero(np.isin(tokens, bar_ids))
        ended = np.flatnonzero(tokens == EOS)
        if len(opened) > bar_count:
            candidates.append(tokens[: opened[bar_count]].astype(np.int64))
        elif len(opened) == bar_count and len(ended):
            candidates.append(tokens[: ended[0]].astype(np.int64))
    if not candidates:
        raise MusefmError(f"no candidate closed bar {last} within its token budget")

    budget = model.config.max_seq_len if right_context_tokens is None else right_context_tokens
    scored_right = np.concatenate([right, [EOS]]) if len(right) < budget else right[:budget]
    scores = score_candidates(model, prompt, candidates, scored_right.astype(np.int64))
    totals = np.array([float(middle_lp.sum()) + right_lp for middle_lp, right_lp in scores])
    if select == "best":
        chosen = int(np.argmax(totals))
    else:
        weights = torch.softmax(torch.as_tensor(totals), dim=0)
        chosen = int(torch.multinomial(weights, 1, generator=torch.Generator().manual_seed(seed + 1)))
    ids = np.concatenate([left, candidates[chosen], right]).astype(np.int64)
    return InfillResult(
        ids=ids, score=decode(tokenizer, ids), bars=(first, last),
        span=(len(left), len(left) + len(candidates[chosen])), log_probs=scores[chosen][0], method="rerank",
        seed=seed, candidates=candidates,
        details={"num_candidates": num_candidates, "complete_candidates": len(candidates), "chosen": chosen,
                 "select": select, "scores": [round(float(t), 4) for t in totals],
                 "candidate_log_probs": [round(float(m.sum()), 4) for m, _ in scores],
                 "right_log_probs": [round(r, 4) for _, r in scores],
                 "right_context_tokens": int(len(scored_right)), "max_bar_tokens": max_bar_tokens})
