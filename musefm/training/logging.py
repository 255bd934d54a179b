"""Run logs: a progress line (step, loss, tokens/s, ETA), metrics.jsonl, TensorBoard events, and a
loss-curve PNG. Only the main rank writes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool = True, total_steps: int = 0, stream=None):
        self.run_dir, self.enabled, self.total_steps = Path(run_dir), enabled, total_steps
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.writer = None
        self.started = time.monotonic()
        self.start_step = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.metrics_file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency; tolerate its absence in odd installs
                self.writer = None

    def log(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": split, "time": round(time.time(), 3), **metrics}
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{split}/{key}", value, step)

    def progress(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.start_step is None:
            self.start_step, self.started = step, time.monotonic()
        elapsed = time.monotonic() - self.started
        done = step - self.start_step
        eta = (self.total_steps - step) * elapsed / done if done > 0 and self.total_steps else float("nan")
        parts = [f"step {step}/{self.total_steps}"]
        for key in ("loss", "lr", "tokens_per_s"):
            if key in metrics:
                value = metrics[key]
                parts.append(f"{key} {value:.3g}" if key != "tokens_per_s" else f"{value:,.0f} tok/s")
        parts.append(f"ETA {eta:.0f}s" if eta == eta else "ETA ?")
        line = "  ".join(parts)
        print(("\r" + line + "   ") if self.tty else line, end="" if self.tty else "\n", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(("\n" if self.tty else "") + text, file=self.stream, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.tty:
            print(file=self.stream)
        self.metrics_file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(run_dir: Path, path: Path | None = None) -> Path | None:
    """Training and validation loss against step, as PNG (None when nothing was logged)."""
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if r["split"] == "train" and "loss" in r]
    valid = [(r["step"], r["loss"]) for r in rows if r["split"] == "valid" and "loss" in r]
    if not train and not valid:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        axes.plot(*zip(*train), label="train", color="#4477aa", linewidth=1)
    if valid:
        axes.plot(*zip(*valid), label="valid", color="#ee6677", marker="o", linewidth=1.5)
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats/token)")
    axes.set_title("loss")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path or Path(run_dir) / "loss_curve.png")
    figure.savefig(path)
    plt.close(figure)
    return path
