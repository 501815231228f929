"""Progress bars that suit where the output goes: a live bar on a terminal, a few lines in a log.

tqdm redraws its bar with a carriage return on every update; in a CI log or a file each redraw
becomes a line, thousands per export. When stderr is not a terminal, :func:`progress_bar` writes
one line every ``LOG_INTERVAL`` seconds at most, and a summary line when the work ends.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator

LOG_INTERVAL = 10.0  # seconds between progress lines in a log


class _LogProgress:
    """The log form of a bar: ``desc: n/total unit (rate)`` now and then, and once at the end."""

    def __init__(self, total: int | None, desc: str, unit: str, stream=None):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self.stream = stream or sys.stderr
        self.start = self.last = time.perf_counter()
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= LOG_INTERVAL:
            self.last = now
            self._line(now)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _line(self, now: float, done: bool = False) -> None:
        elapsed = now - self.start
        of = f"/{self.total}" if self.total is not None else ""
        rate = f", {self.n / elapsed:.1f} {self.unit}/s" if elapsed > 0 and self.n else ""
        tail = f", {self.postfix}" if self.postfix else ""
        state = f"done in {elapsed:.1f} s" if done else f"{elapsed:.0f} s"
        print(f"{self.desc}: {self.n}{of} {self.unit} ({state}{rate}{tail})", file=self.stream, flush=True)

    def close(self) -> None:
        if self.n:
            self._line(time.perf_counter(), done=True)

    def __enter__(self) -> _LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Silent:
    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def progress_bar(*, total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True):
    """A context-managed bar with ``update(n)``, ``set_postfix(**values)``, ``set_postfix_str(text)``
    and ``close()``: tqdm's interface, whichever form it takes."""
    if not enabled:
        return _Silent()
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit)
    return _LogProgress(total, desc, unit)


def progress(items: Iterable, *, total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True) -> Iterator:
    """Iterate ``items`` behind a :func:`progress_bar`."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar(total=total, desc=desc, unit=unit, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update(1)
