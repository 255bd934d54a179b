import math

import numpy as np
import pytest

from musefm.models.ngram import KneserNeyLM


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_distributions_sum_to_one(order):
    rng = np.random.default_rng(order)
    sequences = [rng.integers(0, 7, size=40) for _ in range(15)]
    model = KneserNeyLM(order, vocab_size=7).fit(sequences)
    for context in [(), (3,), (1, 2), (6, 6, 6, 6), (0, 1, 2, 3, 4, 5)]:
        assert sum(model.probability(context, t) for t in range(7)) == pytest.approx(1.0, abs=1e-12)


def test_bigram_hand_computed():
    # Sequences a b a c (ids 0 1 0 2): bigram counts (0,1) (1,0) (0,2); D = n1/(n1+2 n2) = 3/3 = 1.
    model = KneserNeyLM(2, vocab_size=3).fit([[0, 1, 0, 2]])
    assert model.discounts_[1] == pytest.approx(1.0)
    # Unigram continuation counts: 1 follows {0}, 0 follows {1}, 2 follows {0}: each 1 of 3 -> discounted
    # with D1 = 1 (all singletons) to the uniform: P1(w) = 0 + 1 * 3/3 * 1/3 = 1/3.
    # P(1 | 0) = max(1 - 1, 0)/2 + 1 * 2/2 * P1(1) = 1/3.
    assert model.probability((0,), 1) == pytest.approx(1 / 3)
    log_likelihood, count = model.log_likelihood([0, 1, 0, 2])
    assert count == 3 and log_likelihood == pytest.approx(3 * math.log(1 / 3))


def test_more_context_helps_on_a_repeating_pattern():
    pattern = [0, 1, 2, 0, 1, 3] * 30
    low, high = KneserNeyLM(1).fit([pattern]), KneserNeyLM(3).fit([pattern])
    assert high.perplexity([pattern]) < low.perplexity([pattern])
