"""How well two independent instruments agree on a driver's mouth: the ceiling of the fidelity suite's mouth-opening
correlation (issue 15, criterion 2).

    python benchmarks/bench_mouth_readings.py [--sizes 128 256] [--stride 3] [--suites OUT/fid_LABEL_NAME.npz ...]
    python benchmarks/bench_mouth_readings.py --filters 1.0,0.2 1.0,5.0 off   # the tracker's expression filter

For each driving video in ../shared/data/driving (every ``stride``-th frame, as bench_fidelity.py renders them):
the inner-lip gap over the face width read by dlib's 68 landmarks (what bench_fidelity.py scores with), and read
from the mesh of the run's tracker (MediaPipe; the avatar is driven by this reading), and their correlation. An
avatar that followed the tracker's reading exactly would score about that correlation against dlib.

``--suites``: fidelity-suite files (bench_fidelity.py render) whose ``nod`` renders are also correlated with both
readings, to see how much of its own driving signal the avatar keeps.

``--filters``: instead, for each setting of the tracker's expression One-Euro filter (``min_cutoff,beta`` at
``smooth`` = 1, or ``off``), the tracker-vs-dlib correlation on every frame of both drivers at 256 px (full frame
rate, as ``ophav render --driver`` tracks) and the projected mesh's mean step per frame on a still, noisy portrait
(tests/test_mediapipe.py's: 12 frames of skimage's astronaut with grey-level noise of sigma 4).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

MP_UPPER_INNER_LIP, MP_LOWER_INNER_LIP, MP_CHEEK_RIGHT, MP_CHEEK_LEFT = 13, 14, 234, 454  # MediaPipe mesh indices


def readings(frames, tracker, source: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(dlib, tracker) mouth openings over face width per frame (dlib NaN where it finds no face; the tracker's
    None when ``tracker`` is None)."""
    import bench_fidelity as bf
    from ophav_metrics import faces

    dlib = bf.mouth_opening(faces.landmarks68(frames.frames))
    return dlib, None if tracker is None else _tracker_reading(tracker.track(frames, source=source))


def _tracker_reading(tracking) -> np.ndarray:
    px = tracking.project(tracking.vertices)
    gap = np.linalg.norm(px[:, MP_UPPER_INNER_LIP] - px[:, MP_LOWER_INNER_LIP], axis=-1)
    width = np.linalg.norm(px[:, MP_CHEEK_RIGHT] - px[:, MP_CHEEK_LEFT], axis=-1)
    return gap / width


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[ok], b[ok])[0, 1]) if ok.sum() > 3 else float("nan")


def filter_sweep(settings: list[str]) -> None:
    import bench_fidelity as bf
    import ophav_mediapipe.tracker as tracker_module
    from ophav_core.media import read_video
    from ophav_core.stages import FrameSet
    from ophav_mediapipe.tracker import MediapipeTracker
    from skimage import data

    portrait = data.astronaut()
    rng = np.random.default_rng(0)
    still = FrameSet(np.clip(portrait[None].astype(np.int16) + rng.normal(0, 4, (12,) + portrait.shape), 0, 255)
                     .astype(np.uint8), fps=25.0)
    videos = {v: read_video(bf.SHARED / "driving" / v, size=256) for v in ("nod_175f.mp4", "talk_78f.mp4")}
    dlib = {v: readings(f, None, v)[0] for v, f in videos.items()}
    tracker = MediapipeTracker()
    default = tracker_module._FILTERS["expression"]
    print("| expression filter (min_cutoff Hz, beta) | nod_175f: tracker vs dlib | talk_78f | still head, px a frame |")
    print("|---|---:|---:|---:|")
    try:
        for setting in settings:
            tracker_module._FILTERS["expression"] = (1e9, 0.0) if setting == "off" else \
                tuple(float(x) for x in setting.split(","))
            moved = tracker.track(still)
            px = moved.project(moved.vertices.astype(np.float64))
            step = float(np.linalg.norm(np.diff(px, axis=0), axis=-1).mean())
            corr = [_corr(dlib[v], _tracker_reading(tracker.track(f, source=v))) for v, f in videos.items()]
            print(f"| {setting} | {corr[0]:.3f} | {corr[1]:.3f} | {step:.3f} |", flush=True)
    finally:
        tracker_module._FILTERS["expression"] = default


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--stride", type=int, default=3)
    parser.add_argument("--suites", nargs="*", default=[])
    parser.add_argument("--filters", nargs="*", default=None)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.filters is not None:
        filter_sweep(args.filters)
        return

    import bench_fidelity as bf
    from ophav_core import api
    from ophav_core.media import read_video
    from ophav_metrics import faces

    work = api.context(Path("/tmp/ophav-mouth-readings"), "standard", "cpu", True)
    tracker, _ = api.create("tracker", "mediapipe", work)

    def driver(video: str, size: int):
        frames = read_video(bf.SHARED / "driving" / video, size=size)
        keep = np.arange(0, len(frames), args.stride)
        return type(frames)(frames.frames[keep], frames.fps / args.stride)

    print("| driver | size | frames | mouth opening std (dlib) | dlib vs tracker on the driver |")
    print("|---|---:|---:|---:|---:|")
    for size in args.sizes:
        for video in ("talk_78f.mp4", "nod_175f.mp4"):
            frames = driver(video, size)
            dlib, mesh = readings(frames, tracker, video)
            print(f"| {video} | {size} | {int(np.isfinite(dlib).sum())} | {np.nanstd(dlib):.4f} | "
                  f"{_corr(dlib, mesh):.3f} |", flush=True)
    if args.suites:
        print("\n| suite | avatar | nod renders vs dlib's driver reading | vs the tracker's |")
        print("|---|---|---:|---:|")
    for file in args.suites:
        data = bf.load_suite(Path(file))
        for stage in ("fit", "final"):
            if f"{stage}/nod/rgb" not in data:
                continue
            rendered = data[f"{stage}/nod/rgb"]
            dlib, mesh = readings(driver("nod_175f.mp4", rendered.shape[1]), tracker, "nod")
            ours = bf.mouth_opening(faces.landmarks68(rendered))
            print(f"| {Path(file).stem} | {stage} | {_corr(ours, dlib):.3f} | {_corr(ours, mesh):.3f} |", flush=True)


if __name__ == "__main__":
    main()
