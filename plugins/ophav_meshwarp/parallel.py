"""Coarse frames are independent: draw several at once on the machine's cores.

Threads, not processes. OpenCV's remaps and resizes and numpy's large array operations release the GIL, so
threads share the work without copying the source; measured on the 2-core machine at 512x512 (100 frames of a
yaw sweep): one thread 17.8 frames/s, two 21.6, three 26.0, while two ``spawn``ed processes reached 16.1 (their
start and two OpenBLAS pools on two cores ate the gain). Processes would also re-import a user's script that
calls :func:`ophav_core.api.run` without a ``__main__`` guard, and forking a parent that holds CUDA's, MediaPipe's
and OpenMP's threads is not safe.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np

MAX_WORKERS = 16
# More threads than cores still helped on the 2-core machine (the GIL-held parts of one frame overlap the
# GIL-free parts of another).
THREADS_PER_CORE = 1.5


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_count(frames: int, requested: int | None) -> int:
    """``requested`` if given, else about 1.5 threads per core (at most 16), never more than the frames."""
    wanted = requested if requested is not None else round(THREADS_PER_CORE * available_cores())
    return max(1, min(wanted, MAX_WORKERS if requested is None else wanted, frames))


def draw_frames(source, rotations: np.ndarray, offsets: Sequence[np.ndarray | None], workers: int) -> Iterator:
    """(frame, FrameInfo) of :func:`~ophav_meshwarp.warper.render_frame` for each rotation and head-space
    offsets, in order; ``workers`` threads draw them."""
    from ophav_meshwarp.warper import render_frame

    if workers <= 1:
        for rotation, offset in zip(rotations, offsets):
            yield render_frame(source, rotation, offset)
        return
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(workers, thread_name_prefix="meshwarp")
    try:
        yield from pool.map(render_frame, [source] * len(rotations), rotations, offsets)
    finally:
        # On an interrupt (or an error in a frame) the frames not started are dropped, not drawn.
        pool.shutdown(wait=True, cancel_futures=True)
