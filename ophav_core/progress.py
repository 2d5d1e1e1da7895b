"""Progress bars for long loops: rich when attached to a terminal, plain periodic lines otherwise."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator


class _Bar:
    def __init__(self, total: int | None, description: str, disable: bool):
        self.total, self.description, self.disable = total, description, disable
        self.count, self.fields, self._start, self._last = 0, {}, time.perf_counter(), 0.0
        self._rich = None
        if not disable and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._rich = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                  transient=False)
            self._rich.start()
            self._task = self._rich.add_task(description, total=total, info="")

    def advance(self, n: int = 1, **fields) -> None:
        self.count += n
        self.fields.update(fields)
        if self.disable:
            return
        info = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.fields.items())
        if self._rich is not None:
            self._rich.update(self._task, advance=n, info=info)
            return
        now = time.perf_counter()
        if now - self._last >= 5.0 or (self.total is not None and self.count >= self.total):
            self._last = now
            rate = self.count / max(now - self._start, 1e-9)
            of = f"/{self.total}" if self.total is not None else ""
            print(f"{self.description}: {self.count}{of} ({rate:.1f}/s) {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


@contextmanager
def progress_bar(total: int | None, description: str, disable: bool = False) -> Iterator[_Bar]:
    bar = _Bar(total, description, disable)
    try:
        yield bar
    finally:
        bar.close()
