"""Fidelity of avatars as a user sees them: novel views, unseen expressions, real drivers.

Two halves, so the GPU machine renders and this machine (which has dlib's models) scores:

    # 1. make avatars and render the same views of each (GPU: --device cuda; CPU: the preview profile)
    python benchmarks/bench_fidelity.py render --portraits A.png B.png --profile preview --device cuda \\
        --work runs/fid --out OUT --label after
    # 2. score the renders with the offline metrics, write the table and before/after sheets
    python benchmarks/bench_fidelity.py score OUT/fid_before_*.npz OUT/fid_after_*.npz --out benchmarks/figures

What is rendered for each avatar (its round-0 fit and its final avatar), at the avatar's own resolution:

* ``views``: neutral expression, yaw -60..60 step 15 at pitch 0, and pitch -25 and +25 at yaw -30, 0, 30;
* ``talk`` / ``nod``: driven by ../shared/data/driving/talk_78f.mp4 and nod_175f.mp4 (every 3rd frame),
  relative motion as ``ophav render --driver``;
* ``extreme``: benchmarks/extreme_expressions.yaml (full intensities combined), coefficients scaled by 1.5.

The driver frames are saved once (``drivers.npz``) for the mouth-opening correlation.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
YAWS = np.arange(-60, 61, 15, dtype=np.float32)
PITCH_VIEWS = [(y, p) for p in (-25.0, 25.0) for y in (-30.0, 0.0, 30.0)]
DRIVER_STRIDE = 3
EXTREME_SCALE = 1.5


def _find(name: str, folders: list[Path]) -> Path:
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    raise SystemExit(f"{name} not found in {', '.join(map(str, folders))}")


def view_grid() -> tuple[np.ndarray, np.ndarray]:
    yaw = np.concatenate([YAWS, [y for y, _ in PITCH_VIEWS]]).astype(np.float32)
    pitch = np.concatenate([np.zeros_like(YAWS), [p for _, p in PITCH_VIEWS]]).astype(np.float32)
    return yaw, pitch


def render_suite(avatar_path: Path, drivers: dict[str, object], work: Path, device: str) -> dict[str, np.ndarray]:
    """Every view of the suite for one avatar: {suite/rgb, suite/alpha} arrays (uint8)."""
    from ophav_core import api
    from ophav_core.pipeline import animate
    from ophav_core.stages.motion import Motion, load_motion_script

    meta = api.avatar_description(avatar_path)
    context = api.context(work, "standard", device, quiet=True)
    field, _ = api.create("field", meta.get("field", "insta"), context)
    tracker, _ = api.create("tracker", meta.get("tracker", "mediapipe"), context)
    ckpt = field.load(avatar_path)
    template = ckpt.template
    out: dict[str, np.ndarray] = {}

    def keep(name: str, request) -> None:
        started = time.perf_counter()
        result = field.render(ckpt, request)
        out[f"{name}/rgb"] = result.rgb
        out[f"{name}/alpha"] = np.rint(result.alpha * 255).astype(np.uint8)
        out[f"{name}/seconds"] = np.float32(time.perf_counter() - started)

    yaw, pitch = view_grid()
    zeros = np.zeros_like(yaw)
    keep("views", animate.requests_from_motion(template, Motion(25.0, yaw, pitch, zeros, {})))
    for name, video in drivers.items():
        driven = tracker.track(video, reference=template, source=name)
        keep(name, animate.requests_from_driver(template, driven))
    script = load_motion_script(ROOT / "benchmarks" / "extreme_expressions.yaml")
    try:
        expressions = tracker.expressions_for(script, template) * EXTREME_SCALE
    except NotImplementedError:
        expressions = None
    keep("extreme", animate.requests_from_motion(template, script, expressions))
    return out


def cmd_render(args: argparse.Namespace) -> None:
    from ophav_core import api
    from ophav_core.media import read_video

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folders = [Path(f) for f in args.data] + [SHARED / "portraits", SHARED / "driving", ROOT / "examples"]
    size = None
    drivers, timings = {}, {}
    for portrait in args.portraits:
        path = _find(portrait, folders) if not Path(portrait).is_file() else Path(portrait)
        name = path.stem
        run_dir = Path(args.work) / f"{args.label}-{name}"
        started = time.perf_counter()
        api.run(path, run_dir, profile=args.profile, device=args.device, resume=run_dir.exists(), quiet=True,
                sets=args.set)
        timings[name] = {"run_seconds": round(time.perf_counter() - started, 1)}
        manifest = json.loads((run_dir / "manifest.json").read_text())
        timings[name]["steps"] = {k: v.get("seconds") for k, v in manifest.get("steps", {}).items()}
        for checks in sorted(run_dir.glob("round*/checks.json")):
            kept = json.loads(checks.read_text())["kept"]
            timings[name][f"{checks.parent.name}_renders_kept"] = f"{sum(kept)}/{len(kept)}"
        if size is None:  # the avatar's own resolution; the drivers are read at it once
            size = int(api.avatar_description(run_dir / "avatar" / "avatar.ckpt").get("info", {})
                       .get("image_size", [128])[0])
            for video in ("talk_78f.mp4", "nod_175f.mp4"):
                frames = read_video(_find(video, folders), size=size)
                keep = np.arange(0, len(frames), DRIVER_STRIDE)
                drivers[video.split("_")[0]] = type(frames)(frames.frames[keep], frames.fps / DRIVER_STRIDE)
            np.savez_compressed(out / "drivers.npz", **{k: v.frames for k, v in drivers.items()})
        arrays = {}
        for stage, rel in (("fit", "fit/avatar.ckpt"), ("final", "avatar/avatar.ckpt")):
            suite = render_suite(run_dir / rel, drivers, Path(args.work) / ".render", args.device)
            arrays.update({f"{stage}/{k}": v for k, v in suite.items()})
        arrays["yaw"], arrays["pitch"] = view_grid()
        np.savez_compressed(out / f"fid_{args.label}_{name}.npz", **arrays)
        print(f"{name}: run {timings[name]['run_seconds']} s, renders -> fid_{args.label}_{name}.npz", flush=True)
    (out / f"timings_{args.label}.json").write_text(json.dumps(timings, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="make avatars and render the suite")
    r.add_argument("--portraits", nargs="+", required=True, help="file names in ../shared/data or examples/, or paths")
    r.add_argument("--data", nargs="*", default=[], help="more folders to look for portraits and driving videos in")
    r.add_argument("--profile", default="preview")
    r.add_argument("--device", default="auto")
    r.add_argument("--work", default="runs/fidelity")
    r.add_argument("--out", required=True)
    r.add_argument("--label", required=True, help="before / after / ...: names the runs and output files")
    r.add_argument("--set", action="append", default=[], help="KEY=VALUE passed to ophav run")
    r.set_defaults(func=cmd_render)
    s = sub.add_parser("score", help="score rendered suites and write the table and sheets")
    s.add_argument("files", nargs="+")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_score)
    args = parser.parse_args(argv)
    args.func(args)


def cmd_score(args: argparse.Namespace) -> None:
    raise SystemExit("score: see below (needs the offline metrics)")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
