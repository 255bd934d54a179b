import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from musefm.data.build import BuildConfig, build_dataset
from musefm.data.dataset import TokenDataset, open_dataset
from musefm.errors import MusefmError
from musefm.models.classifier import ClassifierConfig, PieceClassifier
from musefm.recipes.finetune import (FinetuneConfig, LabeledWindows, classification_metrics, main as finetune,
                                     neutral_field_ids, predict, read_label_csv, stratified_subset)
from musefm.training.trainer import collate
from tests.conftest import make_score

QUIET = open(os.devnull, "w")


def _write_two_styles(root: Path, per_class: int = 8) -> Path:
    """'bach-like' pieces (low, with a bass track) and 'folk-like' ones (high, melody only)."""
    for index in range(per_class):
        low = tuple(40 + (index * 3 + k * 5) % 14 for k in range(40))
        high = tuple(72 + (index * 5 + k * 3) % 14 for k in range(40))
        (root / "bach-like").mkdir(parents=True, exist_ok=True)
        (root / "folk-like").mkdir(parents=True, exist_ok=True)
        make_score(pitches=low, chord=True).dump_midi(str(root / "bach-like" / f"b{index}.mid"))
        make_score(pitches=high, qpm=140.0).dump_midi(str(root / "folk-like" / f"f{index}.mid"))
    return root


