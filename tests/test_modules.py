"""Attention, masks, KV cache, positions and XL memory helpers against naive references."""

import math

import pytest
import torch

from musefm.errors import MusefmError
from musefm.modules.attention import (KVCache, MultiHeadSelfAttention, build_attention_mask, causal_allowed,
                                     explicit_attention, uses_explicit_attention)
from musefm.modules.dropout import Dropout
from musefm.modules.positions import RelativePositionEmbedding, RotaryEmbedding, apply_rotary
from musefm.modules.transformer import TransformerBlock, next_memory, next_memory_mask

D_MODEL, HEADS = 16, 2
HEAD_DIM = D_MODEL // HEADS


pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force_relative(queries, table: RelativePositionEmbedding, key_length: int) -> torch.Tensor:
    """S[b, h, i, j] = q[b, h, i] · E[h, clip(i + offset - j)] by explicit indexing."""
    batch, heads, query_length, _ = queries.shape
    offset = key_length - query_length
    limit = table.max_relative - 1
    result = torch.zeros(batch, heads, query_length, key_length)
    for i in range(query_length):
        for j in range(key_length):
            distance = offset + i - j
            row = max(0, min(distance, limit)) if table.causal else max(-limit, min(distance, limit)) + limit
            result[:, :, i, j] = (queries[:, :, i] * table.embeddings[:, row]).sum(-1)
    return result


def naive_attention(module: MultiHeadSelfAttention, hidden, allowed, memory=None, first_position=0):
    """softmax(Q Kᵀ / sqrt(d) + relative + mask) V, then the output projection, written out."""
    batch, length, _ = hidden.shape
    weight, bias = module.qkv_projection.weight, module.qkv_projection.bias
    inputs = hidden if memory is None else torch.cat([memory, hidden], dim=1)
    projected = inputs @ weight.T + bias  # (B, M + T, 3D)
    q, k, v = projected.split(D_MODEL, dim=-1)
    q = q[:, -length:]

    def heads(x):
        return x.view(batch, x.shape[1], HEADS, HEAD_DIM).transpose(1, 2)  # (B, H, T, Dh)

    q, k, v = heads(q), heads(k), heads(v)
    key_length = k.shape[2]
    if module.position == "rope":
        cos, sin = RotaryEmbedding(HEAD_DIM)(first_position, key_length)
        q, k = apply_rotary(q, cos[-length:], sin[-length:]), apply_rotary(k, cos, sin)
    logits = q @ k.transpose(-1, -2)
    if module.relative is not None:
        logits = logits + brute_force_relative(q, module.relative, key_length)
    logits = logits / math.sqrt(HEAD_DIM)
    logits = logits.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(logits, dim=-1) @ v  # (B, H, T, Dh)
    out = out.transpose(1, 2).reshape(batch, length, D_MODEL)
    return module.output_projection(out)


@pytest.mark.parametrize("position", ["rope", "relative"])
@pytest.mark.parametrize("case", ["causal", "causal_memory_masked", "bidirectional_padded"])
def test_sdpa_attention_equals_naive_softmax(position, case):
    torch.manual_seed(0)
    causal = case != "bidirectional_padded"
    module = MultiHeadSelfAttention(D_MODEL, HEADS, position=position, max_relative=4, causal=causal).eval()
    hidden = torch.randn(2, 6, D_MODEL)
    memory, key_valid = None, None
    if case == "causal_memory_masked":
        memory = torch.randn(2, 3, D_MODEL)
        key_valid = torch.tensor([[True, True, True], [False, True, False]])
        key_valid = torch.cat([key_valid, torch.ones(2, 6, dtype=torch.bool)], dim=1)  # (B, M + T)
    if case == "bidirectional_padded":
        key_valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    key_length = 6 + (3 if memory is not None else 0)
    mask = build_attention_mask(6, key_length, causal=causal, key_valid=key_valid)
    rotary = RotaryEmbedding(HEAD_DIM)(0, key_length) if position == "rope" else None
    with torch.no_grad():
        fast = module(hidden, mask, rotary=rotary, memory=memory)
        allowed = torch.ones(2, 1, 6, key_length, dtype=torch.bool)
        if causal:
            allowed = allowed & causal_allowed(6, key_length, None)
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, None, :]
        slow = naive_attention(module, hidden, allowed, memory)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", ["rope", "relative"])
