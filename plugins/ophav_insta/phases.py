"""Optional timing of named phases (sample rays, deform, hash encoding, ...) of a training step or a render:
what the benchmark's ``--profile`` mode prints.

Off by default: :func:`phase` then returns one shared no-op context manager (no event, no sync, no
allocation). While a :class:`PhaseTimer` is active, each region records

* a pair of CUDA events on the current stream: the GPU time between the region's first and last kernel
  boundaries, read only at the end (no sync inside the step, so the pipeline is undisturbed; when the host
  issues kernels slower than the GPU runs them, this time includes the GPU waiting for the host);
* the host (Python + launch) time spent issuing the region;
* a ``torch.profiler.record_function`` range of the same name (for the profiler's kernel-time attribution).

Regions must not nest (each phase is counted once); inside ``torch.compile`` tracing they are skipped.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

_NULL = contextlib.nullcontext()
_ACTIVE: "PhaseTimer | None" = None


def phase(name: str) -> contextlib.AbstractContextManager:
    """A timed region when a :class:`PhaseTimer` is active, else a no-op."""
    timer = _ACTIVE
    return _NULL if timer is None else timer.region(name)


def _compiling() -> bool:
    import torch

    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(check()) if check is not None else False


class PhaseTimer:
    """Accumulates per-phase GPU (event) and host times while active (``with PhaseTimer(cuda) as timer:``)."""

    def __init__(self, cuda: bool, serialize: bool = False):
        """``serialize``: synchronize before and after every region, so its GPU time is the phase alone (no
        overlap with the host issuing the next phase): the phase's own cost, not what it adds to a pipeline."""
        self.cuda, self.serialize = cuda, serialize
        self.host: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.events: dict[str, list[Any]] = defaultdict(list)
        self.order: list[str] = []

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        import torch

        if _compiling():
            yield
            return
        if name not in self.order:
            self.order.append(name)
        label = torch.profiler.record_function(f"phase: {name}")
        label.__enter__()
        start = end = None
        if self.cuda and self.serialize:
            torch.cuda.synchronize()
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        began = time.perf_counter()
        try:
            yield
        finally:
            self.host[name] += time.perf_counter() - began
            if self.cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self.events[name].append((start, end))
                if self.serialize:
                    torch.cuda.synchronize()
            self.calls[name] += 1
            label.__exit__(None, None, None)

    def __enter__(self) -> "PhaseTimer":
        global _ACTIVE
        _ACTIVE = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _ACTIVE
        _ACTIVE = None

    def summary(self) -> dict[str, dict[str, float]]:
        """Per phase: total GPU ms between its events (CUDA only; synchronizes once), host ms, calls."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        out = {}
        for name in self.order:
            gpu = sum(s.elapsed_time(e) for s, e in self.events[name]) if self.cuda else float("nan")
            out[name] = {"gpu_ms": gpu, "host_ms": self.host[name] * 1e3, "calls": self.calls[name]}
        return out
