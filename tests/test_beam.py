import itertools

import numpy as np
import pytest
import torch

from musefm.data.tokenize import decode, encode, make_tokenizer
from musefm.errors import MusefmError
from musefm.generation.beam import beam_search, reorder_cache
from musefm.generation.constraints import GrammarConstraint
from musefm.models.music_lm import MusicLM, config_from_preset
from tests.conftest import make_score

BOS, EOS = 1, 2
PROMPT = torch.tensor([BOS, 4, 5])


def toy_model(vocab_size=6, seed=0) -> MusicLM:
    """A tiny MusicLM with large weights: peaked, well-separated distributions (no near-ties)."""
    torch.manual_seed(seed)
    model = MusicLM(config_from_preset("debug", vocab_size=vocab_size))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.5)
    return model.eval()


@torch.no_grad()
def sequence_log_prob(model, prompt, continuation) -> float:
    """Sum of log p(token | everything before), from one full forward pass (no cache)."""
    ids = torch.cat([prompt, continuation]).unsqueeze(0)  # (1, T + N)
    log_probs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)  # (T + N - 1, V)
    targets = ids[0, 1:]
    return float(log_probs[len(prompt) - 1 :].gather(-1, targets[len(prompt) - 1 :, None]).sum())


def every_continuation(vocab_size, max_new_tokens):
    """All continuations of up to ``max_new_tokens``: EOS ends one early, and only EOS does."""
    others = [token for token in range(vocab_size) if token != EOS]
    for length in range(1, max_new_tokens + 1):
        for head in itertools.product(others, repeat=length - 1):
            yield head + (EOS,)
            if length == max_new_tokens:
                for last in others:
                    yield head + (last,)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_a_beam_as_wide_as_the_space_finds_the_brute_force_ranking(length_penalty, one_thread):
    model = toy_model()
    space = [torch.tensor(tokens) for tokens in every_continuation(6, 4)]
    assert len(space) == 1 + 5 + 25 + 125 + 625
    brute_force = sorted(((sequence_log_prob(model, PROMPT, tokens) / len(tokens) ** length_penalty, tokens.tolist())
                          for tokens in space), key=lambda hypothesis: -hypothesis[0])
    assert brute_force[0][0] - brute_force[1][0] > 1e-4  # a unique best: the comparison is meaningful

    found = beam_search(model, PROMPT, beam_size=len(space), max_new_tokens=4, length_penalty=length_penalty)
    assert len(found) == len(space)
    assert found[0][0].tolist() == brute_force[0][1]
    # Every hypothesis, scored from the reordered KV cache, matches a full forward pass.
    expected = {tuple(tokens): score for score, tokens in brute_force}
    for tokens, score in found:
        assert score == pytest.approx(expected[tuple(tokens.tolist())], abs=1e-4)
    assert [score for _, score in found] == sorted((score for _, score in found), reverse=True)


@torch.no_grad()
def greedy(model, prompt, max_new_tokens):
    ids = prompt.clone()
    for _ in range(max_new_tokens):
        token = model(ids.unsqueeze(0)).logits[0, -1].argmax()
        ids = torch.cat([ids, token.view(1)])
        if int(token) == EOS:
            break
    return ids[len(prompt) :]


@pytest.mark.parametrize("vocab_size, max_new_tokens", [(6, 12), (40, 30)])
def test_a_beam_of_one_is_greedy_decoding(vocab_size, max_new_tokens, one_thread):
    for seed in range(4):
        model = toy_model(vocab_size, seed)
        expected = greedy(model, PROMPT, max_new_tokens)
        (tokens, score), = beam_search(model, PROMPT, beam_size=1, max_new_tokens=max_new_tokens)
        assert tokens.tolist() == expected.tolist()
        assert score == pytest.approx(sequence_log_prob(model, PROMPT, expected) / len(expected), abs=1e-4)


def test_beam_search_is_deterministic_and_wider_beams_score_no_worse(one_thread):
    model = toy_model(40, seed=3)
    first = beam_search(model, PROMPT, beam_size=5, max_new_tokens=16, length_penalty=1.0)
    again = beam_search(model, PROMPT, beam_size=5, max_new_tokens=16, length_penalty=1.0)
    assert [(tokens.tolist(), score) for tokens, score in first] == \
        [(tokens.tolist(), score) for tokens, score in again]
    assert len(first) == 5 and len({tuple(tokens.tolist()) for tokens, _ in first}) == 5
    narrow = beam_search(model, PROMPT, beam_size=1, max_new_tokens=16)[0][1]
    assert first[0][1] >= narrow - 1e-9


def test_reorder_cache_gathers_rows_of_every_layer(one_thread):
    model = toy_model(12)
    rows = torch.randint(0, 12, (3, 7), generator=torch.Generator().manual_seed(0))  # (B, T)
    cache = model.init_cache(3)
    with torch.no_grad():
        model(rows, cache=cache)
        reorder_cache(cache, torch.tensor([2, 2, 0, 1]))
        next_tokens = torch.tensor([[5], [6], [7], [8]])  # (B', 1)
        cached = model(next_tokens, cache=cache).logits[:, -1]  # (B', V)
        full = model(torch.cat([rows[[2, 2, 0, 1]], next_tokens], dim=1)).logits[:, -1]  # (B', V)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_constrained_beam_search_gives_well_formed_music(one_thread):
    tokenizer = make_tokenizer("remi")
    torch.manual_seed(0)
    model = MusicLM(config_from_preset("debug", vocab_size=len(tokenizer)))
    constraint = GrammarConstraint(tokenizer, key="A minor", programs=[0])
    # A prompt that stops right after a Program token: the search must complete that note in key.
    ids = encode(tokenizer, make_score(pitches=(64, 65, 67, 69)))
    second_note = np.flatnonzero(ids == tokenizer._vocab_base["Program_0"])[1]
    prompt = torch.from_numpy(np.r_[BOS, ids[: second_note + 1]].astype(np.int64))
    found = beam_search(model, prompt, beam_size=4, max_new_tokens=40, constraint=constraint)
    assert len(found) == 4
    a_minor = {9, 11, 0, 2, 4, 5, 7}
    for tokens, score in found:
        names = [tokenizer[int(i)] for i in tokens]
        assert names[0].startswith("Pitch_") and names[1].startswith("Velocity_") and names[2].startswith("Duration_")
        assert all(int(name.split("_")[1]) % 12 in a_minor for name in names if name.startswith("Pitch_"))
        assert all(name == "Program_0" for name in names if name.startswith("Program_"))
        sequence = np.r_[prompt.numpy(), tokens.numpy()]
        constraint.start(sequence)
        assert tokenizer.tokens_errors(sequence) == 0
        assert sum(len(track.notes) for track in decode(tokenizer, sequence).tracks) >= 2
        assert np.isfinite(score)


def test_bad_arguments_are_refused():
    model = toy_model()
    with pytest.raises(MusefmError, match="beam_size"):
        beam_search(model, PROMPT, beam_size=0, max_new_tokens=4)
    with pytest.raises(MusefmError, match="max_new_tokens"):
        beam_search(model, PROMPT, beam_size=2, max_new_tokens=0)