def test_causal_attention_ignores_future_tokens(position):
    torch.manual_seed(1)
    block = TransformerBlock(D_MODEL, HEADS, 32, position=position, max_relative=8).eval()
    hidden = torch.randn(1, 10, D_MODEL)
    changed = hidden.clone()
    changed[:, 7:] = torch.randn(1, 3, D_MODEL)
    mask = build_attention_mask(10, 10, causal=True)
    rotary = RotaryEmbedding(HEAD_DIM)(0, 10) if position == "rope" else None
    with torch.no_grad():
        before, after = block(hidden, mask, rotary=rotary), block(changed, mask, rotary=rotary)
    torch.testing.assert_close(before[:, :7], after[:, :7], atol=1e-6, rtol=0)
    assert not torch.allclose(before[:, 7:], after[:, 7:])


@pytest.mark.parametrize("position", ["rope", "relative"])
def test_padded_keys_do_not_affect_real_outputs(position):
    torch.manual_seed(2)
    block = TransformerBlock(D_MODEL, HEADS, 32, position=position, max_relative=8, causal=False).eval()
    hidden = torch.randn(2, 8, D_MODEL)
    valid = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    changed = hidden.clone()
    changed[1, 5:] = torch.randn(3, D_MODEL) * 10
    mask = build_attention_mask(8, 8, causal=False, key_valid=valid)
    rotary = RotaryEmbedding(HEAD_DIM)(0, 8) if position == "rope" else None
    with torch.no_grad():
        before, after = block(hidden, mask, rotary=rotary), block(changed, mask, rotary=rotary)
        alone = block(hidden[1:, :5], build_attention_mask(5, 5, causal=False), rotary=rotary and
                      tuple(t[:5] for t in rotary))
    torch.testing.assert_close(before[1, :5], after[1, :5], atol=1e-6, rtol=0)
    torch.testing.assert_close(before[1, :5], alone[0], atol=1e-5, rtol=0)
    # A row of padding only gets a finite (unused) output rather than NaN.
    empty = build_attention_mask(8, 8, causal=False, key_valid=torch.zeros(2, 8, dtype=torch.bool))
    assert torch.isfinite(block(hidden, empty, rotary=rotary)).all()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("query_length, key_length, max_relative",
                         [(5, 5, 8), (5, 5, 3), (1, 7, 4), (3, 8, 16), (4, 9, 2), (6, 6, 1)])
def test_skewed_relative_bias_equals_explicit_indexing(causal, query_length, key_length, max_relative):
    torch.manual_seed(3)
    table = RelativePositionEmbedding(3, 4, max_relative, causal)
    queries = torch.randn(2, 3, query_length, 4)
    with torch.no_grad():
        skewed = table(queries, key_length)
        expected = brute_force_relative(queries, table, key_length)
    assert skewed.shape == (2, 3, query_length, key_length)
    if causal:  # cells after the query's own position are masked, so only the rest must match
        visible = causal_allowed(query_length, key_length, None)[0, 0]
        skewed, expected = skewed[..., visible], expected[..., visible]
    torch.testing.assert_close(skewed, expected, atol=1e-5, rtol=1e-5)


