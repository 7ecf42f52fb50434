"""Progress bars for long work, drawn on stderr so `--json` output on stdout stays clean."""

from __future__ import annotations

import os
import contextlib
from typing import Any, Callable, Iterable, Iterator

from rich.console import Console

console = Console(stderr=True, log_path=False)


def enabled_by_default() -> bool:
    """Progress bars unless EDGECOMPRESS_NO_PROGRESS is set (tests, CI logs)."""
    return not os.environ.get("EDGECOMPRESS_NO_PROGRESS")


def track(items: Iterable[Any], total: int | None, description: str, enabled: bool = True) -> Iterator[Any]:
    """Yield ``items`` while showing a transient progress bar (when ``enabled``)."""
    if not enabled:
        yield from items
        return
    from rich.progress import Progress

    with Progress(console=console, transient=True) as bar:
        yield from bar.track(items, total=total, description=description)


@contextlib.contextmanager
def ticker(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """A transient progress bar advanced by calling the yielded function (no-op when disabled)."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)