def save_backbone(family: str, dataset_dir: Path, out: Path) -> Path:
    """A tiny randomly initialised backbone saved like a pretraining run's model directory."""
    from musefm.recipes.pretrain import PretrainConfig, model_config_for
    from musefm.models.base import family_class

    tokenizer = open_dataset(dataset_dir).tokenizer
    config = model_config_for(PretrainConfig(model=family, preset="debug", model_settings={"dropout": 0.0}), tokenizer)
    torch.manual_seed(0)
    family_class(family)(config).save_pretrained(out)
    shutil.copyfile(dataset_dir / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def styles(tmp_path_factory):
    root = _write_two_styles(tmp_path_factory.mktemp("styles"))
    base = tmp_path_factory.mktemp("styles-ds")
    octuple, remi = base / "octuple", base / "remi"
    for out, tokenizer in ((octuple, "octuple"), (remi, "remi")):
        build_dataset(BuildConfig(sources=[f"dir:{root}"], out=str(out), workers=1, tokenizer=tokenizer,
                                  valid_fraction=0.25, test_fraction=0.25), stream=QUIET)
    models = tmp_path_factory.mktemp("backbones")
    return {"root": root, "octuple": octuple, "remi": remi,
            "bert": save_backbone("music-bert", octuple, models / "bert"),
            "lm": save_backbone("music-lm", remi, models / "lm")}


def _config(styles, out, **overrides):
    settings = dict(model=str(styles["bert"]), data=str(styles["octuple"]), out=str(out), task="collection",
                    seq_len=32, steps=30, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=15, eval_batches=2,
                    dropout=0.0, seed=1, precision="fp32")
    settings.update(overrides)
    return FinetuneConfig(**settings)


def _snapshot(module: torch.nn.Module) -> dict:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _batch(dataset_dir, labels_of_piece, size=8):
    windows = TokenDataset(dataset_dir, "train", seq_len=32, window="random", seed=0)
    data = LabeledWindows(windows, labels_of_piece)
    return collate([data[i] for i in range(min(size, len(data)))])


def _train_steps(model, batch, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss, metrics, _ = model.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert metrics["tokens"] == len(batch["label"])


def _labels(dataset_dir):
    dataset = open_dataset(dataset_dir)
    return {row["id"]: int(row["collection"] == "folk-like") for row in dataset.manifest}


@pytest.mark.parametrize("family", ["bert", "lm"])
def test_linear_probe_trains_only_the_head(styles, family, one_thread):
    from musefm.models.base import load_pretrained

    data = styles["octuple"] if family == "bert" else styles["remi"]
    backbone, _ = load_pretrained(styles[family])
    model = PieceClassifier(backbone, ClassifierConfig(label_names=["bach-like", "folk-like"], linear_probe=True))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    assert not model.backbone.training and model.training  # frozen backbone stays in eval mode
    before = _snapshot(model)
    _train_steps(model, _batch(data, _labels(data)))
    after = _snapshot(model)
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == name.startswith("head."), name


def test_freeze_layers_freezes_embeddings_and_first_blocks(styles, one_thread):
    from musefm.models.base import load_pretrained

    backbone, _ = load_pretrained(styles["bert"])
    model = PieceClassifier(backbone, ClassifierConfig(label_names=["a", "b"], freeze_layers=1))
    before = _snapshot(model)
    _train_steps(model, _batch(styles["octuple"], _labels(styles["octuple"])))
    after = _snapshot(model)
    frozen = ("backbone.field_embedding.", "backbone.blocks.0.")
    for name in before:
        changed = not torch.equal(before[name], after[name])
        if name.startswith(frozen):
            assert not changed, name
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("backbone.blocks.1."))
    with pytest.raises(MusefmError, match="freeze_layers"):
        PieceClassifier(load_pretrained(styles["bert"])[0], ClassifierConfig(label_names=["a", "b"], freeze_layers=3))


@pytest.mark.parametrize("family,pooling", [("bert", "first"), ("lm", "last")])
def test_saved_and_reloaded_classifier_predicts_the_same(styles, family, pooling, tmp_path, one_thread):
    from musefm.models.base import load_pretrained

    data = styles["octuple"] if family == "bert" else styles["remi"]
    backbone, _ = load_pretrained(styles[family])
    model = PieceClassifier(backbone, ClassifierConfig(label_names=["x", "y", "z"], pooling=pooling, dropout=0.2))
    batch = _batch(data, _labels(data), size=4)
    _train_steps(model, batch, steps=1)
    expected = model.predict(batch)
    model.save_pretrained(tmp_path / "cls", Path(data) / "tokenizer.json")
    assert sorted(p.name for p in (tmp_path / "cls").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    reloaded = PieceClassifier.from_pretrained(tmp_path / "cls")
    torch.testing.assert_close(reloaded.predict(batch), expected, rtol=0, atol=0)
    assert torch.allclose(expected.sum(dim=1), torch.ones(len(expected)))
    with pytest.raises(MusefmError, match="not a classifier"):
        PieceClassifier.from_pretrained(styles[family])


def test_neutral_fields_hide_metadata_in_training_and_prediction(styles, tmp_path, one_thread):
    """The 'folk-like' pieces differ by tempo: with tempo neutral, the classifier cannot see it."""
    from musefm.models.base import load_pretrained
    from musefm.models.music_bert import octuple_fields

    dataset = open_dataset(styles["octuple"])
    fields, _ = octuple_fields(dataset.tokenizer)
    pairs = neutral_field_ids(dataset, ["Tempo", "velocity"])
    tempo = fields.index("tempo")
    assert [column for column, _ in pairs] == [tempo, fields.index("velocity")]
    train_tempos = np.concatenate([np.asarray(dataset.piece_ids(row))[:, tempo] for row in dataset.rows("train")])
    assert pairs[0][1] == np.bincount(train_tempos).argmax()  # the most common training value
    backbone, _ = load_pretrained(styles["bert"])
    model = PieceClassifier(backbone, ClassifierConfig(label_names=["x", "y"], dropout=0.0, neutral=pairs))
    batch = _batch(styles["octuple"], _labels(styles["octuple"]), size=4)
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    notes = changed["input_ids"][..., tempo] > 3  # not PAD/BOS/EOS/MASK
    changed["input_ids"][..., tempo][notes] = 4 + (changed["input_ids"][..., tempo][notes] + 1) % 8
    torch.testing.assert_close(model.predict(changed), model.predict(batch), rtol=0, atol=0)
    model.config.neutral = []
    assert not torch.allclose(model.predict(changed), model.predict(batch))
    model.config.neutral = pairs
    model.save_pretrained(tmp_path / "cls")
    assert PieceClassifier.from_pretrained(tmp_path / "cls").config.neutral == pairs
    with pytest.raises(MusefmError, match="not among the Octuple fields"):
        neutral_field_ids(dataset, ["mood"])
    with pytest.raises(MusefmError, match="are Octuple fields"):
        neutral_field_ids(open_dataset(styles["remi"]), ["tempo"])


def test_finetune_learns_a_separable_task_and_writes_its_run(styles, tmp_path, one_thread):
    out = tmp_path / "cls"
    result = finetune(_config(styles, out), stream=QUIET)
    for name in ("metrics.json", "metrics.jsonl", "confusion_matrix.png", "model/config.json",
                 "model/model.safetensors", "model/tokenizer.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == ["bach-like", "folk-like"] and metrics["pieces"] >= 2
    assert metrics["accuracy"] >= 0.75, metrics  # chance is about 0.5
    assert metrics["accuracy"] == result["accuracy"]
    assert sum(c["support"] for c in metrics["per_class"].values()) == metrics["pieces"]
    # predict() on files gives the piece's class.
    files = [str(styles["root"] / "bach-like" / "b0.mid"), str(styles["root"] / "folk-like" / "f0.mid")]
    predictions = predict(out, files)
    assert [label for label, _ in predictions] == ["bach-like", "folk-like"]
    assert all(0.5 <= probability <= 1.0 for _, probability in predictions)
    # and a manifest id of the dataset gives the same as its file.
    dataset = open_dataset(styles["octuple"])
    piece = next(row for row in dataset.manifest if row["path"] == files[0])
    by_id = predict(out, [piece["id"]], data=str(styles["octuple"]))
    assert by_id[0][0] == "bach-like" and by_id[0][1] == pytest.approx(predictions[0][1], abs=1e-6)
    with pytest.raises(MusefmError, match="not empty"):
        finetune(_config(styles, out), stream=QUIET)


def test_metrics_equal_hand_computed_values():
    # true a a a b b c ; predicted a a b b c c
    metrics = classification_metrics([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], ["a", "b", "c"])
    assert metrics["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # a: P 2/2 R 2/3 F1 0.8 ; b: P 1/2 R 1/2 F1 0.5 ; c: P 1/2 R 1/1 F1 2/3
    assert metrics["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert metrics["per_class"]["b"]["f1"] == pytest.approx(0.5)
    assert metrics["per_class"]["c"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert metrics["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # A class that is neither true nor predicted does not enter the macro average.
    assert classification_metrics([0, 1], [0, 1], ["a", "b", "c"])["macro_f1"] == pytest.approx(1.0)


def test_bad_label_csv_rows_are_named_and_good_rows_used(styles, tmp_path, capsys):
    dataset = open_dataset(styles["octuple"])
    first, second = dataset.manifest[0], dataset.manifest[1]
    path = tmp_path / "labels.csv"
    path.write_text(f"piece,label\n{first['id']},slow\n{second['path']},fast\nno-such-piece,slow\n"
                    f"{first['id']},fast\n{second['id']}\n{dataset.manifest[2]['id']},\n")
    labels, problems = read_label_csv(path, dataset)
    assert labels == {first["id"]: "slow", second["id"]: "fast"}
    assert len(problems) == 4
    assert "labels.csv:4" in problems[0] and "no-such-piece" in problems[0]
    assert "labels.csv:5" in problems[1] and "'slow'" in problems[1]
    assert "labels.csv:6" in problems[2] and "field" in problems[2]
    assert "labels.csv:7" in problems[3] and "empty label" in problems[3]
    only_bad = tmp_path / "bad.csv"
    only_bad.write_text("ghost.mid,slow\n")
    with pytest.raises(MusefmError, match="ghost.mid"):
        finetune(_config(styles, tmp_path / "x", task="labels", labels_csv=str(only_bad)), stream=QUIET)


def test_a_one_class_task_is_refused(styles, tmp_path):
    dataset = open_dataset(styles["octuple"])
    path = tmp_path / "one.csv"
    path.write_text("".join(f"{row['id']},same\n" for row in dataset.manifest))
    with pytest.raises(MusefmError, match="1 class.*'same'"):
        finetune(_config(styles, tmp_path / "one", task="labels", labels_csv=str(path)), stream=QUIET)
    with pytest.raises(MusefmError, match="task 'meter' has 1 class"):  # every piece is in 4/4
        finetune(_config(styles, tmp_path / "meter", task="meter"), stream=QUIET)
    with pytest.raises(MusefmError, match="label_fraction"):
        FinetuneConfig(label_fraction=0.0).validate()


def test_label_fraction_is_stratified_and_seeded():
    ids = [f"p{i}" for i in range(20)]
    labels = {p: "a" if i < 16 else "b" for i, p in enumerate(ids)}
    subset = stratified_subset(ids, labels, 0.25, seed=3)
    assert sorted(labels[p] for p in subset) == ["a"] * 4 + ["b"]
    assert subset == stratified_subset(ids, labels, 0.25, seed=3)
    assert stratified_subset(ids, labels, 1.0, seed=3) == ids


def test_balanced_sampling_draws_classes_evenly(styles):
    windows = TokenDataset(styles["octuple"], "train", seq_len=8, window="random", seed=0)
    # One piece of class 1, the rest class 0: sampling brings class 1 near half of the draws.
    first = windows.rows[0]["id"]
    labels = {row["id"]: int(row["id"] == first) for row in windows.rows}
    data = LabeledWindows(windows, labels, balance="sampling", seed=0)
    share = np.mean([int(data.item_labels[np.searchsorted(data.items, i)]) for i in data.order])
    assert 0.3 < share < 0.7
    assert [int(data[i]["label"]) for i in range(4)] == [int(data[i]["label"]) for i in range(4)]


def test_cli_finetune_predict_and_embed(styles, tmp_path, capsys):
    from musefm.cli import main as cli

    out = tmp_path / "cls"
    assert cli(["finetune", "--model", str(styles["bert"]), "--data", str(styles["octuple"]), "--task", "collection",
                "--linear-probe", "--steps", "6", "--out", str(out), "seq_len=32", "batch_size=8", "eval_every=3",
                "eval_batches=1", "warmup_steps=1"]) == 0
    assert "macro-F1" in capsys.readouterr().out and (out / "confusion_matrix.png").is_file()
    piece = next(Path(styles["root"]).rglob("*.mid"))
    assert cli(["predict", "--model", str(out), str(piece)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.split("\t")[1] in ("bach-like", "folk-like")
    assert cli(["embed", "--model", str(styles["bert"]), "--source", str(styles["octuple"]),
                "--out", str(tmp_path / "emb")]) == 0
    assert "pieces x" in capsys.readouterr().out and (tmp_path / "emb" / "embeddings.npy").is_file()
    assert cli(["finetune", "--model", str(styles["bert"]), "--data", str(styles["octuple"]), "--task", "collection",
                "--out", str(tmp_path / "bad"), "nope=1"]) == 2
    assert "unknown config key nope" in capsys.readouterr().err