def test_rotary_scores_depend_on_distance_only():
    rotary = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(query_position, key_position):
        cos_q, sin_q = rotary(query_position, 1)
        cos_k, sin_k = rotary(key_position, 1)
        return (apply_rotary(q, cos_q, sin_q) * apply_rotary(k, cos_k, sin_k)).sum()

    torch.testing.assert_close(score(5, 2), score(105, 102), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_window_mask_and_self_visibility():
    allowed = causal_allowed(4, 6, None, window=3)[0, 0]
    for i in range(4):
        for j in range(6):
            assert bool(allowed[i, j]) == (0 <= (2 + i) - j < 3)
    valid = torch.tensor([[False] * 6])  # even with every key masked, a query sees itself
    mask = build_attention_mask(4, 6, causal=True, key_valid=valid)
    assert mask.allowed[0, 0].sum(-1).tolist() == [1, 1, 1, 1]
    assert mask.allowed[0, 0, :, 2:].diagonal().all()


def test_kv_cache_grows_and_slides():
    cache = KVCache(n_layers=1, batch_size=1, max_length=4)
    seen, buffers = [], set()
    for step in range(41):
        past = cache.reserve(1)
        keys = torch.full((1, 1, 1, 2), float(step))
        all_keys, _ = cache.update(0, keys, keys)
        # The first token is padding: its flag must leave the window with it.
        cache.advance(1, torch.tensor([[step > 0]]))
        seen.append(all_keys[0, 0, :, 0].tolist())
        buffers.add(cache.keys[0].data_ptr())
        assert past == min(step, 3)
        assert cache.past_key_valid()[0].tolist() == [s > 0 for s in range(step - past, step + 1)]
    assert seen[10] == [7.0, 8.0, 9.0, 10.0] and seen[-1] == [37.0, 38.0, 39.0, 40.0]  # the last W, oldest first
    assert cache.capacity <= 8 and cache.position == 41
    # Sliding moves a start index; the live entries are copied to a fresh buffer once every ~W tokens.
    assert len(buffers) <= 41 // 4 + 2
    unbounded = KVCache(n_layers=1, batch_size=1)
    for step in range(40):
        unbounded.reserve(1)
        all_keys, _ = unbounded.update(0, torch.full((1, 1, 1, 2), float(step)), torch.zeros(1, 1, 1, 2))
        unbounded.advance(1, None)
    assert all_keys[0, 0, :, 0].tolist() == [float(s) for s in range(40)]
    with pytest.raises(MusefmError, match="max_length"):
        KVCache(1, 1, max_length=0)


def test_next_memory_keeps_last_rows_detached():
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    old = torch.randn(2, 3, 4)
    memory = next_memory(old, hidden, 6)
    assert memory.shape == (2, 6, 4) and not memory.requires_grad
    torch.testing.assert_close(memory[:, :1], old[:, -1:])
    torch.testing.assert_close(memory[:, 1:], hidden.detach())
    assert next_memory(None, hidden, 2).shape == (2, 2, 4)
    segment_valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    kept = next_memory_mask(torch.ones(2, 3, dtype=torch.bool), segment_valid, 6)
    assert kept.tolist() == [[True] * 6, [True] * 4 + [False] * 2]


@pytest.mark.parametrize("case", ["causal", "window", "padded", "bidirectional"])
def test_explicit_attention_equals_sdpa(case):
    """The bf16 CPU path gives SDPA's numbers for every kind of mask."""
    generator = torch.Generator().manual_seed(0)
    queries, keys, values = (torch.randn(2, 3, 10, 8, generator=generator) for _ in range(3))
    key_valid = torch.tensor([[True] * 10, [True] * 7 + [False] * 3])
    mask = {"causal": build_attention_mask(10, 10, causal=True),
            "window": build_attention_mask(10, 10, causal=True, window=4),
            "padded": build_attention_mask(10, 10, causal=True, key_valid=key_valid),
            "bidirectional": build_attention_mask(10, 10, causal=False, key_valid=key_valid)}[case]
    expected = torch.nn.functional.scaled_dot_product_attention(queries, keys, values, attn_mask=mask.allowed,
                                                                is_causal=mask.is_causal)
    torch.testing.assert_close(explicit_attention(queries, keys, values, mask), expected, atol=1e-5, rtol=1e-5)
    low = [tensor.bfloat16() for tensor in (queries, keys, values)]
    assert uses_explicit_attention(low[0], low[1], 0.0)
    torch.testing.assert_close(explicit_attention(*low, mask).float(), expected, atol=0.05, rtol=0.05)
    assert not uses_explicit_attention(queries, keys, 0.0)  # fp32 keeps the fused kernel
    assert not uses_explicit_attention(low[0][:, :, :1], low[1], 0.0)  # so does one-token decoding


def test_dropout_keeps_expectation_and_is_seeded():
    dropout = Dropout(0.25).train()
    hidden = torch.ones(200, 500, requires_grad=True)
    torch.manual_seed(0)
    first = dropout(hidden)
    kept = first != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(first[kept], torch.full_like(first[kept], 1 / 0.75))
    first.sum().backward()
    torch.testing.assert_close(hidden.grad, kept.float() / 0.75)  # the gradient goes through the kept ones
    torch.manual_seed(0)
    torch.testing.assert_close(dropout(hidden), first)
    assert dropout.eval()(hidden) is hidden
