"""``ophav preprocess``, ``ophav fit`` and ``ophav render``: a user's own video to a dataset, a dataset to an
avatar, and an avatar to videos."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer

from ophav_core.cli import _component_option, _echo, app, get_host
from ophav_core.errors import UsageError

DATASET_VERSION = 1


def _context(stage_dir: Path, profile: str, device: str | None, quiet: bool):
    from ophav_core.profiles import get_profile
    from ophav_core.scheduler import resolve_device
    from ophav_core.stages import RunContext

    stage_dir.mkdir(parents=True, exist_ok=True)
    return RunContext(device=resolve_device(device or "auto"), profile=get_profile(profile), seed=0,
                      work_dir=stage_dir, quiet=quiet)


def _create(stage: str, name: str, sets: list[str], context):
    from ophav_core.config import StageChoice, resolve_stage
    from ophav_core.config import parse_value

    options = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        head, _, rest = key.partition(".")
        if sep and head == stage and rest:
            options[rest] = parse_value(raw)
    resolved = resolve_stage(get_host().registry, stage, StageChoice(name=name, options=options))
    return resolved.spec.create(resolved.options, context), resolved.spec


@app.command()
def preprocess(
    source: Path = typer.Argument(..., help="a video file or a folder of images"),
    out: Path = typer.Option(..., "--out", "-o", help="dataset folder to write"),
    segmenter: Optional[str] = _component_option("segmenter"),
    tracker: Optional[str] = _component_option("tracker"),
    size: int = typer.Option(512, "--size", min=16, help="square frame size (centre crop, then resize)"),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", min=1, help="read at most this many frames"),
    set_: List[str] = typer.Option([], "--set", help="STAGE.OPTION=VALUE for the tracker or segmenter"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Turn your own video (or image folder) into a dataset: frames, head masks, tracking, contact sheets."""
    from ophav_core.config import DEFAULT_COMPONENTS
    from ophav_core.media import mask_overlay, mesh_overlay, plot_pose, read_video, save_png
    from ophav_core.scheduler import write_json

    tracker_name = tracker or DEFAULT_COMPONENTS["tracker"]
    segmenter_name = segmenter or DEFAULT_COMPONENTS["segmenter"]
    context = _context(out / "work", "standard", device, quiet)
    tracker_c, tracker_spec = _create("tracker", tracker_name, set_, context)
    segmenter_c, segmenter_spec = _create("segmenter", segmenter_name, set_, context)
    frames = read_video(source, max_frames=max_frames, size=size)
    _echo(f"{len(frames)} frames at {frames.fps:g} fps from {source}")
    tracking = tracker_c.track(frames, source=str(source))
    masks = segmenter_c.segment(frames, tracking)
    frames.save(out / "frames.npz")
    masks.save(out / "masks.npz")
    tracking.save(out / "tracking.npz")
    plot_pose(tracking, out / "pose.png", fps=frames.fps, title=f"head pose of {source.name}")
    save_png(out / "mesh.png", mesh_overlay(frames, tracking))
    save_png(out / "overlay.png", mask_overlay(frames, masks))
    missing = [] if tracking.valid is None else np.flatnonzero(~tracking.valid).tolist()
    write_json(out / "dataset.json", {
        "ophav_dataset": DATASET_VERSION, "source": str(source), "frames": len(frames), "fps": frames.fps,
        "size": list(frames.size), "frames_without_face": missing,
        "tracker": {"name": tracker_spec.name, "package": tracker_spec.package, "version": tracker_spec.version},
        "segmenter": {"name": segmenter_spec.name, "package": segmenter_spec.package, "version": segmenter_spec.version},
        "files": {"frames.npz": "FrameSet", "masks.npz": "MaskSet", "tracking.npz": "Tracking"},
    })
    if missing:
        _echo(f"no face in {len(missing)} frame(s) (interpolated): {missing[:20]}{'...' if len(missing) > 20 else ''}")
    _echo(f"dataset written to {out} (see pose.png, mesh.png and overlay.png)")


def load_dataset(folder: Path):
    from ophav_core.stages import FrameSet, MaskSet, Tracking

    description = folder / "dataset.json"
    if not description.is_file():
        raise UsageError(f"{folder} is not an ophav dataset (no dataset.json); make one with `ophav preprocess`")
    meta = json.loads(description.read_text())
    if meta.get("ophav_dataset") != DATASET_VERSION:
        raise UsageError(f"{folder}: dataset version {meta.get('ophav_dataset')} is not {DATASET_VERSION}")
    frames, masks, tracking = (FrameSet.load(folder / "frames.npz"), MaskSet.load(folder / "masks.npz"),
                               Tracking.load(folder / "tracking.npz"))
    masks.check_matches(frames)
    tracking.check_matches(frames)
    return frames, masks, tracking, meta


