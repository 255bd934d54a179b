"""Progress for long work: a tqdm bar on a terminal, plain log lines elsewhere (CI, files)."""

from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress(total, "build") as bar: bar.update(1, kept=..)`` shows count, rate and ETA."""

    def __init__(self, total: int, description: str, unit: str = "file", log_every_s: float = 10.0, stream=None,
                 quiet: bool = False):
        """``quiet``: count without showing anything (e.g. one file, whose result is the whole output)."""
        self.total, self.description, self.unit = total, description, unit
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.count, self.start = 0, time.monotonic()
        self.log_every_s, self.last_log = log_every_s, self.start
        self.bar = None
        if not quiet and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=description, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1, **fields) -> None:
        self.count += n
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.update(n)
            if fields:
                self.bar.set_postfix(fields, refresh=False)
            return
        now = time.monotonic()
        if now - self.last_log >= self.log_every_s or self.count == self.total:
            self.last_log = now
            elapsed = now - self.start
            rate = self.count / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.count) / rate if rate > 0 else float("inf")
            extra = " ".join(f"{k}={v}" for k, v in fields.items())
            print(
                f"{self.description}: {self.count}/{self.total} {self.unit}s, {rate:.1f}/s, "
                f"ETA {eta:.0f}s {extra}".rstrip(),
                file=self.stream, flush=True,
            )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
