"""Timing helpers shared by the benchmark scripts (imported as a sibling module when a script runs)."""
from __future__ import annotations

import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(step: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    """Seconds per call of ``step``: median of ``iters`` timed calls after ``warmup`` untimed ones, each call
    synchronised so device work is counted."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
