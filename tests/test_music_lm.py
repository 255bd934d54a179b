"""MusicLM: cached decoding, sliding windows, XL memory, padding, save/load and learning."""

import json

import pytest
import torch
from safetensors.torch import load_file

from musefm.config import ConfigError, from_dict
from musefm.errors import MusefmError
from musefm.models import load_pretrained
from musefm.models.music_lm import PRESETS, MusicLM, MusicLMConfig, config_from_preset

VOCAB = 40
POSITIONS = ["rope", "relative"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(position="rope", seed=0, **overrides) -> MusicLM:
    torch.manual_seed(seed)
    config = config_from_preset("debug", vocab_size=VOCAB, position=position, max_relative=16, **overrides)
    return MusicLM(config).eval()


def tokens(batch, length, seed=0):
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("position", POSITIONS)
def test_cached_decoding_equals_full_forward(position):
    model = tiny_model(position)
    ids = tokens(2, 24)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.init_cache(2)
        stepped = torch.cat([model(ids[:, t : t + 1], cache=cache).logits for t in range(24)], dim=1)
        cache = model.init_cache(2)  # a prompt at once, then one token at a time
        prompt = model(ids[:, :10], cache=cache).logits
        rest = [model(ids[:, t : t + 1], cache=cache).logits for t in range(10, 24)]
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([prompt, *rest], dim=1), full, atol=1e-5, rtol=0)
    assert cache.position == 24


@pytest.mark.parametrize("position", POSITIONS)
def test_sliding_window_cache(position):
    window, length = 5, 16
    ids = tokens(1, length, seed=1)
    # One layer: position i's output is exactly a forward pass over its last W tokens.
    one_layer = tiny_model(position, n_layers=1)
    with torch.no_grad():
        cache = one_layer.init_cache(1, max_length=window)
        stepped = [one_layer(ids[:, t : t + 1], cache=cache).logits[0, -1] for t in range(length)]
        for t in range(length):
            context = ids[:, max(0, t - window + 1) : t + 1]
            torch.testing.assert_close(stepped[t], one_layer(context).logits[0, -1], atol=1e-5, rtol=0)
    assert cache.length <= window and cache.capacity <= 2 * window
    # Several layers: every layer attends within the band i - W + 1 .. i, whether the tokens come one
    # at a time or as one prompt (the banded mask of a prefill).
    model = tiny_model(position)
    with torch.no_grad():
        cache = model.init_cache(1, max_length=window)
        stepped = torch.cat([model(ids[:, t : t + 1], cache=cache).logits for t in range(length)], dim=1)
        prefill = model(ids, cache=model.init_cache(1, max_length=window)).logits
        cache = model.init_cache(1, max_length=window)
        chunks = torch.cat([model(ids[:, t : t + 4], cache=cache).logits for t in range(0, length, 4)], dim=1)
        unbounded = model(ids).logits
    torch.testing.assert_close(stepped, prefill, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunks, prefill, atol=1e-5, rtol=0)
    torch.testing.assert_close(stepped[:, :window], unbounded[:, :window], atol=1e-5, rtol=0)
    assert not torch.allclose(stepped[:, window:], unbounded[:, window:], atol=1e-3)


@pytest.mark.parametrize("position", POSITIONS)
def test_single_token_decoder_equals_the_cached_forward(position):
    """The fast decoding step gives the general path's logits, sliding window and batch rows included."""
    model = tiny_model(position)
    ids = tokens(3, 20, seed=5)
    window = 6
    decoder = model.decoder()
    assert decoder.fast == (position == "rope")
    with torch.no_grad():
        reference_cache, cache = model.init_cache(3, max_length=window), model.init_cache(3, max_length=window)
        model(ids[:, :4], cache=reference_cache), model(ids[:, :4], cache=cache)
        for t in range(4, 20):  # slides past the window twice
            expected = model(ids[:, t : t + 1], cache=reference_cache).logits[:, -1]
            torch.testing.assert_close(decoder(ids[:, t], cache), expected, atol=1e-5, rtol=1e-5)
        assert (cache.position, cache.length) == (reference_cache.position, reference_cache.length)
        # A padded cache goes through the general path and still agrees.
        valid = torch.tensor([[False, True, True]] * 3)
        padded_cache, reference_cache = model.init_cache(3), model.init_cache(3)
        model(ids[:, :3], attention_mask=valid, cache=padded_cache)
        model(ids[:, :3], attention_mask=valid, cache=reference_cache)
        torch.testing.assert_close(decoder(ids[:, 3], padded_cache),
                                   model(ids[:, 3:4], cache=reference_cache).logits[:, -1], atol=1e-5, rtol=1e-5)
    model.train()
    assert not model.decoder().fast  # dropout would be skipped: training mode takes the general path


