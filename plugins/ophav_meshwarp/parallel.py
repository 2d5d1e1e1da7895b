"""Coarse frames are independent: several can be drawn at once (option ``workers``), by threads.

Measured with ``benchmarks/bench_meshwarp.py --speed-only`` (200 frames of the built-in script; RESULTS.md):
on the 2-core machine at 512x512 one thread drew 25.9 frames/s and three 32.9; on the GPU machine's 16 cores one
drew 29.7 and 2-16 threads 24-25, since OpenCV already spreads one frame's remaps over the cores and threads then
fight over the GIL. So the default is one thread, and ``workers`` is for small machines drawing large frames.

Threads, not processes: OpenCV's and numpy's large operations release the GIL, so threads share the work
without copying the source; processes would re-import a user's script that calls :func:`ophav_core.api.run`
without a ``__main__`` guard (``spawn``), or inherit CUDA's, MediaPipe's and OpenMP's threads (``fork``); two
``spawn``ed processes on the 2-core machine drew 16.1 frames/s.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


def worker_count(frames: int, requested: int | None) -> int:
    """Threads to draw ``frames`` with: ``requested`` (default 1), never more than the frames."""
    return max(1, min(requested or 1, frames))


def draw_frames(source, rotations: np.ndarray, offsets: Sequence[np.ndarray | None], workers: int) -> Iterator:
    """(frame, FrameInfo) of :func:`~ophav_meshwarp.warper.render_frame` for each rotation and head-space
    offsets, in order; ``workers`` threads draw them."""
    from ophav_meshwarp.warper import render_frame

    if workers <= 1:
        for rotation, offset in zip(rotations, offsets):
            yield render_frame(source, rotation, offset)
        return
    from concurrent.futures import ThreadPoolExecutor

    import cv2

    # The threads are the parallelism: OpenCV's own pool under each of them oversubscribes the cores.
    cv2_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="meshwarp")
    try:
        yield from pool.map(render_frame, [source] * len(rotations), rotations, offsets)
    finally:
        # On an interrupt (or an error in a frame) the frames not started are dropped, not drawn.
        pool.shutdown(wait=True, cancel_futures=True)
        cv2.setNumThreads(cv2_threads)
