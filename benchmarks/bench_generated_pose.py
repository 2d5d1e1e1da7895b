"""How well the coarse video's tracking fits the frames meshwarp drew, with the tracker's own poses and with the
poses fitted onto the mesh meshwarp drew each frame with (``Tracking.posed_onto``, what ``ophav run`` does unless
``--set generated_pose=false``).

    python benchmarks/bench_generated_pose.py examples/astronaut.jpg ../shared/data/portraits/Julia_Roberts_crop.png

For each portrait: the built-in driving script (yaw +-52) through meshwarp at --size, tracked by the mediapipe
tracker as a video (as a run does). Reported: reprojection of the tracked mesh against the drawn mesh (mean and
95th percentile of the per-frame mean, in % of the face width), and the yaw error against the script (frame 0 is
the script's yaw 0; all frames and the frames the script turns past 30 degrees).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("portraits", nargs="+")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()

    from ophav_core import api
    from ophav_core.media.portrait import read_portrait
    from ophav_core.pipeline.animate import pose_angles
    from ophav_core.stages import motion as motion_lib
    from ophav_core.stages.image2video import GENERATED_CAMERA, GENERATED_VERTICES

    context = api.context(Path(tempfile.mkdtemp(prefix="ophav-pose-")), "preview", "cpu", quiet=True)
    meshwarp, _ = api.create("image2video", "meshwarp", context, [f"image2video.resolution={args.size}"])
    tracker, _ = api.create("tracker", "mediapipe", context)
    motion = motion_lib.motion_from_script(motion_lib.default_script(), fps=10, duration=12)
    print("| portrait | poses | reprojection mean | p95 | yaw error mean | yaw error, script beyond 30 deg |")
    print("|---|---|---:|---:|---:|---:|")
    for path in args.portraits:
        frames = meshwarp.generate(read_portrait(path), motion)
        tracked = tracker.track(frames, source=path)
        camera = frames.driving[GENERATED_CAMERA]
        goal = tracked.project(frames.driving[GENERATED_VERTICES], camera[0])
        mouth = [tracked.semantic["mouth_left"], tracked.semantic["mouth_right"]]
        face_px = 2.5 * np.linalg.norm(goal[:, mouth[0]].mean(1) - goal[:, mouth[1]].mean(1), axis=-1).mean()
        posed = tracked.posed_onto(frames.driving[GENERATED_VERTICES], camera)
        turned = np.abs(motion.yaw) > 30
        for name, tracking in (("tracker's", tracked), ("fitted onto the drawn mesh", posed)):
            per_frame = np.linalg.norm(tracking.project(tracking.vertices) - goal, axis=-1).mean(axis=1)
            yaw = pose_angles(tracking)[0]
            error = np.abs(yaw - yaw[0] - motion.yaw)
            print(f"| {Path(path).stem} | {name} | {100 * per_frame.mean() / face_px:.2f}% | "
                  f"{100 * np.percentile(per_frame, 95) / face_px:.2f}% | {error.mean():.1f} | "
                  f"{error[turned].mean():.1f} |", flush=True)


if __name__ == "__main__":
    main()
