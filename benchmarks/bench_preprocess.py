"""``ophav preprocess`` of a video, step by step: where its time goes.

    python benchmarks/bench_preprocess.py ../shared/data/driving/talk_78f.mp4 [--size 512] [--out r.json]

Runs what :func:`ophav_core.api.preprocess` runs, in its order, and times each part: creating the components
(model loading), decoding, tracking, segmentation, writing the dataset's arrays, and the pose plot and contact
sheets. Also times the whole ``api.preprocess`` call once, which is what a user waits for (after the imports).
Frames/s = frames / that wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", type=Path)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from ophav_core import api
    from ophav_core.config import DEFAULT_COMPONENTS
    from ophav_core.media import mask_overlay, mesh_overlay, plot_pose, read_video, save_png

    steps: dict[str, float] = {}

    def timed(name, fn, *a, **k):
        started = time.perf_counter()
        value = fn(*a, **k)
        steps[name] = round(time.perf_counter() - started, 3)
        return value

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "parts"
        out.mkdir()
        work = api.context(out / "work", "standard", "cpu", True)
        tracker, _ = timed("create tracker", api.create, "tracker", DEFAULT_COMPONENTS["tracker"], work)
        segmenter, _ = timed("create segmenter", api.create, "segmenter", DEFAULT_COMPONENTS["segmenter"], work)
        frames = timed("decode", read_video, args.video, size=args.size)
        tracking = timed("track", tracker.track, frames, source=str(args.video))
        masks = timed("segment", segmenter.segment, frames, tracking)
        timed("write frames.npz", frames.save, out / "frames.npz")
        timed("write masks.npz", masks.save, out / "masks.npz")
        timed("write tracking.npz", tracking.save, out / "tracking.npz")
        timed("pose plot", plot_pose, tracking, out / "pose.png", fps=frames.fps, title="pose")
        timed("mesh sheet", lambda: save_png(out / "mesh.png", mesh_overlay(frames, tracking)))
        timed("mask sheet", lambda: save_png(out / "overlay.png", mask_overlay(frames, masks)))
        started = time.perf_counter()
        api.preprocess(args.video, Path(tmp) / "whole", size=args.size, device="cpu", quiet=True)
        whole = time.perf_counter() - started
    result = {"video": str(args.video), "frames": len(frames), "size": args.size, "steps_seconds": steps,
              "preprocess_seconds": round(whole, 2), "frames_per_second": round(len(frames) / whole, 2),
              "cpu_count": os.cpu_count()}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