@pytest.mark.parametrize("position", POSITIONS)
def test_left_padded_prompt_in_cache_matches_unpadded(position):
    model = tiny_model(position)
    ids = tokens(1, 8, seed=2)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    valid = torch.tensor([[False] * 3 + [True] * 8])
    with torch.no_grad():
        expected = model(ids).logits[:, -1]
        cache = model.init_cache(1)
        got = model(padded, attention_mask=valid, cache=cache).logits[:, -1]
        following = model(tokens(1, 1, seed=3), cache=cache).logits[:, -1]
        reference = model(torch.cat([ids, tokens(1, 1, seed=3)], dim=1)).logits[:, -1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(following, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", POSITIONS)
def test_xl_memory_continues_a_full_forward(position):
    model = tiny_model(position, memory_len=20)
    ids = tokens(2, 30, seed=4)
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :10])
        second = model(ids[:, 10:20], memory=first.memory)
        third = model(ids[:, 20:], memory=second.memory)
    assert len(first.memory) == 2 and first.memory[0].shape == (2, 10, 32)
    assert second.memory[0].shape == (2, 20, 32)
    torch.testing.assert_close(first.logits, full[:, :10], atol=1e-5, rtol=0)
    torch.testing.assert_close(second.logits, full[:, 10:20], atol=1e-5, rtol=0)
    torch.testing.assert_close(third.logits, full[:, 20:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", POSITIONS)
def test_invalid_memory_rows_act_as_no_memory(position):
    model = tiny_model(position, memory_len=8)
    ids = tokens(2, 16, seed=5)
    with torch.no_grad():
        first = model(ids[:, :8])
        masked = model(ids[:, 8:], memory=first.memory, memory_mask=torch.tensor([True, False])).logits
        alone = model(ids[:, 8:]).logits
        with_memory = model(ids).logits[:, 8:]
    torch.testing.assert_close(masked[1], alone[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(masked[0], with_memory[0], atol=1e-5, rtol=0)
    assert first.memory_mask.shape == (2, 8) and first.memory_mask.all()


def test_memory_carries_no_gradient():
    model = tiny_model(memory_len=8).train()
    batch = {"input_ids": tokens(2, 12, seed=6), "attention_mask": torch.ones(2, 12, dtype=torch.bool)}
    loss, _, memory = model.loss(batch)
    assert all(not layer.requires_grad and layer.grad_fn is None for layer in memory)
    loss.backward()
    model.zero_grad()
    loss, metrics, memory = model.loss(batch, memory=memory)
    loss.backward()  # would fail ("backward through the graph a second time") if memory kept a graph
    assert metrics["tokens"] == 2 * 11 and memory[0].shape == (2, 8, 32)


@pytest.mark.parametrize("position", POSITIONS)
def test_causality_and_loss_ignores_padding(position):
    model = tiny_model(position)
    ids = tokens(2, 20, seed=7)
    changed = ids.clone()
    changed[:, 12:] = tokens(2, 8, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[:, :12], model(changed).logits[:, :12], atol=1e-6, rtol=0)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, 12:] = False  # row 0: 12 real tokens, row 1: 20
    changed = ids.clone()
    changed[0, 12:] = 0
    changed[0, 14] = 9  # garbage after the padding boundary
    with torch.no_grad():
        loss, metrics, memory = model.loss({"input_ids": ids, "attention_mask": mask})
        loss_changed, _, _ = model.loss({"input_ids": changed, "attention_mask": mask})
    assert loss.item() == pytest.approx(loss_changed.item(), abs=1e-6)
    assert metrics["tokens"] == 11 + 19 and memory is None
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] == pytest.approx(loss.item())


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model("relative", memory_len=4)
    ids = tokens(1, 12, seed=9)
    model.save_pretrained(tmp_path / "lm")
    stored = load_file(str(tmp_path / "lm" / "model.safetensors"))
    assert "lm_head.weight" not in stored and "token_embedding.weight" in stored
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["family"] == "music-lm"
    loaded = MusicLM.from_pretrained(tmp_path / "lm").eval()
    assert loaded.lm_head.weight is loaded.token_embedding.weight
    assert loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    generic, info = load_pretrained(tmp_path / "lm")
    assert isinstance(generic, MusicLM) and info["family"] == "music-lm"
    untied = tiny_model(tie_embeddings=False)
    untied.save_pretrained(tmp_path / "untied")
    again = MusicLM.from_pretrained(tmp_path / "untied")
    assert again.lm_head.weight is not again.token_embedding.weight
    torch.testing.assert_close(again.lm_head.weight, untied.lm_head.weight)


@pytest.mark.parametrize("position", POSITIONS)
def test_training_steps_reduce_loss(position):
    model = tiny_model(position).train()
    pattern = torch.tensor([5, 9, 13, 7, 22, 31, 17, 8])
    batch = {"input_ids": pattern.repeat(4, 4), "attention_mask": torch.ones(4, 32, dtype=torch.bool)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss, metrics, _ = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = first if first is not None else metrics["loss"]
    assert metrics["loss"] < 0.25 * first and metrics["accuracy"] > 0.8


def test_config_presets_and_validation():
    assert set(PRESETS) == {"debug", "small", "base"}
    small = config_from_preset("small", vocab_size=500)
    assert (small.d_model, small.n_layers, small.n_heads, small.max_seq_len) == (256, 4, 4, 512)
    assert config_from_preset("base").vocab_size == 0  # a config may wait for its tokenizer ...
    with pytest.raises(MusefmError, match="vocab_size"):  # ... a model may not
        MusicLM(config_from_preset("debug"))
    with pytest.raises(MusefmError, match="unknown music-lm preset"):
        config_from_preset("huge")
    with pytest.raises(ConfigError, match="n_experts"):
        config_from_preset("debug", n_experts=4)
    with pytest.raises(MusefmError, match="n_heads"):
        config_from_preset("debug", n_heads=3)
    with pytest.raises(ConfigError, match="position"):
        from_dict(MusicLMConfig, {"position": "absolute"})
    with pytest.raises(MusefmError, match="memory"):
        tiny_model()(tokens(1, 4), memory=[torch.zeros(1, 2, 32)] * 2)
