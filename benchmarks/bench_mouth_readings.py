"""How well two independent instruments agree on a driver's mouth: the ceiling of the fidelity suite's mouth-opening
correlation (issue 15, criterion 2).

    python benchmarks/bench_mouth_readings.py [--sizes 128 256] [--stride 3] [--suites OUT/fid_LABEL_NAME.npz ...]

For each driving video in ../shared/data/driving (every ``stride``-th frame, as bench_fidelity.py renders them):
the inner-lip gap over the face width read by dlib's 68 landmarks (what bench_fidelity.py scores with), and read
from the mesh of the run's tracker (MediaPipe; the avatar is driven by this reading), and their correlation. An
avatar that followed the tracker's reading exactly would score about that correlation against dlib.

``--suites``: fidelity-suite files (bench_fidelity.py render) whose ``nod`` renders are also correlated with both
readings, to see how much of its own driving signal the avatar keeps.
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


def readings(frames, tracker, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(dlib, tracker) mouth openings over face width per frame (dlib NaN where it finds no face)."""
    import bench_fidelity as bf
    from ophav_metrics import faces

    dlib = bf.mouth_opening(faces.landmarks68(frames.frames))
    tracking = tracker.track(frames, source=source)
    px = tracking.project(tracking.vertices)
    gap = np.linalg.norm(px[:, MP_UPPER_INNER_LIP] - px[:, MP_LOWER_INNER_LIP], axis=-1)
    width = np.linalg.norm(px[:, MP_CHEEK_RIGHT] - px[:, MP_CHEEK_LEFT], axis=-1)
    return dlib, gap / width


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[ok], b[ok])[0, 1]) if ok.sum() > 3 else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--stride", type=int, default=3)
    parser.add_argument("--suites", nargs="*", default=[])
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")

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
        data = np.load(file)
        for stage in ("fit", "final"):
            if f"{stage}/nod/rgb" not in data:
                continue
            rendered = data[f"{stage}/nod/rgb"]
            dlib, mesh = readings(driver("nod_175f.mp4", rendered.shape[1]), tracker, "nod")
            ours = bf.mouth_opening(faces.landmarks68(rendered))
            print(f"| {Path(file).stem} | {stage} | {_corr(ours, dlib):.3f} | {_corr(ours, mesh):.3f} |", flush=True)


if __name__ == "__main__":
    main()
