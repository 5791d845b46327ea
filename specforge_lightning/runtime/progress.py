"""Progress that reads well in a terminal AND in a log file.

Why: a rich bar redraws one line in place; with stdout piped to a file or a CI log it shows
nothing until the end (or floods the log), so a 20-minute capture looks hung. On a TTY this
keeps the transient rich bar; otherwise it prints a plain line at least every ``interval_s``
seconds (a heartbeat thread covers a batch that takes longer than the interval), plus a
final line:

    capture train: 384/1024 (38%), rate 5.21/s, ETA 02:03
    capture train: 1024/1024 (100%), rate 5.30/s, done in 03:13

``fit_progress.PlainProgressLogger`` does the same for ``Trainer.fit``; it lives apart so that
capture and regeneration, which use ``track``, do not import Lightning (~3 s here).
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO


def is_tty(stream: TextIO | None) -> bool:
    """Whether ``stream`` is an interactive terminal (anything without ``isatty`` is not)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed or file-like objects without a terminal
        return False


def format_duration(seconds: float | None) -> str:
    """``mm:ss`` (minutes may exceed 59, so a log line keeps one shape); ``--:--`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    whole = int(round(seconds))
    return f"{whole // 60:02d}:{whole % 60:02d}"


def format_rate(rate: float) -> str:
    """Three significant figures without scientific notation: 0.123, 5.21, 42.1, 1234."""
    if rate >= 100:
        return f"{rate:.0f}"
    if rate >= 10:
        return f"{rate:.1f}"
    return f"{rate:.2f}"


def progress_line(description: str, done: float, total: float | None, elapsed: float, *, final: bool = False) -> str:
    """``"<description>: done/total (pct%), rate <x>/s, ETA mm:ss"`` (``done in mm:ss`` at the end)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    count = f"{done:g}/{total:g} ({100.0 * done / total:.0f}%)" if total else f"{done:g}"
    if final:
        tail = f"done in {format_duration(elapsed)}"
    elif total and rate > 0:
        tail = f"ETA {format_duration((total - done) / rate)}"
    else:
        tail = "ETA --:--"
    return f"{description}: {count}, rate {format_rate(rate)}/s, {tail}"


class Heartbeat:
    """Calls ``emit`` when ``interval_s`` passed without a line, from a daemon thread.

    The owner also calls ``due()`` from its own thread (after each advance/step) so lines come
    on time even if the thread is starved; a lock keeps the two from printing twice.
    """

    def __init__(self, interval_s: float, emit: Callable[[], None], clock: Callable[[], float]) -> None:
        self.interval_s = max(0.0, float(interval_s))
        self._emit = emit
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last = clock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._last = self._clock()
        self._thread = threading.Thread(target=self._run, name="plain-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        wait = max(self.interval_s / 4, 0.05)  # wakes 4x per interval; the owner covers shorter ones
        while not self._stop.wait(wait):
            self.due()

    def due(self) -> None:
        """Emit one line if the interval has passed since the last one."""
        with self._lock:
            now = self._clock()
            if now - self._last >= self.interval_s:
                self._last = now
                self._emit()

    def now(self) -> None:
        """Emit one line at once (start and end lines)."""
        with self._lock:
            self._last = self._clock()
            self._emit()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)


class Tracker:
    """One progress counter: a rich bar on a TTY, plain lines otherwise, nothing when disabled.

    ``stream`` defaults to stdout; ``enabled=False`` is silent (a caller's ``progress: false``);
    ``plain`` forces (True) or forbids (False) plain lines whatever the stream is.
    """

    def __init__(
        self,
        total: float | None,
        description: str,
        *,
        stream: TextIO | None = None,
        interval_s: float = 30.0,
        enabled: bool = True,
        plain: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.description = description
        self.done = 0.0
        self.enabled = enabled
        self._stream = stream
        self._clock = clock
        self._start = clock()
        self._plain = plain
        self._interval_s = interval_s
        self._bar: Any = None
        self._task: Any = None
        self._beat: Heartbeat | None = None

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    def elapsed(self) -> float:
        return self._clock() - self._start

    def line(self, *, final: bool = False) -> str:
        return progress_line(self.description, self.done, self.total, self.elapsed(), final=final)

    def _print(self, final: bool = False) -> None:
        print(self.line(final=final), file=self.stream, flush=True)

    def __enter__(self) -> Tracker:
        self._start = self._clock()
        if not self.enabled:
            return self
        plain = self._plain if self._plain is not None else not is_tty(self.stream)
        if plain:
            self._beat = Heartbeat(self._interval_s, self._print, self._clock)
            self._beat.now()
            self._beat.start()
        else:
            from rich.console import Console
            from rich.progress import Progress

            # Two renders a second: the bar's thread otherwise competes with the work on small CPUs.
            self._bar = Progress(console=Console(file=self.stream), transient=True, refresh_per_second=2)
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def advance(self, n: float = 1) -> None:
        """Count ``n`` more items done; may print a plain line if one is due."""
        self.done += n
        if self._bar is not None:
            self._bar.advance(self._task, n)
        elif self._beat is not None:
            self._beat.due()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._beat is not None:
            self._beat.stop()
            if exc_type is None:
                self._print(final=True)
            else:
                self._print()  # where it stopped, without claiming it finished
            self._beat = None


track = Tracker
"""A context manager counting ``total`` items: ``with track(n, "capture") as t: t.advance(k)`` (the call sites' name)."""
