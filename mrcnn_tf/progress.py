"""Progress of a long loop (evaluation, TFRecord conversion): counts, rate and ETA, as
detectron2's "Inference done N/M". On a terminal one line is rewritten in place; in a log file a
line is written every tenth of the work (and at the end), so logs stay short."""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """``Progress(total, "evaluation")``; ``update(n)`` after each n items; ``close()``.

    ``total`` may be None (unknown): the count and rate are shown without an ETA."""

    def __init__(self, total: int | None, label: str, unit: str = "images", stream=None):
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done, self.start, self._next_line = 0, time.perf_counter(), 0.1

    def text(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = elapsed / self.done if self.done else 0.0
        out = f"{self.label}: {self.done}" + (f"/{self.total}" if self.total else "") + (
            f" {self.unit}, {rate:.2f} s/{self.unit.rstrip('s')}, elapsed {_clock(elapsed)}")
        if self.total and self.done:
            out += f", ETA {_clock(rate * max(self.total - self.done, 0))}"
        return out

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.tty:
            self.stream.write("\r" + self.text())
            self.stream.flush()
        elif self.total and self.done >= self._next_line * self.total:
            self.stream.write(self.text() + "\n")
            self.stream.flush()
            while self._next_line * self.total <= self.done:
                self._next_line += 0.1

    def close(self) -> None:
        finished = not self.total or self.done >= self.total
        if self.tty:
            self.stream.write("\r" + self.text() + "\n")
        elif not finished or self.total is None:
            self.stream.write(self.text() + "\n")
        self.stream.flush()
