"""A smoothed n-gram language model over token ids: the baseline any neural model must beat.

Interpolated Kneser-Ney (Chen & Goodman 1998) with one absolute discount per order estimated
from count-of-counts, D = n1 / (n1 + 2 n2). The highest order uses raw counts, lower orders
continuation counts (how many distinct contexts a token follows), and the recursion ends in a
uniform distribution over the vocabulary, so every token has a non-zero probability.
scikit-learn style: ``fit`` returns self, learned state ends in ``_``.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np


class KneserNeyLM:
    def __init__(self, order: int = 3, vocab_size: int | None = None):
        self.order = order
        self.vocab_size = vocab_size

    def fit(self, sequences) -> "KneserNeyLM":
        """Learn from an iterable of 1-D id sequences (each already framed with BOS ... EOS)."""
        sequences = [list(map(int, s)) for s in sequences]
        if self.vocab_size is None:
            self.vocab_size = max((max(s) for s in sequences if s), default=0) + 1
        order = self.order
        # counts_[k][context] -> Counter(next token), context a tuple of length k (k = order - 1 is the top)
        highest = defaultdict(Counter)
        for sequence in sequences:
            for position in range(1, len(sequence)):
                context = tuple(sequence[max(0, position - order + 1) : position])
                highest[context][sequence[position]] += 1
        self.counts_ = {order - 1: highest}
        # Lower orders: continuation counts N1+(. context w), derived from the order above.
        for length in range(order - 2, -1, -1):
            above = self.counts_[length + 1]
            lower = defaultdict(Counter)
            for context, followers in above.items():
                if len(context) <= length:  # sequence starts: the context is already this short
                    lower[context].update(followers)
                    continue
                shorter = context[len(context) - length :] if length else ()
                for token in followers:
                    lower[shorter][token] += 1
            self.counts_[length] = lower
        self.discounts_ = {}
        self.totals_ = {}
        for length, table in self.counts_.items():
            histogram = Counter(count for followers in table.values() for count in followers.values())
            n1, n2 = histogram.get(1, 0), histogram.get(2, 0)
            self.discounts_[length] = n1 / (n1 + 2 * n2) if n1 + 2 * n2 > 0 else 0.5
            self.totals_[length] = {context: (sum(f.values()), len(f)) for context, f in table.items()}
        return self

    def probability(self, context: tuple, token: int) -> float:
        """P(token | context) under the interpolated model."""
        probability = 1.0 / self.vocab_size
        for length in range(0, self.order):
            if len(context) < length:
                break
            key = context[len(context) - length :] if length else ()
            totals = self.totals_[length].get(key)
            if totals is None:
                continue
            total, distinct = totals
            discount = self.discounts_[length]
            count = self.counts_[length][key].get(token, 0)
            probability = max(count - discount, 0.0) / total + discount * distinct / total * probability
        return probability

    def log_likelihood(self, sequence) -> tuple[float, int]:
        """Sum of natural-log probabilities of every token after the first, and their number."""
        sequence = list(map(int, sequence))
        total = 0.0
        for position in range(1, len(sequence)):
            context = tuple(sequence[max(0, position - self.order + 1) : position])
            total += math.log(self.probability(context, sequence[position]))
        return total, len(sequence) - 1

    def perplexity(self, sequences) -> float:
        log_likelihood, tokens = 0.0, 0
        for sequence in sequences:
            value, count = self.log_likelihood(sequence)
            log_likelihood += value
            tokens += count
        return float(np.exp(-log_likelihood / max(1, tokens)))
