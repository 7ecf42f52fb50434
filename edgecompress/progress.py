"""Progress bars for long work, drawn on stderr so `--json` output on stdout stays clean."""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

from rich.console import Console

console = Console(stderr=True)


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
