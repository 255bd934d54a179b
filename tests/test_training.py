import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from musefm.cli import main
from musefm.data.build import BuildConfig, build_dataset
from musefm.errors import MusefmError
from musefm.recipes.pretrain import CONFIG_DIR, PretrainConfig, load_config, main as pretrain, model_config_for
from musefm.training.checkpoint import latest_checkpoint, load_train_state, resolve_model_dir
from musefm.training.trainer import EpochBatches, TrainConfig, learning_rate
from tests.conftest import make_score

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def long_pieces(tmp_path_factory):
    """Pieces long enough that every 32-token window is full (no padding): DDP == 1 process."""
    root = tmp_path_factory.mktemp("long")
    for index in range(8):
        pitches = tuple(50 + (index * 5 + k * 7) % 30 for k in range(96))
        make_score(pitches=pitches, chord=index % 2 == 0).dump_midi(str(root / f"p{index}.mid"))
    out = tmp_path_factory.mktemp("ds") / "remi"
    build_dataset(BuildConfig(sources=[f"dir:{root}"], out=str(out), workers=1, valid_fraction=0.25, test_fraction=0.0),
                  stream=open(os.devnull, "w"))
    octuple = out.parent / "octuple"
    build_dataset(BuildConfig(sources=[f"dir:{root}"], out=str(octuple), workers=1, tokenizer="octuple",
                              valid_fraction=0.25, test_fraction=0.0), stream=open(os.devnull, "w"))
    return out, octuple


def _config(data, out, **train):
    settings = dict(max_steps=6, batch_size=4, lr=2e-3, warmup_steps=2, eval_every=3, eval_batches=2, save_every=2,
                    log_every=1, seed=3, precision="fp32")
    settings.update(train)
    return PretrainConfig(model="music-lm", preset="debug", data=str(data), out=str(out), seq_len=32,
                          model_settings={"dropout": 0.0}, train=TrainConfig(**settings))


