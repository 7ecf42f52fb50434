"""Progress for long work on stderr, so `--json` output on stdout stays clean: a bar on a terminal,
elsewhere (a log file, a pipe) a line at most once a minute."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Iterable, Iterator

from rich.console import Console

console = Console(stderr=True, log_path=False)


def enabled_by_default() -> bool:
    """Progress bars unless EDGECOMPRESS_NO_PROGRESS is set (tests, CI logs)."""
    return not os.environ.get("EDGECOMPRESS_NO_PROGRESS")


def track(items: Iterable[Any], total: int | None, description: str, enabled: bool = True) -> Iterator[Any]:
    """Yield ``items`` while showing a transient progress bar, or log lines off a terminal (when ``enabled``)."""
    if not enabled:
        yield from items
        return
    if not console.is_terminal:
        advance = log_ticker(total, description)
        for item in items:
            yield item
            advance()
        return
    from rich.progress import Progress

    with Progress(console=console, transient=True) as bar:
        yield from bar.track(items, total=total, description=description)


@contextlib.contextmanager
def ticker(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """A transient progress bar (log lines off a terminal) advanced by calling the yielded function
    (no-op when disabled)."""
    if not enabled:
        yield lambda: None
        return
    if not console.is_terminal:
        yield log_ticker(total, description)
        return
    from rich.progress import Progress

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def log_ticker(total: int | None, description: str, every_s: float = 60.0) -> Callable[[], None]:
    """Where no bar can be drawn (stderr is a file or a pipe), a line at most every ``every_s`` seconds:
    items done, time so far and, with a ``total``, an estimate of the time left. Work shorter than
    ``every_s`` prints nothing."""
    start = last = time.monotonic()
    done = 0

    def advance() -> None:
        nonlocal last, done
        done += 1
        now = time.monotonic()
        if now - last < every_s:
            return
        last = now
        elapsed = now - start
        left = f", ~{elapsed / done * (total - done):.0f} s left" if total else ""
        console.log(f"{description}: {done}/{total or '?'} after {elapsed:.0f} s{left}")

    return advance
