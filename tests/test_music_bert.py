"""MusicBERT: masking strategies, bidirectional padding invariance, save/load, learning, embeddings."""

import pytest
import torch

from musefm.errors import MusefmError
from musefm.models.music_bert import (PRESETS, SPECIAL_TOKENS, MusicBERT, MusicBERTConfig, config_from_preset,
                                      octuple_fields)

FIELDS = ["pitch", "position", "bar", "velocity", "duration", "program", "tempo", "timesig"]
SIZES = [40, 20, 16, 12, 18, 10, 9, 8]
BAR = FIELDS.index("bar")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(masking="bar", position="rope", seed=0, **overrides) -> MusicBERT:
    torch.manual_seed(seed)
    config = config_from_preset("debug", field_names=FIELDS, field_vocab_sizes=SIZES, masking=masking,
                                position=position, max_relative=16, **overrides)
    return MusicBERT(config).eval()


def octuples(batch, length, seed=0, notes_per_bar=4):
    """Random regular ids per field; bar ids increase every ``notes_per_bar`` notes (and repeat in
    non-adjacent bars, as when bar numbers wrap); a BOS row first."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randint(SPECIAL_TOKENS, size, (batch, length), generator=generator) for size in SIZES], -1)
    ids[..., BAR] = SPECIAL_TOKENS + (torch.arange(length) // notes_per_bar) % 5
    ids[:, 0] = 1  # BOS in every field
    return ids


def padded_mask(batch, length, real_lengths):
    return torch.arange(length)[None, :] < torch.tensor(real_lengths)[:, None]


@pytest.mark.parametrize("masking", ["random", "element", "bar"])
def test_masking_picks_real_regular_tokens_with_structure(masking):
    model = tiny_model(masking)
    ids = octuples(4, 40, seed=1)
    mask = padded_mask(4, 40, [40, 33, 21, 9])
    ids[~mask] = 0
    ids[1, 32] = 2  # an EOS row
    masked, labels = model.mask_batch(ids, mask, torch.Generator().manual_seed(0))
    picked = labels != -100
    assert picked.any()
    assert (ids[picked] >= SPECIAL_TOKENS).all() and mask[..., None].expand_as(ids)[picked].all()
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(masked[~picked], ids[~picked])  # only picked entries may change
    changed = masked != ids
    assert (masked[changed] == 3).float().mean() > 0.6  # mostly MASK; the rest random regular ids
    assert (masked[changed] >= 3).all()
    sizes = torch.tensor(SIZES).expand_as(ids)
    assert (masked < sizes).all()
    if masking == "element":  # whole notes
        eligible = (ids >= SPECIAL_TOKENS) & mask[..., None]
        rows = picked.any(-1)
        assert torch.equal(picked[rows], eligible[rows])
    if masking == "bar":  # a (bar, field) pair is picked for every note of the bar (notes 4k .. 4k + 3)
        regular = (ids[..., 0] >= SPECIAL_TOKENS) & mask  # (B, T) real notes
        for b in range(4):
            notes = torch.nonzero(regular[b]).flatten().tolist()
            for t in notes:
                for u in notes:
                    if t // 4 == u // 4:
                        assert torch.equal(picked[b, t], picked[b, u]), (b, t, u)
        partly = picked.any(-1) & ~picked.all(-1)
        assert partly.any()  # fields of one note are picked independently


@pytest.mark.parametrize("masking", ["random", "element", "bar"])
def test_masking_rate_and_reproducibility(masking):
    model = tiny_model(masking)
    ids = octuples(64, 64, seed=2, notes_per_bar=1)  # one note per bar: many independent bars
    ids[:, 0] = ids[:, 1]  # no special row
    masked, labels = model.mask_batch(ids, None, torch.Generator().manual_seed(5))
    rate = (labels != -100).float().mean().item()
    assert rate == pytest.approx(0.15, abs=0.015)
    again, labels_again = model.mask_batch(ids, None, torch.Generator().manual_seed(5))
    assert torch.equal(masked, again) and torch.equal(labels, labels_again)
    other, _ = model.mask_batch(ids, None, torch.Generator().manual_seed(6))
    assert not torch.equal(masked, other)


@pytest.mark.parametrize("position", ["rope", "relative"])
def test_padding_does_not_change_real_outputs(position):
    model = tiny_model(position=position)
    ids = octuples(2, 20, seed=3)
    mask = padded_mask(2, 20, [20, 12])
    changed = ids.clone()
    changed[1, 12:] = octuples(1, 8, seed=4)[0]
    with torch.no_grad():
        before = model(ids, mask)
        after = model(changed, mask)
        alone = model(ids[1:, :12])
    assert len(before.logits) == len(FIELDS)
    assert [logits.shape for logits in before.logits] == [(2, 20, size) for size in SIZES]
    torch.testing.assert_close(before.hidden[1, :12], after.hidden[1, :12], atol=1e-6, rtol=0)
    torch.testing.assert_close(before.hidden[1, :12], alone.hidden[0], atol=1e-5, rtol=0)
    # Bidirectional: a change early in the sequence reaches earlier *and* later tokens.
    early = ids.clone()
    early[0, 10, 0] = SPECIAL_TOKENS if ids[0, 10, 0] != SPECIAL_TOKENS else SPECIAL_TOKENS + 1
    with torch.no_grad():
        moved = model(early, mask).hidden
    assert not torch.allclose(moved[0, :10], before.hidden[0, :10])


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model(position="relative")
    ids = octuples(2, 10, seed=5)
    model.save_pretrained(tmp_path / "bert")
    loaded = MusicBERT.from_pretrained(tmp_path / "bert").eval()
    assert loaded.config == model.config
    with torch.no_grad():
        for got, want in zip(loaded(ids).logits, model(ids).logits):
            torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("masking", ["random", "bar"])
def test_training_steps_reduce_loss(masking):
    model = tiny_model(masking, mask_probability=0.3).train()
    ids = octuples(1, 16, seed=6).repeat(8, 1, 1)  # one phrase, seen with different masks
    batch = {"input_ids": ids, "attention_mask": torch.ones(8, 16, dtype=torch.bool)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    history = []
    for _ in range(40):
        loss, metrics, state = model.loss(batch, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(metrics["loss"])
    assert state is None and metrics["tokens"] > 0
    assert set(metrics) >= {"loss", "tokens", "accuracy"} | {f"accuracy_{name}" for name in FIELDS}
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:5]) / 5


def test_embed_shapes_and_pooling():
    model = tiny_model()
    ids = octuples(3, 12, seed=7)
    mask = padded_mask(3, 12, [12, 7, 3])
    with torch.no_grad():
        mean = model.embed(ids, mask)
        first = model.embed(ids, mask, pooling="first")
        hidden = model(ids, mask).hidden
    assert mean.shape == first.shape == (3, 32)
    torch.testing.assert_close(mean[1], hidden[1, :7].mean(0))
    torch.testing.assert_close(first, hidden[:, 0])
    with pytest.raises(MusefmError, match="pooling"):
        model.embed(ids, mask, pooling="max")


def test_config_fields_presets_and_tokenizer():
    from musefm.data.tokenize import make_tokenizer

    names, sizes = octuple_fields(make_tokenizer("octuple"))
    assert names[:3] == ["pitch", "position", "bar"] and len(sizes) == 8
    assert set(PRESETS) == {"debug", "small", "base"}
    model = MusicBERT(config_from_preset("debug", field_names=names, field_vocab_sizes=sizes))
    assert model.bar_field == 2
    with pytest.raises(MusefmError, match="field_names"):
        MusicBERT(config_from_preset("debug"))
    with pytest.raises(MusefmError, match="field_vocab_sizes"):
        config_from_preset("debug", field_names=["pitch"], field_vocab_sizes=[10, 12])
    with pytest.raises(MusefmError, match="masking"):
        MusicBERTConfig(field_names=["pitch", "velocity"], field_vocab_sizes=[10, 12], masking="bar").validate()
    with pytest.raises(MusefmError, match="input_ids"):
        model(torch.zeros(2, 5, dtype=torch.long))