def test_learning_rate_schedule():
    config = TrainConfig(lr=1.0, warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert [learning_rate(s, config) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(9, config) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(14, config) == pytest.approx(0.1)


def test_epoch_batches_split_across_ranks():
    whole = EpochBatches(50, 8, seed=1, epoch=2)
    shares = [EpochBatches(50, 8, seed=1, epoch=2, rank=r, world_size=2) for r in (0, 1)]
    for number in range(len(whole)):
        assert shares[0].rank_indices(number) + shares[1].rank_indices(number) == whole.rank_indices(number)
    assert EpochBatches(50, 8, 1, 2).batches[0].tolist() == whole.batches[0].tolist()
    assert EpochBatches(50, 8, 1, 3).batches[0].tolist() != whole.batches[0].tolist()
    with pytest.raises(MusefmError, match="divisible"):
        EpochBatches(50, 7, 1, 0, 0, 2)


def test_pretrain_writes_a_complete_run(long_pieces, tmp_path):
    data, _ = long_pieces
    out = tmp_path / "run"
    summary = pretrain(_config(data, out), stream=open(os.devnull, "w"))
    assert summary["step"] == 6
    for name in ("run.json", "tokenizer.json", "metrics.jsonl", "loss_curve.png"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").iterdir())
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert [p.name for p in checkpoints] == ["step-00000004", "step-00000006"]  # keep_last=2
    assert latest_checkpoint(out).name == "step-00000006"
    state = load_train_state(latest_checkpoint(out))
    assert state["step"] == 6 and "optimizer" in state
    assert resolve_model_dir(out) == out / "best"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    valid = [r for r in rows if r["split"] == "valid"]
    assert len(train) == 6 and len(valid) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert valid[0]["perplexity"] == pytest.approx(math.exp(valid[0]["loss"]), rel=1e-6)
    assert train[-1]["loss"] < train[0]["loss"]


def test_resume_equals_uninterrupted(long_pieces, tmp_path):
    data, _ = long_pieces
    pretrain(_config(data, tmp_path / "whole"), stream=open(os.devnull, "w"))
    # The same run stopped after step 4's checkpoint (everything after it lost), then resumed.
    interrupted = tmp_path / "cut"
    pretrain(_config(data, interrupted), stream=open(os.devnull, "w"))
    for path in (interrupted / "checkpoints").glob("step-00000006"):
        import shutil

        shutil.rmtree(path)
    (interrupted / "checkpoints" / "latest").write_text("step-00000004")
    pretrain(_config(data, interrupted), resume=True, stream=open(os.devnull, "w"))
    whole = load_file(str(tmp_path / "whole" / "checkpoints" / "step-00000006" / "model.safetensors"))
    resumed = load_file(str(interrupted / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(whole[name], resumed[name], rtol=0, atol=0)


@pytest.mark.parametrize("threads", [2, 60])
def test_loader_threads_train_exactly_as_serial_loading(long_pieces, tmp_path, threads):
    data, _ = long_pieces
    # 143 training windows in batches of 48: the 6 steps span two epochs, prefetching included
    # (60 threads keep 3 batches in flight: the prefetch reaches each epoch's end).
    pretrain(_config(data, tmp_path / "serial", batch_size=48), stream=open(os.devnull, "w"))
    pretrain(_config(data, tmp_path / "threads", batch_size=48, loader_threads=threads), stream=open(os.devnull, "w"))
    serial = load_file(str(tmp_path / "serial" / "checkpoints" / "step-00000006" / "model.safetensors"))
    threaded = load_file(str(tmp_path / "threads" / "checkpoints" / "step-00000006" / "model.safetensors"))
    for name in serial:
        torch.testing.assert_close(threaded[name], serial[name], rtol=0, atol=0)


def _cli(*args, env=None, **kwargs):
    command = [sys.executable, "-m", "musefm", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, **kwargs)


def _pretrain_args(data, out, steps=8):
    return ["pretrain", "--model", "music-lm", "--preset", "debug", "--data", str(data), "--out", str(out),
            "seq_len=32", "model_settings.dropout=0.0", f"train.max_steps={steps}", "train.batch_size=4",
            "train.save_every=1", "train.eval_every=100", "train.log_every=1", "train.warmup_steps=2", "train.seed=5",
            "train.precision=fp32"]


def test_sigkill_then_resume_equals_uninterrupted(long_pieces, tmp_path):
    data, _ = long_pieces
    assert _cli(*_pretrain_args(data, tmp_path / "whole")).returncode == 0
    process = subprocess.Popen([sys.executable, "-m", "musefm", *_pretrain_args(data, tmp_path / "killed")], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (pointer.exists() and pointer.read_text().strip() >= "step-00000003"):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = latest_checkpoint(tmp_path / "killed")
    assert killed_at is not None
    result = _cli("pretrain", "--out", str(tmp_path / "killed"), "--resume")
    assert result.returncode == 0, result.stderr
    final = "step-00000008"
    whole = load_file(str(tmp_path / "whole" / "checkpoints" / final / "model.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "checkpoints" / final / "model.safetensors"))
    for name in whole:
        torch.testing.assert_close(whole[name], resumed[name], rtol=0, atol=0)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_process_ddp_matches_one_process(long_pieces, tmp_path):
    data, _ = long_pieces
    args = _pretrain_args(data, tmp_path / "one", steps=3)
    assert _cli(*args).returncode == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "musefm", *_pretrain_args(data, tmp_path / "two", steps=3)]
    result = subprocess.run(two, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "terminate called" not in result.stderr

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["split"] == "train"]

    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-4)


def test_run_directory_rules(long_pieces, tmp_path, capsys):
    data, octuple = long_pieces
    out = tmp_path / "run"
    args = ["pretrain", "--model", "music-lm", "--preset", "debug", "--data", str(data), "--out", str(out),
            "seq_len=32", "train.max_steps=2", "train.eval_every=1", "train.save_every=1"]
    assert main(args) == 0
    capsys.readouterr()
    cases = [
        (args, "holds another run"),
        (["pretrain", "--out", str(tmp_path / "none"), "--resume"], "no run to resume"),
        (["pretrain", "--model", "music-lm", "--data", str(tmp_path), "--out", str(tmp_path / "x")], "not a musefm dataset"),
        (["pretrain", "--model", "music-bert", "--preset", "debug", "--data", str(data), "--out", str(tmp_path / "y")],
         "octuple"),
        (["pretrain", "--model", "music-lm", "--preset", "debug", "--data", str(octuple), "--out", str(tmp_path / "z")],
         "single-stream"),
        (args[:-3] + ["train.nope=1"], "unknown config key train.nope"),
        (args[:-3] + ["train.lr=-1"], "train.lr"),
        (["pretrain", "--model", "music-lm", "--preset", "giant", "--data", str(data), "--out", str(tmp_path / "g")],
         "unknown preset"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and message in error[0], (argv, error)
    assert main(args + ["--overwrite"]) == 0


def test_nan_loss_stops_with_a_clear_message(long_pieces, tmp_path, monkeypatch):
    data, _ = long_pieces
    from musefm.models.music_lm import MusicLM

    original = MusicLM.loss

    def poisoned(self, batch, *args, **kwargs):
        loss, metrics, state = original(self, batch, *args, **kwargs)
        return loss * float("nan"), dict(metrics, loss=float("nan")), state

    monkeypatch.setattr(MusicLM, "loss", poisoned)
    with pytest.raises(MusefmError, match="loss became nan at step 1"):
        pretrain(_config(data, tmp_path / "nan"), stream=open(os.devnull, "w"))


@pytest.mark.parametrize("path", sorted(p for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("transcriber")),
                         ids=lambda p: p.stem)
def test_shipped_configs_are_valid(path, long_pieces):
    data, octuple = long_pieces
    config = load_config(str(path), None, {"data": str(data), "out": "unused"}, [])
    from musefm.data.dataset import open_dataset

    dataset = open_dataset(octuple if config.model == "music-bert" else data)
    model_config = model_config_for(config, dataset.tokenizer)
    model_config.validate()
    assert config.train.max_steps >= 1


def test_bf16_autocast_training_runs(long_pieces, tmp_path):
    data, _ = long_pieces
    summary = pretrain(_config(data, tmp_path / "bf16", precision="bf16", max_steps=4), stream=open(os.devnull, "w"))
    assert summary["step"] == 4 and math.isfinite(summary["train"]["loss"])


def test_music_bert_pretrains(long_pieces, tmp_path):
    _, octuple = long_pieces
    config = PretrainConfig(model="music-bert", preset="debug", data=str(octuple), out=str(tmp_path / "bert"), seq_len=32,
                            train=TrainConfig(max_steps=4, batch_size=4, eval_every=2, eval_batches=1, save_every=2,
                                              precision="fp32"))
    summary = pretrain(config, stream=open(os.devnull, "w"))
    assert summary["step"] == 4 and 0 <= summary["valid"]["accuracy"] <= 1
    from musefm.models.base import load_pretrained

    model, data = load_pretrained(resolve_model_dir(tmp_path / "bert"))
    assert data["family"] == "music-bert" and model.config.field_names[0] == "pitch"


def test_segment_streams_walk_pieces_in_order(long_pieces):
    from musefm.data.dataset import TokenDataset
    from musefm.training.trainer import SegmentStreams

    data, _ = long_pieces
    dataset = TokenDataset(data, "train", seq_len=32, window="segments")
    streams = SegmentStreams(dataset, batch_size=2, seed=0, epoch=0)
    previous = [None, None]
    for step in range(len(streams)):
        indices, new_piece = streams.rank_batch(step)
        for row, index in enumerate(indices):
            piece, chunk = int(dataset.piece_of_item[index]), int(dataset.chunk_of_item[index])
            assert bool(new_piece[row]) == (chunk == 0)
            if not new_piece[row]:
                assert previous[row] == (piece, chunk - 1)
            previous[row] = (piece, chunk)
    halves = [SegmentStreams(dataset, 2, 0, 0, rank=r, world_size=2).rank_batch(0)[0] for r in (0, 1)]
    assert halves[0] + halves[1] == streams.rank_batch(0)[0]
    # Segments are consecutive and do not overlap: together they are the framed piece.
    items = [i for i in range(len(dataset)) if int(dataset.piece_of_item[i]) == 0]
    joined = torch.cat([dataset[i]["input_ids"][dataset[i]["attention_mask"]] for i in items])
    assert len(joined) == dataset.rows[0]["length"] + 2


def test_transformer_xl_training_resumes_exactly(long_pieces, tmp_path):
    data, _ = long_pieces

    def config(out):
        settings = _config(data, out, max_steps=6, batch_size=2, save_every=2)
        settings.model_settings = {"dropout": 0.0, "memory_len": 32}
        return settings

    pretrain(config(tmp_path / "whole"), stream=open(os.devnull, "w"))
    cut = tmp_path / "cut"
    pretrain(config(cut), stream=open(os.devnull, "w"))
    state = load_train_state(cut / "checkpoints" / "step-00000004")
    assert state["memory"] is not None and state["memory"][0].shape == (2, 32, 32)
    import shutil

    shutil.rmtree(cut / "checkpoints" / "step-00000006")
    (cut / "checkpoints" / "latest").write_text("step-00000004")
    pretrain(config(cut), resume=True, stream=open(os.devnull, "w"))
    whole = load_file(str(tmp_path / "whole" / "checkpoints" / "step-00000006" / "model.safetensors"))
    resumed = load_file(str(cut / "checkpoints" / "step-00000006" / "model.safetensors"))
    for name in whole:
        torch.testing.assert_close(whole[name], resumed[name], rtol=0, atol=0)


def test_ctrl_c_saves_a_checkpoint(long_pieces, tmp_path):
    data, _ = long_pieces
    out = tmp_path / "interrupted"
    args = _pretrain_args(data, out, steps=100000)
    args[args.index("train.save_every=1")] = "train.save_every=100000"
    process = subprocess.Popen([sys.executable, "-m", "musefm", *args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, error = process.communicate(timeout=120)
    assert process.returncode == 130, error[-2000:]
    assert "checkpoint saved" in error and "Traceback" not in error
    saved = latest_checkpoint(out)
    assert saved is not None and load_train_state(saved)["step"] >= 3


def test_first_ctrl_c_asks_to_stop_and_the_second_stops_at_once():
    from musefm.training.trainer import _StopOnInterrupt

    before = signal.getsignal(signal.SIGINT)
    interrupt = _StopOnInterrupt()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary of the main thread
        assert interrupt.requested.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    finally:
        interrupt.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_resume_refuses_a_dataset_with_another_tokenizer(long_pieces, tmp_path, capsys):
    data, _ = long_pieces
    out = tmp_path / "run"
    assert main(["pretrain", "--model", "music-lm", "--preset", "debug", "--data", str(data), "--out", str(out),
                 "seq_len=32", "train.max_steps=2", "train.save_every=1", "train.eval_every=1"]) == 0
    other = tmp_path / "other-data"
    import shutil

    shutil.copytree(data, other)
    from musefm.data.tokenize import make_tokenizer, save_tokenizer

    save_tokenizer(make_tokenizer("remi", num_velocities=8), other / "tokenizer.json")
    run = json.loads((out / "run.json").read_text())
    run["config"]["data"] = str(other)
    (out / "run.json").write_text(json.dumps(run))
    capsys.readouterr()
    assert main(["pretrain", "--out", str(out), "--resume"]) == 2
    assert "tokenizer differs" in capsys.readouterr().err
