"""Progress for long steps: a tqdm bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


def is_tty() -> bool:
    return sys.stderr.isatty()


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Yield `items`; draw a bar on a TTY, else log about every tenth step (CI logs stay short)."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    if is_tty():
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)
        return
    every = max(1, (total or 10) // 10)
    start = time.monotonic()
    i = 0
    for i, item in enumerate(items, 1):
        yield item
        if i % every == 0 or i == total:
            log.info(
                "%s: %d/%s (%.1fs)", desc, i, total if total else "?", time.monotonic() - start
            )
    if total is None:
        log.info("%s: done, %d steps (%.1fs)", desc, i, time.monotonic() - start)
