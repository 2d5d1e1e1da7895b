"""Speed and landmark reprojection error of the ``flame`` tracker on the shared driving videos.

    python benchmarks/bench_flame.py                       # synthetic FLAME-layout model (FLAME is not shipped)
    python benchmarks/bench_flame.py --model generic_model.pkl --device cuda
    python benchmarks/bench_flame.py --videos /work/shared/data/driving/talk_78f.mp4 --threads 2

Prints, per video: frames, MediaPipe landmark time (the ``mediapipe`` tracker, which the flame tracker uses for
its landmarks and initial pose), FLAME fit time (embedding lookup, batched Levenberg-Marquardt, full meshes,
basis), frames per second of the fit alone and end to end, and the landmark reprojection error as a fraction of
the face width (the distance of MediaPipe landmarks 234 and 454): mean, median, 95th percentile, worst frame.
Model loading and the one-off embedding derivation are timed separately (the embedding is cached beside the model).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DRIVING = Path(__file__).resolve().parents[2] / "shared" / "data" / "driving"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a FLAME .pkl (default: a synthetic model in FLAME's layout)")
    parser.add_argument("--videos", nargs="*", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--profile", default="standard")
    parser.add_argument("--max-frames", type=int, default=None)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    store = Path(tempfile.mkdtemp(prefix="ophav-bench-flame-"))
    os.environ["OPHAV_WEIGHTS"] = str(store)
    t0 = time.perf_counter()
    if args.model:
        import shutil

        shutil.copy(args.model, store / "generic_model.pkl")
        kind = f"FLAME file {args.model}"
    else:
        from ophav_flame.synthetic import build_from_topology, write_pickle
        from ophav_mediapipe.mesh import topology

        write_pickle(build_from_topology(topology()), store / "generic_model.pkl")
        kind = "synthetic FLAME-layout model"
    print(f"model: {kind} ({time.perf_counter() - t0:.1f} s to prepare)")

    from ophav_core.media import read_video
    from ophav_core.plugins import get_host
    from ophav_core.testing.contracts import tiny_context

    context = tiny_context(device=args.device, profile=args.profile)
    options = {"device": args.device, "threads": args.threads}
    if args.iterations:
        options["iterations"] = args.iterations
    tracker = get_host().registry.get("tracker", "flame").create(options, context)
    t0 = time.perf_counter()
    tracker.layer()
    print(f"load + verify the model: {time.perf_counter() - t0:.2f} s")
    videos = [Path(v) for v in args.videos] if args.videos else sorted(DRIVING.glob("*.mp4"))
    rows = []
    for index, path in enumerate(videos):
        frames = read_video(path, max_frames=args.max_frames)
        if index == 0:  # the one-off embedding derivation (then cached), and warm-up
            t0 = time.perf_counter()
            tracker.track(frames.__class__(frames.frames[:3], fps=frames.fps))
            print(f"warm-up (MediaPipe start, embedding derived or read from its cache): {time.perf_counter() - t0:.2f} s; "
                  f"{tracker.last_fit['embedding']}")
        t0 = time.perf_counter()
        tracking = tracker.track(frames, source=str(path))
        total = time.perf_counter() - t0
        fit = tracker.last_fit
        err = fit["reprojection"][np.isfinite(fit["reprojection"])]
        row = {"video": path.name, "frames": len(frames), "size": list(frames.size), "device": fit["device"],
               "landmarks_s": round(fit["detect_seconds"], 3), "fit_s": round(fit["fit_seconds"], 3),
               "total_s": round(total, 3), "fit_fps": round(len(frames) / max(total - fit["detect_seconds"], 1e-9), 1),
               "end_to_end_fps": round(len(frames) / total, 1),
               "reprojection_mean": float(err.mean()), "reprojection_median": float(np.median(err)),
               "reprojection_p95": float(np.percentile(err, 95)), "reprojection_max": float(err.max()),
               "valid": int(tracking.valid.sum()), "basis_error_mm": round(fit["basis_error_mm"], 4)}
        rows.append(row)
        print(f"{path.name}: {len(frames)} frames {frames.size[0]}x{frames.size[1]} on {fit['device']}: "
              f"landmarks {row['landmarks_s']:.2f} s, FLAME fit {total - fit['detect_seconds']:.2f} s "
              f"({row['fit_fps']:.1f} frames/s), end to end {row['end_to_end_fps']:.1f} frames/s; reprojection "
              f"mean {row['reprojection_mean']:.2%}, median {row['reprojection_median']:.2%}, "
              f"p95 {row['reprojection_p95']:.2%}, max {row['reprojection_max']:.2%} of the face width; "
              f"contract basis vs exact FLAME {row['basis_error_mm']:.3f} mm")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": kind, "torch_threads": torch.get_num_threads(),
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
