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

Each render keeps its alpha, and each view its tracked head region (the projected mesh's hull grown by the
hair/neck band, as ``ophav eval`` derives it), so ``score`` reports both floater figures: ``floaters max`` (the
share of the image with alpha above 0.05 outside that region, issue 15's criterion) and ``detached alpha max``
(alpha not connected to the head's opaque blob, which also counts soft hair edges). The driver frames are saved
once (``drivers.npz``) for the mouth-opening correlation. Each avatar's renders are ``fid_<label>_<portrait>.npz``
(the views) plus a ``fidpart_*`` file per other stage/suite beside it (a device call returns at most 8 files of 16
MiB; bring one portrait's standard-profile suite back per call), which ``score`` and ``sheet`` merge: pass them the
``fid_*`` files.
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


def head_regions(template, request) -> np.ndarray:
    """uint8 (N, H, W): 1 inside each render's tracked head region (the projected mesh's hull grown by the
    hair/neck band), where ``ophav eval``'s floaters metric allows alpha."""
    from ophav_core.pipeline import animate
    from ophav_core.study.evaluation import tracked_head_region

    return tracked_head_region(animate.tracking_for_request(template, request)).astype(np.uint8)


def render_suite(avatar_path: Path, drivers: dict[str, object], work: Path, device: str,
                 size: int | None = None) -> dict[str, np.ndarray]:
    """Every view of the suite for one avatar: {suite/rgb, suite/alpha} arrays (uint8)."""
    from ophav_core import api
    from ophav_core.pipeline import animate
    from ophav_core.stages.motion import Motion, load_motion_script

    # A round's or the fit's checkpoint has no avatar.json of its own: the run's final one names the components.
    meta = api.avatar_description(avatar_path) or api.avatar_description(avatar_path.parent.parent / "avatar" / "avatar.ckpt")
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
        if name == "views":  # the floaters figure is scored on the views only
            out[f"{name}/region"] = head_regions(template, request)

    resolution = (size, size) if size else None
    yaw, pitch = view_grid()
    zeros = np.zeros_like(yaw)
    keep("views", animate.requests_from_motion(template, Motion(25.0, yaw, pitch, zeros, {}), resolution=resolution))
    for name, video in drivers.items():
        driven = tracker.track(video, reference=template, source=name)
        keep(name, animate.requests_from_driver(template, driven, resolution=resolution))
    script = load_motion_script(ROOT / "benchmarks" / "extreme_expressions.yaml")
    try:
        expressions = tracker.expressions_for(script, template) * EXTREME_SCALE
    except NotImplementedError:
        expressions = None
    keep("extreme", animate.requests_from_motion(template, script, expressions, resolution=resolution))
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
        manifest_path = run_dir / "manifest.json"
        finished = manifest_path.is_file() and json.loads(manifest_path.read_text()).get("status") == "done"
        if not finished:  # a finished run is rendered as it is, whatever the options given now
            api.run(path, run_dir, profile=args.profile, device=args.device, resume=run_dir.exists(), quiet=True,
                    sets=args.set, field=args.field)
        timings[name] = {"run_seconds": round(time.perf_counter() - started, 1)}
        manifest = json.loads(manifest_path.read_text())
        timings[name]["steps"] = {k: v.get("seconds") for k, v in manifest.get("steps", {}).items()}
        for checks in sorted(run_dir.glob("round*/checks.json")):
            kept = json.loads(checks.read_text())["kept"]
            timings[name][f"{checks.parent.name}_renders_kept"] = f"{sum(kept)}/{len(kept)}"
        if size is None:  # --size, else the avatar's own resolution; the drivers are read at it once
            size = args.size or int(api.avatar_description(run_dir / "avatar" / "avatar.ckpt").get("info", {})
                                    .get("image_size", [128])[0])
            for video in ("talk_78f.mp4", "nod_175f.mp4"):
                frames = read_video(_find(video, folders), size=size)
                keep = np.arange(0, len(frames), args.driver_stride)
                drivers[video.split("_")[0]] = type(frames)(frames.frames[keep], frames.fps / args.driver_stride)
            np.savez_compressed(out / "drivers.npz", **{k: v.frames for k, v in drivers.items()})
        arrays = {}
        for stage, rel in (("fit", "fit/avatar.ckpt"), ("final", "avatar/avatar.ckpt")):
            suite = render_suite(run_dir / rel, drivers, Path(args.work) / ".render", args.device, size)
            arrays.update({f"{stage}/{k}": v for k, v in suite.items()})
        arrays["yaw"], arrays["pitch"] = view_grid()
        save_suite(out / f"fid_{args.label}_{name}.npz", arrays)
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
    r.add_argument("--field", default=None, help="AvatarField component (ophav run --field); default the config's")
    r.add_argument("--size", type=int, default=None, help="render resolution (default: the avatar's)")
    r.add_argument("--driver-stride", type=int, default=DRIVER_STRIDE,
                   help="render every Nth driver frame (9 keeps a 256x256 suite under the device's 16 MiB a file)")
    r.set_defaults(func=cmd_render)
    s = sub.add_parser("score", help="score rendered suites and write the table and sheets")
    s.add_argument("files", nargs="+")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_score)
    t = sub.add_parser("sheet", help="before/after sheets (yaw -60..60, then talk and extreme frames)")
    t.add_argument("files", nargs="+")
    t.add_argument("--out", required=True)
    t.add_argument("--stage", default="final", choices=("fit", "final"))
    t.add_argument("--alpha", action="store_true", help="under each run's row, its views' alpha times 4")
    t.set_defaults(func=cmd_sheet)
    args = parser.parse_args(argv)
    args.func(args)


MOUTH_TOP, MOUTH_BOTTOM, JAW_LEFT, JAW_RIGHT = 62, 66, 0, 16  # dlib 68-point indices (inner lips, jaw ends)


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """Inner-lip gap over face width per image (NaN where no face), from dlib's 68 landmarks."""
    gap = np.linalg.norm(landmarks[:, MOUTH_TOP] - landmarks[:, MOUTH_BOTTOM], axis=-1)
    width = np.linalg.norm(landmarks[:, JAW_LEFT] - landmarks[:, JAW_RIGHT], axis=-1)
    return gap / width


def detached_alpha(alpha: np.ndarray, level: float = 0.05) -> np.ndarray:
    """Per image: share of the image with alpha > ``level`` that is not connected to the largest opaque blob
    (the head), grown by 3 pixels. A stand-in for the floaters metric where the tracked mesh is not at hand."""
    import cv2

    out = []
    for a in np.asarray(alpha, np.float32) / 255.0:
        count, labels, stats, _ = cv2.connectedComponentsWithStats((a > 0.5).astype(np.uint8), connectivity=8)
        if count <= 1:
            out.append(float((a > level).mean()))
            continue
        head = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
        head = cv2.dilate(head, np.ones((7, 7), np.uint8)).astype(bool)
        out.append(float(((a > level) & ~head).mean()))
    return np.array(out)


def save_suite(path: Path, arrays: dict[str, np.ndarray]) -> list[Path]:
    """The suite as ``path`` (the views, yaw and pitch) plus one ``fidpart_<stage>-<suite>_...npz`` beside it per
    other stage/suite: a device call returns files of at most 16 MiB, and one standard-profile suite at 256 came
    to 38 MB. :func:`load_suite` reads them back as one."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        parts = key.split("/")
        group = "" if len(parts) < 3 or parts[1] == "views" else f"{parts[0]}-{parts[1]}"
        groups.setdefault(group, {})[key] = value
    written = []
    for group, items in groups.items():
        target = path if not group else path.with_name(f"fidpart_{group}_{path.name[len('fid_'):]}")
        np.savez_compressed(target, **items)
        written.append(target)
    return written


def load_suite(path: Path) -> dict[str, np.ndarray]:
    """A suite written by :func:`save_suite` (or as one file, as before), merged."""
    path = Path(path)
    data = dict(np.load(path))
    for part in sorted(path.parent.glob(f"fidpart_*_{path.name[len('fid_'):]}")):
        data.update(np.load(part))
    return data


def _portrait_image(name: str) -> np.ndarray:
    from ophav_core.media import read_image

    for folder in (SHARED / "portraits", ROOT / "examples"):
        for path in sorted(folder.glob(f"{name}.*")):
            return read_image(path).image
    raise SystemExit(f"portrait {name} not found")


def _nanmean(x) -> float:
    x = np.asarray(x, np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def score_suite(data, stage: str, portrait: np.ndarray, drivers: dict[str, np.ndarray]) -> dict[str, float]:
    """The fidelity figures of one avatar's suite (see the module docstring)."""
    from ophav_metrics import faces

    yaw, pitch = data["yaw"], data["pitch"]
    views = data[f"{stage}/views/rgb"]
    neutral = views[int(np.flatnonzero((yaw == 0) & (pitch == 0))[0])]
    scored = faces.score(views, portrait, neutral=neutral)
    row: dict[str, float] = {}
    flat = pitch == 0
    for band in (30, 45, 60):
        inside = flat & (np.abs(yaw) <= band)
        row[f"detect_{band}"] = float(scored["detected_once"][inside].mean())
    for band in (30, 45):  # issue 15: the standard profile within ±45°, the preview within ±30°
        ident = scored["identity"][flat & (np.abs(yaw) <= band)]
        row[f"identity_{band}_mean"] = _nanmean(ident)
        row[f"identity_{band}_max"] = float(np.nanmax(ident)) if np.isfinite(ident).any() else float("nan")
    row["detect_pitch25"] = float(scored["detected_once"][~flat].mean())
    # Per view, in the order of ``yaw`` / ``pitch``, for finding the view behind a figure (JSON only).
    row["views_detected"] = scored["detected_once"].astype(int).tolist()
    row["views_identity"] = [None if not np.isfinite(v) else round(float(v), 4) for v in scored["identity"]]
    row["sharpness_frontal"] = _nanmean(scored["sharpness"][flat & (np.abs(yaw) <= 15)])
    row["detached_alpha_max"] = float(detached_alpha(data[f"{stage}/views/alpha"]).max())
    if f"{stage}/views/region" in data:  # suites rendered before the regions were saved have none
        from ophav_metrics.faces import floater_share

        share = floater_share(data[f"{stage}/views/alpha"] / 255.0, data[f"{stage}/views/region"].astype(bool))
        row["floaters_max"] = float(share.max())
        row["views_floaters"] = [round(float(v), 5) for v in share]
    drift = [np.full(0, np.nan)]
    for name in ("talk", "nod", "extreme"):
        if f"{stage}/{name}/rgb" in data:  # a suite may have been left out to keep a transfer small
            drift.append(faces.colour_drift(data[f"{stage}/{name}/rgb"], neutral))
    drift = np.concatenate(drift)
    found = drift[np.isfinite(drift)]
    row["colour_drift_p90"] = float(np.percentile(found, 90)) if len(found) else float("nan")
    row["colour_drift_max"] = float(found.max()) if len(found) else float("nan")
    row["colour_drift_unmeasured"] = float(np.mean(~np.isfinite(drift)))
    for name, frames in drivers.items():
        if f"{stage}/{name}/rgb" not in data:
            row[f"mouth_corr_{name}"] = row[f"identity_{name}"] = float("nan")
            continue
        rendered = data[f"{stage}/{name}/rgb"]
        if len(rendered) != len(frames):  # renders of every k-th driver frame
            frames = frames[::int(np.ceil(len(frames) / len(rendered)))][: len(rendered)]
        ours = mouth_opening(faces.landmarks68(rendered))
        theirs = mouth_opening(faces.landmarks68(frames))
        both = np.isfinite(ours) & np.isfinite(theirs)
        row[f"mouth_corr_{name}"] = float(np.corrcoef(ours[both], theirs[both])[0, 1]) if both.sum() > 3 else float("nan")
        row[f"identity_{name}"] = _nanmean(faces.identity_distance(data[f"{stage}/{name}/rgb"], portrait))
    return row


COLUMNS = [("detect_30", "detect ±30°"), ("detect_45", "±45°"), ("detect_60", "±60°"),
           ("detect_pitch25", "pitch ±25°"), ("identity_45_mean", "identity ±45° mean"),
           ("identity_45_max", "max"), ("identity_30_max", "identity ±30° max"), ("identity_talk", "identity talk"),
           ("colour_drift_p90", "ΔE p90"), ("colour_drift_max", "ΔE max"), ("mouth_corr_talk", "mouth r talk"),
           ("mouth_corr_nod", "mouth r nod"), ("sharpness_frontal", "sharpness vs portrait"),
           ("detached_alpha_max", "detached alpha max"), ("floaters_max", "floaters max")]


def cmd_score(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for file in args.files:
        path = Path(file)
        label, name = path.stem.split("_", 2)[1:]
        drivers_file = path.parent / "drivers.npz"
        drivers = dict(np.load(drivers_file)) if drivers_file.is_file() else {}
        data = load_suite(path)
        portrait = _portrait_image(name)
        for stage in ("fit", "final"):
            if f"{stage}/views/rgb" not in data:  # a file of one stage's suite (renders made on the CPU)
                continue
            row = {"portrait": name, "label": label, "stage": stage, **score_suite(data, stage, portrait, drivers)}
            rows.append(row)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                           if not k.startswith("views_")), flush=True)
    (out / "fidelity_scores.json").write_text(json.dumps(rows, indent=1))
    header = "| portrait | run | avatar | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|" + "---|" * 3 + "---:|" * len(COLUMNS)]
    for row in rows:
        cells = [f"{row[k]:.3f}" if k in ("detached_alpha_max", "floaters_max") and np.isfinite(row.get(k, np.nan))
                 else f"{row[k]:.2f}" if np.isfinite(row.get(k, np.nan)) else "n/a" for k, _ in COLUMNS]
        lines.append(f"| {row['portrait']} | {row['label']} | {row['stage']} | " + " | ".join(cells) + " |")
    (out / "fidelity_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def cmd_sheet(args: argparse.Namespace) -> None:
    """Before/after sheets at the same views: per portrait, the yaw sweep of each labelled run's final avatar,
    then a few frames of each driven suite."""
    import cv2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [Path(f) for f in args.files]
    names = sorted({f.stem.split("_", 2)[2] for f in files})
    for name in names:
        rows = []
        for f in files:
            if f.stem.split("_", 2)[2] != name:
                continue
            data = load_suite(f)
            label = f.stem.split("_", 2)[1]
            views = data[f"{args.stage}/views/rgb"][: len(YAWS)]
            driven = [data[f"{args.stage}/{suite}/rgb"][np.linspace(0, len(data[f"{args.stage}/{suite}/rgb"]) - 1,
                                                                      3).astype(int)] for suite in ("talk", "extreme")]
            row = np.concatenate(list(views) + [im for group in driven for im in group], axis=1).copy()
            cv2.putText(row, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 0, 0), 1, cv2.LINE_AA)
            rows.append(row)
            if args.alpha:  # the views' alpha times 4 (alpha 0.25 and up is white): faint haze and floaters show
                alpha = data[f"{args.stage}/views/alpha"][: len(YAWS)].astype(np.float32) * 4
                strip = np.concatenate(list(np.clip(alpha, 0, 255).astype(np.uint8)), axis=1)
                pad = ((0, 0), (0, row.shape[1] - strip.shape[1]), (0, 0))
                rows.append(np.pad(np.repeat(strip[..., None], 3, axis=2), pad))
        sheet = np.concatenate(rows, axis=0)
        target = out / f"fidelity_{name}_{args.stage}{'_alpha' if args.alpha else ''}.jpg"
        cv2.imwrite(str(target), sheet[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 88])
        print(f"wrote {target}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