@app.command()
def fit(
    dataset: Path = typer.Argument(..., help="a dataset folder made by `ophav preprocess`"),
    out: Path = typer.Option(..., "--out", "-o", help="the avatar checkpoint to write"),
    field: Optional[str] = _component_option("field"),
    profile: str = typer.Option("standard", "--profile", help="sizes the training (tiny, preview, standard, paper)"),
    iterations: Optional[int] = typer.Option(None, "--iterations", min=0, help="training iterations (the profile's if unset)"),
    holdout: int = typer.Option(0, "--holdout", min=0, help="hold out every Nth frame (0: none)"),
    set_: List[str] = typer.Option([], "--set", help="field.OPTION=VALUE"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Train an avatar directly on a dataset (your own video)."""
    from ophav_core.config import DEFAULT_COMPONENTS
    from ophav_core.scheduler import write_json

    frames, masks, tracking, meta = load_dataset(dataset)
    if holdout:
        keep = np.array([i for i in range(len(frames)) if i % holdout != 0])
        frames = type(frames)(frames.frames[keep], frames.fps)
        masks, tracking = type(masks)(masks.alpha[keep]), tracking.subset(keep)
    context = _context(out.parent / f".{out.name}.work", profile, device, quiet)
    name = field or DEFAULT_COMPONENTS["field"]
    component, spec = _create("field", name, set_, context)
    avatar = component.fit(frames, masks, tracking, out, iterations=iterations)
    write_json(out.with_suffix(".json"), {
        "checkpoint": out.name, "field": spec.name, "tracker": meta["tracker"]["name"], "dataset": str(dataset),
        "profile": profile, "info": avatar.info, "render": f"ophav render {out} --views turntable --out turntable.mp4"})
    _echo(f"avatar written to {out}")


def _avatar_description(avatar: Path) -> dict:
    for candidate in (avatar.with_suffix(".json"), avatar.parent / "avatar.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return {}


@app.command()
def render(
    avatar: Path = typer.Argument(..., help="an avatar checkpoint (e.g. runs/NAME/avatar/avatar.ckpt)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="mp4 to write"),
    driver: Optional[Path] = typer.Option(None, "--driver", help="a driving video (cross-identity reenactment)"),
    script: Optional[Path] = typer.Option(None, "--script", help="a motion script (YAML/JSON)"),
    views: Optional[str] = typer.Option(None, "--views", help="turntable or expressions"),
    frames_dir: Optional[Path] = typer.Option(None, "--frames", help="also write PNG frames to this folder"),
    size: Optional[int] = typer.Option(None, "--size", min=16, help="output resolution (square)"),
    side_by_side: bool = typer.Option(False, "--side-by-side", help="put the driver beside the avatar"),
    fps: float = typer.Option(25.0, "--fps", min=1.0),
    seconds: float = typer.Option(4.0, "--seconds", min=0.2, help="length of --views / --script output"),
    field: Optional[str] = _component_option("field"),
    tracker: Optional[str] = _component_option("tracker"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Render an avatar: driven by a video, by a motion script, or turning for novel views."""
    from ophav_core import animate, motion as motion_lib
    from ophav_core.media import read_video, save_png, write_video
    from ophav_core.scheduler import preview_motion

    if not avatar.is_file():
        raise UsageError(f"avatar {avatar} does not exist")
    chosen = [x for x in (driver, script, views) if x is not None]
    if len(chosen) != 1:
        raise UsageError("give exactly one of --driver VIDEO, --script MOTION.yaml or --views turntable|expressions")
    if views is not None and views not in ("turntable", "expressions"):
        raise UsageError(f"--views {views!r}: choose turntable or expressions")
    if out is None and frames_dir is None:
        raise UsageError("give --out OUT.mp4 and/or --frames DIR")
    meta = _avatar_description(avatar)
    context = _context(avatar.parent / ".render-work", "standard", device, quiet)
    field_c, _ = _create("field", field or meta.get("field", "insta"), [], context)
    tracker_c, _ = _create("tracker", tracker or meta.get("tracker", "mediapipe"), [], context)
    ckpt = field_c.load(avatar)
    template = ckpt.template
    resolution = (size, size) if size else None
    left = None
    if driver is not None:
        video = read_video(driver)
        driver_tracking = tracker_c.track(video, reference=template, source=str(driver))
        request = animate.requests_from_driver(template, driver_tracking, resolution=resolution)
        fps = video.fps
        left = video.frames if side_by_side else None
    elif script is not None:
        motion = motion_lib.load_motion_script(script, fps=fps)
        try:
            expressions = tracker_c.expressions_for(motion, template)
        except NotImplementedError:
            expressions = None
        request = animate.requests_from_motion(template, motion, expressions, resolution=resolution)
    elif views == "turntable":
        motion = motion_lib.turntable(int(seconds * fps), fps, 45.0)
        request = animate.requests_from_motion(template, motion, None, resolution=resolution)
    else:
        motion, expressions = preview_motion(template, tracker_c, int(seconds * fps), fps)
        request = animate.requests_from_motion(template, motion, expressions, resolution=resolution)
    result = field_c.render(ckpt, request)
    images = result.rgb
    if left is not None:
        from ophav_core.media import square_resize

        side = images.shape[1]
        images = np.concatenate([np.stack([square_resize(f, side) for f in left]), images], axis=2)
    if frames_dir is not None:
        for i, image in enumerate(images):
            save_png(frames_dir / f"{i:05d}.png", image)
    if out is not None:
        write_video(out, images, fps)
        _echo(f"wrote {out} ({len(images)} frames)")
