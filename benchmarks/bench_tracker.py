"""Frames per second of the ``mediapipe`` tracker (and segmenter) on 512x512 frames, with a per-part split.

Runs in one process on the CPU (MediaPipe's legacy solutions have no GPU path in the Python wheel):

    .venv/bin/python benchmarks/bench_tracker.py [--video PATH] [--frames N] [--repeat R] [--segmenter]

Uses ../shared/data/driving/talk_78f.mp4 when present, else a synthetic 512x512 clip of skimage's astronaut
moving across the frame. Prints a table: part, seconds, ms per frame, share. The target is 100 frames/s.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np

DEFAULT_VIDEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "driving" / "talk_78f.mp4"


def load_frames(video: Path | None, count: int) -> tuple[np.ndarray, str]:
    from ophav_core.media import read_video

    if video is not None and video.exists():
        return read_video(video, max_frames=count, size=512).frames, str(video)
    import skimage.data

    image = skimage.data.astronaut()
    shifts = np.round(12 * np.sin(np.linspace(0, 4 * np.pi, count))).astype(int)
    return np.stack([np.roll(image, s, axis=1) for s in shifts]), "astronaut (synthetic motion)"


def time_tracker(frames: np.ndarray, repeat: int) -> list[tuple[str, float]]:
    from ophav_core.stages import FrameSet
    from ophav_mediapipe.detect import detect_landmarks, make_face_mesh
    from ophav_mediapipe.tracker import MediapipeTracker

    tracker = MediapipeTracker()
    clip = FrameSet(frames, fps=25.0)
    # The first call in a process loads the model files (a one-off cost); later calls only start a graph.
    start = time.perf_counter()
    make_face_mesh(single_image=False).close()
    cold = time.perf_counter() - start
    best, cpu = None, []
    for _ in range(repeat):
        cpu_start = time.process_time()
        tracker.track(clip, source="benchmark")
        cpu.append(time.process_time() - cpu_start)
        if best is None or tracker.last_timings.total < best.total:
            best = tracker.last_timings
    det = detect_landmarks(frames)
    return [
        ("first model load in a process (once)", cold),
        ("detect: mediapipe face mesh + upscale", best.detect),
        ("  of which FaceMesh.process", det.seconds),
        ("pose: Procrustes + 2x solvePnP", best.pose),
        ("expression: basis + projection", best.expression),
        ("smoothing + gap filling", best.smooth),
        ("tracker total (warm)", best.total),
        ("CPU time of the process (all threads)", min(cpu)),
    ]


def time_segmenter(frames: np.ndarray) -> float:
    from ophav_core.stages import FrameSet
    from ophav_mediapipe.segmenter import MediapipeSegmenter

    segmenter = MediapipeSegmenter()
    segmenter.segment(FrameSet(frames[:2], fps=25.0))  # load the models once
    start = time.perf_counter()
    segmenter.segment(FrameSet(frames, fps=25.0))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    parser.add_argument("--frames", type=int, default=78)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--segmenter", action="store_true", help="also time the segmenter")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    frames, source = load_frames(args.video, args.frames)
    n = len(frames)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; frames: {n} x "
          f"{frames.shape[2]}x{frames.shape[1]} from {source}; best of {args.repeat}")
    rows = time_tracker(frames, args.repeat)
    total = rows[-2][1]
    print(f"{'part':40s} {'seconds':>8s} {'ms/frame':>9s} {'share':>6s}")
    for name, seconds in rows:
        print(f"{name:40s} {seconds:8.3f} {1000 * seconds / n:9.2f} {100 * seconds / total:5.0f}%")
    print(f"tracker: {n / total:.1f} frames/s warm (target 100); {n / (total + rows[0][1]):.1f} frames/s "
          f"including the first model load; {n / rows[-1][1]:.1f} frames per CPU-second")
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print(f"note: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: other processes share the "
              f"cores, wall-clock rates are lower than on an idle machine")
    if args.segmenter:
        seconds = time_segmenter(frames)
        print(f"segmenter without tracking (selfie segmentation + face mesh + head region), warm: "
              f"{n / seconds:.1f} frames/s")


if __name__ == "__main__":
    main()
