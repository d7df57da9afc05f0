"""A tiny progress bar on stderr (no tqdm dependency).

``Progress`` draws ``label [#####-----] 3/10 2.1s note`` on one line of a terminal, redrawn
at most ten times a second; on a non-terminal stream (CI logs, pipes) it writes a plain line
at most once a second and when it finishes, so logs stay readable. A disabled bar (the Python
API's default, ``--quiet`` in the CLI) writes nothing.

>>> with Progress(3, "calibrate", enabled=False) as bar:
...     for i in range(3):
...         bar.update(note=f"item {i}")
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """A counted progress bar; use as a context manager, call :meth:`update` per step."""

    WIDTH = 24

    def __init__(self, total: int, label: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = max(int(total), 1)
        self.label = label
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.note = ""
        self.started = time.perf_counter()
        self._last_draw = 0.0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._drawn_width = 0
        self._last_state: tuple[int, str] | None = None

    def __enter__(self) -> Progress:
        self.started = time.perf_counter()
        self._draw(force=self._tty)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1, note: str = "") -> None:
        """``n`` more steps done; ``note`` (e.g. what runs next) is shown after the bar."""
        self.done = min(self.done + n, self.total)
        if note:
            self.note = note
        self._draw()

    def set_note(self, note: str) -> None:
        """Change the note without advancing (e.g. 'compiling...')."""
        self.note = note
        self._draw()

    def close(self) -> None:
        """Draw the final state and end the line."""
        if not self.enabled:
            return
        self._draw(force=True)
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()
        self.enabled = False

    def _line(self) -> str:
        frac = self.done / self.total
        fill = round(frac * self.WIDTH)
        bar = "#" * fill + "-" * (self.WIDTH - fill)
        elapsed = time.perf_counter() - self.started
        note = f" {self.note}" if self.note else ""
        return f"{self.label} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s{note}"

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        interval = 0.1 if self._tty else 1.0
        if not force and now - self._last_draw < interval and self.done < self.total:
            return
        if not self._tty and self._last_state == (self.done, self.note):
            return  # a log gets each state once
        self._last_state = (self.done, self.note)
        self._last_draw = now
        line = self._line()
        if self._tty:
            pad = max(self._drawn_width - len(line), 0)
            self.stream.write("\r" + line + " " * pad)
            self._drawn_width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def progress(total: int, label: str, enabled: bool) -> Progress:
    """Shorthand used by the tools: ``with progress(n, "bench", show) as bar: ...``."""
    return Progress(total, label, enabled=enabled)
