"""The training loop shared by every recipe: AdamW, warmup + cosine, clipping, accumulation,
autocast, validation, checkpoints, exact resume, and DDP through the same code path.

A model family provides ``loss(batch) -> (loss, metrics, state)``; the trainer does the rest.
Batches are drawn by ``EpochBatches``: a permutation that depends only on (seed, epoch), cut into
global batches, each rank taking its slice. Together with the dataset's (seed, epoch, index)
windows and the saved RNG states, a resumed run takes exactly the steps the uninterrupted one would.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from musefm.errors import MusefmError
from musefm.training import checkpoint as ckpt
from musefm.training.distributed import DistributedContext, barrier, broadcast_flags, mean_across_ranks
from musefm.training.logging import RunLogger, plot_loss_curve
from musefm.training.seed import rng_state, set_rng_state


@dataclass
class TrainConfig:
    max_steps: int = 2000
    max_minutes: float = 0.0  # stop (and save) after this wall time; 0 = no limit
    batch_size: int = 16  # sequences per optimizer step, summed over ranks and accumulation
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = no clipping
    eval_every: int = 200
    eval_batches: int = 50
    save_every: int = 200
    keep_last: int = 2
    log_every: int = 10
    # auto: bf16 autocast on GPUs and on CPUs with native bf16 matrix units (avx512_bf16 / AMX), where a
    # bf16 matmul runs several times faster than fp32; fp32 elsewhere. Weights stay fp32 either way.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = "auto"
    seed: int = 0
    # Threads that prepare the next batch while this one trains (0 = load in the training thread).
    # Worth it when items are costly (audio decoding and augmentation); results do not change,
    # since every item's randomness comes from (seed, epoch, index).
    loader_threads: int = 0

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "save_every", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise MusefmError(f"train.{name} must be >= 1")
        if self.loader_threads < 0:
            raise MusefmError("train.loader_threads must be >= 0")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise MusefmError("train.lr must be > 0, train.min_lr_ratio in [0, 1], train.warmup_steps >= 0")


def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with avx512_bf16 or AMX-BF16 (read from /proc/cpuinfo on Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class _StopOnInterrupt:
    """Ctrl-C (SIGINT) during training: the first one asks the loop to stop after the step in hand,
    so the checkpoint is saved from a consistent state, never from wherever the signal landed (a
    KeyboardInterrupt inside a logging thread's queue could hang the exit); a second one stops at
    once. Only the main thread can own the handler; elsewhere Ctrl-C acts as before."""

    def __init__(self):
        self.requested = threading.Event()
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested.is_set():
            raise KeyboardInterrupt
        self.requested.set()

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


class EpochBatches:
    """Global batches of item indices for one epoch; rank ``r`` of ``w`` takes its slice of each."""

    def __init__(self, num_items: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise MusefmError(f"train.batch_size={batch_size} must be divisible by the {world_size} processes")
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(num_items, generator=generator)
        if num_items < batch_size:  # tiny datasets: repeat the permutation to fill one batch
            order = order.repeat(math.ceil(batch_size / max(1, num_items)))[:batch_size]
        self.batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
        self.share = batch_size // world_size
        self.rank = rank

    def __len__(self) -> int:
        return len(self.batches)

    def rank_indices(self, batch_number: int) -> list[int]:
        batch = self.batches[batch_number]
        return batch[self.rank * self.share : (self.rank + 1) * self.share].tolist()


class SegmentStreams:
    """Transformer-XL training order: ``batch_size`` streams, each walking its share of the pieces
    (a permutation by seed and epoch) segment after segment, so a row's memory is always the
    previous segment of the same piece. Needs a dataset with ``window="segments"``."""

    def __init__(self, dataset, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise MusefmError(f"train.batch_size={batch_size} must be divisible by the {world_size} processes")
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        pieces = torch.randperm(len(dataset.rows), generator=generator).tolist()
        first_item = {}
        for item, piece in enumerate(dataset.piece_of_item.tolist()):
            first_item.setdefault(piece, item)
        counts = np.bincount(dataset.piece_of_item, minlength=len(dataset.rows))
        share = batch_size // world_size
        self.items, self.starts = [], []
        for stream in range(rank * share, (rank + 1) * share):
            items, starts = [], []
            for piece in pieces[stream::batch_size] or pieces[stream % len(pieces) :: len(pieces)]:
                items += range(first_item[piece], first_item[piece] + int(counts[piece]))
                starts += [True] + [False] * (int(counts[piece]) - 1)
            self.items.append(items)
            self.starts.append(starts)
        self.length = min(len(items) for items in self.items)

    def __len__(self) -> int:
        return self.length

    def rank_batch(self, step: int) -> tuple[list[int], torch.Tensor]:
        """Item indices of this rank's streams at ``step``, and which of them start a new piece."""
        indices = [items[step] for items in self.items]
        new_piece = torch.tensor([starts[step] for starts in self.starts])
        return indices, new_piece


def collate(items: list[dict]) -> dict:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


class _LossModule(nn.Module):
    """Lets DDP see ``model.loss`` as its forward, so gradient syncing works as designed."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, memory=None, memory_mask=None):
        if memory is None:
            return self.model.loss(batch)
        return self.model.loss(batch, memory=memory, memory_mask=memory_mask)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


class Trainer:
    def __init__(self, model, train_data, valid_data, config: TrainConfig, run_dir: Path, tokenizer_path: Path | None,
                 context: DistributedContext | None = None, stream=None):
        self.model, self.train_data, self.valid_data = model, train_data, valid_data
        self.config, self.run_dir = config, Path(run_dir)
        self.tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else None
        self.context = context or DistributedContext()
        self.device = self.context.device
        self.model.to(self.device)
        use_bf16 = config.precision == "bf16" or (
            config.precision == "auto" and (self.device.type == "cuda" or cpu_has_native_bf16()))
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.loss_module = _LossModule(self.model)
        if self.context.enabled:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.loss_module = DistributedDataParallel(self.loss_module, device_ids=device_ids)
        decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=(config.beta1, config.beta2),
        )
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best_valid_loss = float("inf")
        # Transformer-XL: segments in stream order, each step's hidden states the next step's memory.
        self.uses_memory = getattr(getattr(model, "config", None), "memory_len", 0) > 0
        self.memory = None
        if self.uses_memory:
            if getattr(train_data, "window", None) != "segments":
                raise MusefmError("a model with memory_len > 0 trains on window='segments' data")
            if config.grad_accum != 1:
                raise MusefmError("train.grad_accum must be 1 for a model with memory (memory_len > 0)")
        self.logger = RunLogger(self.run_dir, enabled=self.context.is_main, total_steps=config.max_steps, stream=stream)
        # (epoch, batch number) -> futures of its items, one list per micro-batch. Enough batches are
        # kept in flight for two items per thread, so no thread idles at the tail of a batch.
        self.prefetch: dict[tuple[int, int], list[list]] = {}
        self.item_pool = None
        self.prefetch_depth = 0
        if config.loader_threads > 0 and not self.uses_memory:
            from concurrent.futures import ThreadPoolExecutor

            self.item_pool = ThreadPoolExecutor(config.loader_threads)
            self.prefetch_depth = max(1, math.ceil(2 * config.loader_threads / config.batch_size))

    # ---- state -------------------------------------------------------------------------

    def train_state(self) -> dict:
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "best_valid_loss": self.best_valid_loss, "optimizer": self.optimizer.state_dict(), "rng": rng_state(),
            "memory": [layer.cpu() for layer in self.memory] if self.memory is not None else None,
        }

    def resume(self, checkpoint: Path) -> None:
        """Continue from a checkpoint exactly: weights, optimizer, RNG, step and data position."""
        from safetensors.torch import load_file

        state = ckpt.load_train_state(checkpoint)
        weights = load_file(str(Path(checkpoint) / "model.safetensors"), device=str(self.device))
        self.model.load_state_dict(weights, strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch, self.best_valid_loss = int(state["batch_in_epoch"]), float(state["best_valid_loss"])
        memory = state.get("memory")
        self.memory = [layer.to(self.device) for layer in memory] if memory is not None else None
        self.logger.message(f"resumed from {checkpoint} at step {self.step}")

    def save(self) -> Path | None:
        path = None
        if self.context.is_main:
            path = ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.tokenizer_path, self.train_state(),
                                        self.config.keep_last)
        barrier(self.context)
        return path

    # ---- steps -------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _epoch_batches(self):
        order = SegmentStreams if self.uses_memory else EpochBatches
        data = self.train_data if self.uses_memory else len(self.train_data)
        return order(data, self.config.batch_size, self.config.seed, self.epoch, self.context.rank,
                     self.context.world_size)

    def _micro_chunks(self, indices: list[int]) -> list[list[int]]:
        return [chunk for chunk in (indices[i::self.config.grad_accum] for i in range(self.config.grad_accum)) if chunk]

    def _batch(self, batches: EpochBatches) -> list[dict]:
        """This step's micro-batches. With loader threads, the next ``prefetch_depth`` batches of the
        same epoch load while this one trains (never past the epoch's end: items read the dataset's
        epoch, which changes only between epochs; so every batch loaded is trained on in its epoch)."""
        key = (self.epoch, self.batch_in_epoch)
        if self.item_pool is None:
            return [collate([self.train_data[i] for i in chunk])
                    for chunk in self._micro_chunks(batches.rank_indices(self.batch_in_epoch))]
        for number in range(self.batch_in_epoch, min(len(batches), self.batch_in_epoch + 1 + self.prefetch_depth)):
            if (self.epoch, number) not in self.prefetch:
                self.prefetch[(self.epoch, number)] = [
                    [self.item_pool.submit(self.train_data.__getitem__, i) for i in chunk]
                    for chunk in self._micro_chunks(batches.rank_indices(number))]
        return [collate([future.result() for future in chunk]) for chunk in self.prefetch.pop(key)]

    def train_step(self, batches: EpochBatches) -> dict:
        """One optimizer step over this rank's share of global batch ``batch_in_epoch``."""
        config = self.config
        self.train_data.set_epoch(self.epoch)
        memory_mask = None
        if self.uses_memory:
            indices, new_piece = batches.rank_batch(self.batch_in_epoch)
            memory_mask = ~new_piece.to(self.device)  # (B,): rows starting a piece see no memory
            micro = [collate([self.train_data[i] for i in indices])]
        else:
            micro = self._batch(batches)
        lr = learning_rate(self.step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        totals = {"loss": 0.0, "tokens": 0, "correct": 0.0}
        for number, batch in enumerate(micro):
            batch = _to_device(batch, self.device)
            sync = number == len(micro) - 1
            context = self.loss_module.no_sync() if self.context.enabled and not sync else nullcontext()
            with context:
                with self._autocast():
                    if self.uses_memory:
                        loss, metrics, memory = self.loss_module(batch, self.memory, memory_mask)
                        self.memory = [layer.detach() for layer in memory]
                    else:
                        loss, metrics, _ = self.loss_module(batch)
                (loss / len(micro)).backward()
            totals["loss"] += float(metrics["loss"]) * metrics["tokens"]
            totals["tokens"] += int(metrics["tokens"])
            totals["correct"] += float(metrics.get("accuracy", 0.0)) * metrics["tokens"]
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip if config.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = max(1, totals["tokens"])
        result = {"loss": totals["loss"] / tokens, "accuracy": totals["correct"] / tokens, "tokens": totals["tokens"],
                  "grad_norm": float(grad_norm), "lr": lr}
        return mean_across_ranks(result, self.context, weights_key="tokens")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Token-weighted loss, perplexity and accuracy over the first ``eval_batches`` valid batches."""
        if self.valid_data is None or len(self.valid_data) == 0:
            return {}
        self.model.eval()
        size = max(1, self.config.batch_size // self.context.world_size)
        total_loss = total_correct = 0.0
        total_tokens = 0
        count = min(len(self.valid_data), self.config.eval_batches * size * self.context.world_size)
        mine = list(range(self.context.rank, count, self.context.world_size))
        for start in range(0, len(mine), size):
            batch = _to_device(collate([self.valid_data[i] for i in mine[start : start + size]]), self.device)
            with self._autocast():
                _, metrics, _ = self.model.loss(batch)
            total_loss += float(metrics["loss"]) * metrics["tokens"]
            total_correct += float(metrics.get("accuracy", 0.0)) * metrics["tokens"]
            total_tokens += int(metrics["tokens"])
        result = {"loss": total_loss / max(1, total_tokens), "accuracy": total_correct / max(1, total_tokens),
                  "tokens": total_tokens}
        result = mean_across_ranks(result, self.context, weights_key="tokens")
        result["perplexity"] = math.exp(min(result["loss"], 50.0))
        return result

    def _validate_and_keep_best(self) -> dict:
        metrics = self.evaluate()
        if metrics:
            self.logger.log(self.step, "valid", metrics)
            self.logger.message(f"step {self.step}: valid loss {metrics['loss']:.4f}, perplexity "
                                f"{metrics['perplexity']:.2f}, accuracy {metrics['accuracy']:.3f}")
            if metrics["loss"] < self.best_valid_loss:
                self.best_valid_loss = metrics["loss"]
                if self.context.is_main:
                    ckpt.save_best(self.run_dir, self.model, self.tokenizer_path, {"step": self.step, **metrics})
                barrier(self.context)
        return metrics

    def fit(self) -> dict:
        """Train until max_steps (or max_minutes); returns the last train and valid metrics."""
        config = self.config
        started = time.monotonic()
        batches = self._epoch_batches()
        if len(batches) == 0:
            raise MusefmError("the training split has fewer windows than one batch")
        last_train, last_valid = {}, {}
        window_started, window_tokens = time.monotonic(), 0
        interrupt = _StopOnInterrupt()
        try:
            while self.step < config.max_steps:
                if self.batch_in_epoch >= len(batches):
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    batches = self._epoch_batches()
                metrics = self.train_step(batches)
                if not math.isfinite(metrics["loss"]):
                    raise MusefmError(
                        f"training stopped: the loss became {metrics['loss']} at step {self.step + 1} "
                        f"(lr {metrics['lr']:.3g}); lower train.lr or keep train.grad_clip on. "
                        "The last checkpoint is intact."
                    )
                self.step += 1
                self.batch_in_epoch += 1
                window_tokens += metrics["tokens"]
                last_train = metrics
                if self.step % config.log_every == 0 or self.step == config.max_steps:
                    elapsed = time.monotonic() - window_started
                    metrics["tokens_per_s"] = window_tokens / elapsed if elapsed > 0 else 0.0
                    window_started, window_tokens = time.monotonic(), 0
                    self.logger.log(self.step, "train", metrics)
                    self.logger.progress(self.step, metrics)
                out_of_time = config.max_minutes > 0 and time.monotonic() - started > 60 * config.max_minutes
                out_of_time, interrupted = broadcast_flags(self.context, out_of_time, interrupt.requested.is_set())
                if interrupted:  # every rank stops after the same step
                    raise KeyboardInterrupt
                if self.step % config.eval_every == 0 or self.step == config.max_steps or out_of_time:
                    last_valid = self._validate_and_keep_best() or last_valid
                if self.step % config.save_every == 0 or self.step == config.max_steps or out_of_time:
                    self.save()
                if out_of_time:
                    self.logger.message(f"time limit of {config.max_minutes} min reached at step {self.step}")
                    break
        except KeyboardInterrupt:
            path = self.save()
            self.logger.message(f"interrupted at step {self.step}: checkpoint saved to {path}")
            raise
        finally:
            interrupt.restore()
            if self.item_pool is not None:
                self.item_pool.shutdown(wait=True, cancel_futures=True)
            if self.context.is_main:
                plot_loss_curve(self.run_dir)
            self.logger.close()
        return {"step": self.step, "train": last_train, "valid": last_valid,
                "best_valid_loss": self.best_valid_loss, "seconds": time.monotonic() - started}
