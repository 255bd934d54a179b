import numpy as np
import pytest
import torch

from musefm.data.augment import AugmentConfig, TokenAugmenter
from musefm.data.build import BuildConfig, build_dataset
from musefm.data.dataset import BOS, EOS, PAD, TokenDataset, make_loader, open_dataset
from musefm.data.music import key_index, transpose_key
from musefm.data.tokenize import decode, score_notes
from musefm.errors import MusefmError
from tests.conftest import make_score


@pytest.fixture(scope="module")
def piece_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pieces")
    for index in range(6):
        pitches = tuple(55 + (index * 7 + k * 5) % 24 for k in range(24 + 8 * index))
        make_score(pitches=pitches, chord=index % 2 == 0, qpm=90.0 + 10 * index).dump_midi(str(root / f"p{index}.mid"))
    return root


def _dataset(piece_dir, out, tokenizer="remi", **settings):
    config = BuildConfig(sources=[f"dir:{piece_dir}"], out=str(out), tokenizer=tokenizer, workers=1,
                         valid_fraction=0.0, test_fraction=0.0, **settings)
    build_dataset(config, stream=open("/dev/null", "w"))
    return open_dataset(out)


@pytest.fixture(scope="module")
def remi(piece_dir, tmp_path_factory):
    return _dataset(piece_dir, tmp_path_factory.mktemp("remi") / "ds")


def test_windows_shapes_masks_and_framing(remi):
    data = TokenDataset(remi, "train", seq_len=64)
    lengths = [row["length"] + 2 for row in data.rows]
    assert len(data) == sum(-(-n // 64) for n in lengths)
    for index in range(len(data)):
        item = data[index]
        assert item["input_ids"].shape == (64,) and item["input_ids"].dtype == torch.int64
        mask = item["attention_mask"]
        assert mask.dtype == torch.bool and mask[0]
        real = int(mask.sum())
        assert (item["input_ids"][real:] == PAD).all() and (item["input_ids"][:real] != PAD).all()


def test_sequential_windows_cover_the_piece_exactly(remi):
    data = TokenDataset(remi, "train", seq_len=50, window="sequential")
    piece = 0
    chunks = [data[i] for i in range(len(data)) if int(data.piece_of_item[i]) == piece]
    framed = np.concatenate([[BOS], remi.piece_ids(data.rows[piece]).astype(np.int64), [EOS]])
    covered = np.concatenate([c["input_ids"][c["attention_mask"]].numpy() for c in chunks])
    # Chunks are consecutive; the last one is moved back to end at the piece's end.
    np.testing.assert_array_equal(covered[: len(framed) - len(framed) % 50 or None][:50], framed[:50])
    assert covered[-1] == EOS and chunks[0]["input_ids"][0] == BOS


def test_bar_windows_start_on_a_bar(remi):
    data = TokenDataset(remi, "train", seq_len=40, window="bar", seed=3)
    bar_ids = set(data.bar_ids.tolist())
    for index in range(len(data)):
        first = int(data[index]["input_ids"][0])
        assert first in bar_ids or first == BOS


def test_same_seed_and_epoch_same_windows(remi):
    one = TokenDataset(remi, "train", seq_len=32, seed=7, augment=AugmentConfig(transpose=5, tempo=0.1, velocity=0.2))
    two = TokenDataset(remi, "train", seq_len=32, seed=7, augment=AugmentConfig(transpose=5, tempo=0.1, velocity=0.2))
    for index in range(len(one)):
        torch.testing.assert_close(one[index]["input_ids"], two[index]["input_ids"])
    two.set_epoch(1)
    assert any(not torch.equal(one[i]["input_ids"], two[i]["input_ids"]) for i in range(len(one)))


def test_transposition_moves_notes_and_key_together(remi):
    tokenizer = remi.tokenizer
    plain = TokenDataset(remi, "train", seq_len=4096, seed=1)
    shifted = TokenDataset(remi, "train", seq_len=4096, seed=1, augment=AugmentConfig(transpose=6))
    seen = set()
    for index in range(len(plain)):
        a, b = plain[index], shifted[index]
        semitones = int(b["transpose"])
        seen.add(semitones)
        ids_a = a["input_ids"][a["attention_mask"]].numpy()[1:-1]
        ids_b = b["input_ids"][b["attention_mask"]].numpy()[1:-1]
        notes_a, notes_b = score_notes(decode(tokenizer, ids_a)), score_notes(decode(tokenizer, ids_b))
        assert [(o, p + semitones, d, v, g) for o, p, d, v, g in notes_a] == notes_b
        row = plain.rows[int(a["piece"])]
        assert int(b["key"]) == key_index(transpose_key(row["key"], semitones))
    assert len(seen) > 2


def test_transposition_never_leaves_the_pitch_range(remi):
    tokenizer = remi.tokenizer
    augmenter = TokenAugmenter(tokenizer, AugmentConfig(transpose=60))
    vocab = tokenizer._vocab_base
    ids = np.array([vocab["Bar_None"], vocab["Position_0"], vocab["Program_0"], vocab["Pitch_100"],
                    vocab["Velocity_79"], vocab["Duration_1.0.8"], vocab["Program_0"], vocab["Pitch_30"]])
    rng = np.random.default_rng(0)
    for _ in range(50):
        out, semitones = augmenter(ids, rng)
        assert -9 <= semitones <= 9  # Pitch_30 may go down to 21, Pitch_100 up to 109
        assert out[3] == vocab[f"Pitch_{100 + semitones}"] and out[7] == vocab[f"Pitch_{30 + semitones}"]


def test_velocity_and_tempo_scaling(remi):
    tokenizer = remi.tokenizer
    vocab = tokenizer._vocab_base
    ids = np.array([vocab["Velocity_63"], vocab["Tempo_100.43"] if "Tempo_100.43" in vocab else
                    [i for t, i in vocab.items() if t.startswith("Tempo_")][10]])
    louder = TokenAugmenter(tokenizer, AugmentConfig(velocity=0.5))
    out, _ = louder(ids, np.random.default_rng(0))
    inverse = {i: t for t, i in vocab.items()}
    assert inverse[int(out[0])].startswith("Velocity_") and inverse[int(out[1])] == inverse[int(ids[1])]
    faster = TokenAugmenter(tokenizer, AugmentConfig(tempo=0.5))
    changed = [faster(ids, np.random.default_rng(seed))[0] for seed in range(10)]
    assert all(inverse[int(c[1])].startswith("Tempo_") and c[0] == ids[0] for c in changed)
    assert len({int(c[1]) for c in changed}) > 3


def test_octuple_windows(piece_dir, tmp_path):
    dataset = _dataset(piece_dir, tmp_path / "oct", tokenizer="octuple")
    data = TokenDataset(dataset, "train", seq_len=16, window="bar", augment=AugmentConfig(transpose=4))
    item = data[0]
    assert item["input_ids"].shape == (16, 8)
    assert item["attention_mask"].shape == (16,)
    bar_field = data._octuple_bar_field()
    assert bar_field >= 0


def test_bpe_windows_decode(piece_dir, tmp_path):
    dataset = _dataset(piece_dir, tmp_path / "bpe", bpe_vocab_size=600)
    data = TokenDataset(dataset, "train", seq_len=32, augment=AugmentConfig(transpose=3))
    item = data[0]
    assert item["input_ids"].shape == (32,) and int(item["input_ids"].max()) < dataset.tokenizer.vocab_size
    assert int(item["attention_mask"].sum()) == 32


def test_loader_batches_and_distributed_sampler(remi):
    data = TokenDataset(remi, "train", seq_len=32)
    batch = next(iter(make_loader(data, batch_size=4, seed=0)))
    assert batch["input_ids"].shape == (4, 32) and batch["attention_mask"].shape == (4, 32)
    from torch.utils.data import DistributedSampler

    halves = [list(DistributedSampler(data, num_replicas=2, rank=r, shuffle=True, seed=0)) for r in (0, 1)]
    assert set(halves[0]) | set(halves[1]) == set(range(len(data)))


def test_dataset_errors(remi, tmp_path):
    with pytest.raises(MusefmError, match="no pieces"):
        TokenDataset(remi, "test")
    with pytest.raises(MusefmError, match="window"):
        TokenDataset(remi, "train", window="middle")
    with pytest.raises(MusefmError, match="not a musefm dataset"):
        open_dataset(tmp_path)
