"""ophav as a library: every command of ``ophav`` is a function here, and the command line is a thin layer over them.

    from ophav_core import run, render, evaluate
    from ophav_core.media import write_video

    result = run("portrait.jpg", out="runs/me", profile="preview")          # the whole method, resumable
    turn = render(result.avatar, views="turntable", size=256)               # novel views
    write_video("turn.mp4", turn.rgb, turn.fps)
    evaluate([result.avatar], out="eval/me", dataset="runs/me")             # the paper's metrics

Component names and options are the CLI's (``image2video="meshwarp"``, ``sets=["restorer.w=0.7"]``); progress and
messages go to ``log`` (a callable taking one line; stderr by default; ``quiet=True`` silences it).
"""
from __future__ import annotations

import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ophav_core.errors import UsageError
from ophav_core.plugins import get_host

DATASET_VERSION = 1
Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _logger(log: Log | None, quiet: bool) -> Log:
    return (lambda m: None) if quiet else (log or _stderr)


# ---------------------------------------------------------------------------------------------- components


def context(work_dir: Path, profile: str = "standard", device: str | None = None, quiet: bool = False):
    """A RunContext for components used outside a run (scratch space in ``work_dir``)."""
    from ophav_core.components import registry_components
    from ophav_core.pipeline.scheduler import resolve_device
    from ophav_core.profiles import get_profile
    from ophav_core.stages import RunContext

    work_dir.mkdir(parents=True, exist_ok=True)
    return RunContext(device=resolve_device(device or "auto"), profile=get_profile(profile), seed=0,
                      work_dir=work_dir, quiet=quiet, components=registry_components())


def create(stage: str, name: str, context, sets: Sequence[str] = ()):
    """Build the registered component ``name`` of ``stage``; ``sets`` holds ``STAGE.OPTION=VALUE`` items (others
    are ignored). Returns the component and its ComponentSpec."""
    from ophav_core.config import StageChoice, parse_value, resolve_stage

    options = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        head, _, rest = key.partition(".")
        if sep and head == stage and rest:
            options[rest] = parse_value(raw)
    resolved = resolve_stage(get_host().registry, stage, StageChoice(name=name, options=options))
    return resolved.spec.create(resolved.options, context), resolved.spec


def avatar_description(avatar: Path) -> dict:
    """The ``avatar.json`` beside a checkpoint (components, portrait, profile), or {}."""
    for candidate in (avatar.with_suffix(".json"), avatar.parent / "avatar.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return {}


def resolve_avatar(path: str | Path) -> Path:
    """An avatar checkpoint from what a user names: the file itself, or a run directory (its avatar/avatar.ckpt)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / "avatar" / "avatar.ckpt").is_file():
            return path / "avatar" / "avatar.ckpt"
        if (path / "manifest.json").is_file():
            steps = sorted(path.glob("round*/avatar.ckpt")) + sorted(path.glob("fit/avatar.ckpt"))
            hint = f"; its latest step's avatar is {steps[0]}" if steps else ""
            raise UsageError(f"{path} is a run directory without a final avatar (no avatar/avatar.ckpt){hint}; "
                             f"finish it with `ophav run PORTRAIT --out {path} --resume`")
        raise UsageError(f"{path} is a folder, not an avatar checkpoint (give e.g. runs/NAME/avatar/avatar.ckpt)")
    raise UsageError(f"avatar {path} does not exist")


# ---------------------------------------------------------------------------------------------- run


def run(portrait: str | Path, out: str | Path | None = None, *, image2video: str | None = None,
        segmenter: str | None = None, tracker: str | None = None, field: str | None = None,
        restorer: str | None = None, rounds: int | None = None, config: str | Path | None = None,
        sets: Sequence[str] = (), profile: str | None = None, device: str | None = None,
        driver: str | None = None, resume: bool = False, reuse: Sequence[str | Path] = (),
        stop_after: str | None = None, quiet: bool = False, log: Log | None = None):
    """Make an avatar from one portrait: coarse video, tracking, segmentation, training, restore rounds.
    Returns the scheduler's RunResult (``.avatar``, ``.stopped_after``, ``.timings``)."""
    from ophav_core.config import build_config, resolve
    from ophav_core.media import read_image
    from ophav_core.pipeline.scheduler import Scheduler

    note = log or _stderr  # what the run took from others is said even when quiet
    portrait = Path(portrait)
    read_image(portrait)  # a missing or non-image portrait fails here, before anything is built
    flags = {"image2video": image2video, "segmenter": segmenter, "tracker": tracker, "field": field,
             "restorer": restorer, "rounds": rounds, "profile": profile, "device": device, "driver": driver}
    cfg = build_config(config, flags, list(sets))
    if cfg.driver is not None and not Path(cfg.driver).exists():
        raise UsageError(f"driver {cfg.driver} does not exist")
    resolved = resolve(cfg, get_host().registry)
    run_dir = Path(out) if out is not None else Path("runs") / portrait.stem
    reuse = [Path(other) for other in reuse]
    for other in reuse:
        if not (other / "manifest.json").is_file():
            raise UsageError(f"--reuse {other}: not a run directory (no manifest.json)")
    scheduler = Scheduler(run_dir, resolved, portrait, resume=resume, stop_after=stop_after, quiet=quiet,
                          log=_logger(log, quiet), reuse=reuse)
    result = scheduler.run()
    if scheduler.reused:
        saved = sum(info["seconds"] for info in scheduler.reused.values())
        note(f"took {', '.join(scheduler.reused)} from another run ({saved:.0f} s of work not repeated)")
    elif reuse:
        note(f"warning: --reuse: no step of {', '.join(map(str, reuse))} computes the same as this run (another "
            f"portrait, profile, seed, device or tracker changes every step)")
    return result


# ---------------------------------------------------------------------------------------------- datasets


def preprocess(source: str | Path, out: str | Path, *, segmenter: str | None = None, tracker: str | None = None,
               size: int = 512, max_frames: int | None = None, sets: Sequence[str] = (),
               device: str | None = None, quiet: bool = False, log: Log | None = None, format: str = "ophav",
               test_frames: int | None = None) -> Path:
    """Turn a video (or image folder) into a dataset: frames, head masks, tracking and contact sheets.
    ``format="insta"`` writes INSTA's format instead (:mod:`ophav_core.media.insta_format`), the last
    ``test_frames`` frames (default a tenth) in its test split."""
    from ophav_core.config import DEFAULT_COMPONENTS
    from ophav_core.media import mask_overlay, mesh_overlay, plot_pose, read_video, save_png
    from ophav_core.pipeline.scheduler import write_json

    say = _logger(log, quiet)
    if format not in ("ophav", "insta"):
        raise UsageError(f"--format {format!r}: choose ophav or insta")
    source, out = Path(source), Path(out)
    work = context(out / "work", "standard", device, quiet)
    tracker_c, tracker_spec = create("tracker", tracker or DEFAULT_COMPONENTS["tracker"], work, sets)
    segmenter_c, segmenter_spec = create("segmenter", segmenter or DEFAULT_COMPONENTS["segmenter"], work, sets)
    frames = read_video(source, max_frames=max_frames, size=size)
    say(f"{len(frames)} frames at {frames.fps:g} fps from {source}")
    components = {stage: {"name": spec.name, "package": spec.package, "version": spec.version}
                  for stage, spec in (("tracker", tracker_spec), ("segmenter", segmenter_spec))}
    # The files and contact sheets are written by one worker thread while tracking and segmentation go on:
    # encoding and writing release the GIL, and on a 2-core machine they took a quarter of the wall time.
    # The segmenter's tracking-free part (``Segmenter.prepare``) runs in a second one beside the tracker.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ophav-preprocess-writer") as writer, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="ophav-preprocess-segmenter") as helper:
        pending = []
        if format == "ophav":
            pending.append(writer.submit(frames.save, out / "frames.npz"))
        prepared = helper.submit(segmenter_c.prepare, frames)
        tracking = tracker_c.track(frames, source=str(source))
        prepared.result()
        pending += [writer.submit(plot_pose, tracking, out / "pose.png", fps=frames.fps,
                                  title=f"head pose of {source.name}"),
                    writer.submit(lambda: save_png(out / "mesh.png", mesh_overlay(frames, tracking)))]
        masks = segmenter_c.segment(frames, tracking)
        if format == "insta":
            from ophav_core.media.insta_format import write_insta

            write_insta(out, frames, masks, tracking, test_frames=test_frames,
                        meta={"source": str(source), **components})
        else:
            pending += [writer.submit(masks.save, out / "masks.npz"), writer.submit(tracking.save, out / "tracking.npz")]
        pending.append(writer.submit(lambda: save_png(out / "overlay.png", mask_overlay(frames, masks))))
        for job in pending:
            job.result()  # raises what the writer raised
    missing = [] if tracking.valid is None else np.flatnonzero(~tracking.valid).tolist()
    if format == "ophav":
        write_json(out / "dataset.json", {
            "ophav_dataset": DATASET_VERSION, "source": str(source), "frames": len(frames), "fps": frames.fps,
            "size": list(frames.size), "frames_without_face": missing, **components,
            "files": {"frames.npz": "FrameSet", "masks.npz": "MaskSet", "tracking.npz": "Tracking"},
        })
    if missing:
        say(f"no face in {len(missing)} frame(s) (interpolated): {missing[:20]}{'...' if len(missing) > 20 else ''}")
    return out


def load_dataset(folder: str | Path, split: str = "train"):
    """(frames, masks, tracking, description) of a dataset made by :func:`preprocess`, or of a folder in INSTA's
    format (``transforms_train.json``; see :mod:`ophav_core.media.insta_format`), whose ``split`` it gives
    (``train``, ``val``, ``test`` or ``held_out``: the val and test frames train lacks)."""
    from ophav_core.media import insta_format
    from ophav_core.stages import FrameSet, MaskSet, Tracking

    folder = Path(folder)
    if insta_format.is_insta_dataset(folder):
        dataset = insta_format.read_insta(folder, split=split)  # decodes that split's images only
        return dataset.frames, dataset.masks, dataset.tracking, dataset.meta
    description = folder / "dataset.json"
    if not description.is_file():
        raise UsageError(f"{folder} is not an ophav dataset (no dataset.json, no transforms_train.json); make one "
                         f"with `ophav preprocess`")
    meta = json.loads(description.read_text())
    if meta.get("ophav_dataset") != DATASET_VERSION:
        raise UsageError(f"{folder}: dataset version {meta.get('ophav_dataset')} is not {DATASET_VERSION}")
    frames, masks, tracking = (FrameSet.load(folder / "frames.npz"), MaskSet.load(folder / "masks.npz"),
                               Tracking.load(folder / "tracking.npz"))
    masks.check_matches(frames)
    tracking.check_matches(frames)
    return frames, masks, tracking, meta


def fit(dataset: str | Path, out: str | Path, *, field: str | None = None, profile: str = "standard",
        iterations: int | None = None, holdout: int = 0, sets: Sequence[str] = (), device: str | None = None,
        quiet: bool = False):
    """Train an avatar on a dataset; ``holdout=N`` leaves every Nth frame out. Returns the AvatarCheckpoint."""
    from ophav_core.config import DEFAULT_COMPONENTS
    from ophav_core.pipeline.scheduler import write_json

    dataset, out = Path(dataset), Path(out)
    frames, masks, tracking, meta = load_dataset(dataset)
    if holdout:
        keep = np.array([i for i in range(len(frames)) if i % holdout != 0])
        frames = type(frames)(frames.frames[keep], frames.fps)
        masks, tracking = type(masks)(masks.alpha[keep]), tracking.subset(keep)
    work = context(out.parent / f".{out.name}.work", profile, device, quiet)
    component, spec = create("field", field or DEFAULT_COMPONENTS["field"], work, sets)
    avatar = component.fit(frames, masks, tracking, out, iterations=iterations)
    tracker_name = (meta.get("tracker") or {}).get("name") or DEFAULT_COMPONENTS["tracker"]
    write_json(out.with_suffix(".json"), {
        "checkpoint": out.name, "field": spec.name, "tracker": tracker_name, "dataset": str(dataset),
        "profile": profile, "info": avatar.info, "render": f"ophav render {out} --views turntable --out turntable.mp4"})
    return avatar


# ---------------------------------------------------------------------------------------------- render


@dataclass
class Rendered:
    """What :func:`render` made: images (N, H, W, 3) uint8 and their alpha (N, H, W) at ``fps``, and the driver's
    frames when driven by a video (for a side-by-side)."""

    rgb: np.ndarray
    alpha: np.ndarray
    fps: float
    driver_frames: np.ndarray | None = None

    def side_by_side(self) -> np.ndarray:
        """The driver's frames beside the avatar's (the avatar alone without a driver)."""
        if self.driver_frames is None:
            return self.rgb
        from ophav_core.media import square_resize

        side = self.rgb.shape[1]
        return np.concatenate([np.stack([square_resize(f, side) for f in self.driver_frames]), self.rgb], axis=2)


def render(avatar: str | Path, *, driver: str | Path | None = None, script: str | Path | None = None,
           views: str | None = None, size: int | None = None, fps: float = 25.0, seconds: float = 4.0,
           field: str | None = None, tracker: str | None = None, device: str | None = None,
           quiet: bool = False) -> Rendered:
    """Render an avatar (a checkpoint or a run directory): driven by a video, by a motion script, or turning
    (``views="turntable"``) or going through expressions (``views="expressions"``)."""
    from ophav_core.media import read_video
    from ophav_core.pipeline import animate
    from ophav_core.pipeline.scheduler import preview_motion
    from ophav_core.stages import motion as motion_lib

    avatar = resolve_avatar(avatar)
    chosen = [x for x in (driver, script, views) if x is not None]
    if len(chosen) != 1:
        raise UsageError("give exactly one of --driver VIDEO, --script MOTION.yaml or --views turntable|expressions")
    if views is not None and views not in ("turntable", "expressions"):
        raise UsageError(f"--views {views!r}: choose turntable or expressions")
    meta = avatar_description(avatar)
    # Scratch space in a temporary folder, removed when this function returns: rendering writes only --out.
    scratch = tempfile.TemporaryDirectory(prefix="ophav-render-")
    work = context(Path(scratch.name), "standard", device, quiet)
    field_c, _ = create("field", field or meta.get("field", "insta"), work)
    tracker_c, _ = create("tracker", tracker or meta.get("tracker", "mediapipe"), work)
    ckpt = field_c.load(avatar)
    template = ckpt.template
    resolution = (size, size) if size else None
    driver_frames = None
    if driver is not None:
        video = read_video(driver)
        driver_tracking = tracker_c.track(video, reference=template, source=str(driver))
        request = animate.requests_from_driver(template, driver_tracking, resolution=resolution)
        fps, driver_frames = video.fps, video.frames
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
    return Rendered(result.rgb, result.alpha, fps, driver_frames)


# ---------------------------------------------------------------------------------------------- studies


def evaluate(avatars: Sequence[str | Path], out: str | Path, *, dataset: str | Path | None = None,
             driver: str | Path | None = None, views: str | None = None, portrait: str | Path | None = None,
             every: int = 10, metrics: str | Sequence[str] | None = None, labels: Sequence[str] = (),
             max_frames: int | None = None, size: int | None = None, field: str | None = None,
             tracker: str | None = None, segmenter: str | None = None, device: str | None = None,
             quiet: bool = False, log: Log | None = None) -> str:
    """Measure avatars: self-reenactment against ``dataset`` (a dataset or a run directory), cross-identity
    reenactment by ``driver``, or novel views (``views="turntable"``: yaw -60..60 in steps of 15; ``"grid"``: those
    yaws times pitch -25..25 in steps of 12.5). ``metrics``: names (None: every registered metric; for views the
    view metrics). Identity is measured against ``portrait``, by default the run's own. Writes metrics.json,
    table.md and compare.png (views also views.md and views.png) in ``out``; returns the table."""
    from ophav_core.config import DEFAULT_COMPONENTS
    from ophav_core.media import read_image, read_video
    from ophav_core.study import evaluation

    say = _logger(log, quiet)
    out = Path(out)
    if sum(x is not None for x in (dataset, driver, views)) != 1:
        raise UsageError("give --dataset DIR (self-reenactment), --driver VIDEO (cross-identity reenactment) or "
                         "--views turntable|grid (novel views)")
    if views is not None and views not in ("turntable", "grid"):
        raise UsageError(f"--views {views!r}: choose turntable or grid")
    if labels and len(labels) != len(avatars):
        raise UsageError(f"{len(labels)} --label for {len(avatars)} avatar(s)")
    if views is not None and metrics is None:
        metrics = evaluation.VIEW_METRICS
    wanted = evaluation.parse_metrics(metrics)
    avatars = [resolve_avatar(a) for a in avatars]
    reference = evaluation.load_reference(Path(dataset)) if dataset is not None else None
    video = read_video(driver, max_frames=max_frames) if driver is not None else None
    explicit_portrait = read_image(portrait) if portrait is not None else None
    work = context(out / ".work", "standard", device, quiet)  # components' scratch space
    results = []
    for i, avatar in enumerate(avatars):
        meta = avatar_description(avatar)
        components = meta.get("components", {})
        field_c, _ = create("field", field or meta.get("field") or DEFAULT_COMPONENTS["field"], work)
        tracker_c, _ = create("tracker", tracker or meta.get("tracker") or DEFAULT_COMPONENTS["tracker"], work)
        ckpt = field_c.load(avatar)
        name = labels[i] if labels else avatar_label(avatar)
        person = explicit_portrait
        if person is None and meta.get("portrait") and Path(meta["portrait"]).is_file():
            person = read_image(meta["portrait"])  # the run's own portrait: what identity is measured against
        if reference is not None:
            frames, masks, tracking, _ = reference
            result = evaluation.self_reenactment(field_c, tracker_c, ckpt, frames, masks, tracking, every=every,
                                                 portrait=person, metrics=wanted, device=work.device, label=name,
                                                 max_frames=max_frames)
        elif video is not None:
            segmenter_c, _ = create("segmenter", segmenter or components.get("segmenter")
                                    or DEFAULT_COMPONENTS["segmenter"], work)
            result = evaluation.cross_reenactment(field_c, tracker_c, ckpt, video, person, segmenter=segmenter_c,
                                                  metrics=wanted, device=work.device, label=name,
                                                  resolution=(size, size) if size else None)
        else:
            pitches = evaluation.GRID_PITCHES if views == "grid" else (0.0,)
            result = evaluation.novel_views(field_c, ckpt, person, yaws=evaluation.TURNTABLE_YAWS, pitches=pitches,
                                            size=size, metrics=wanted, tracker=tracker_c, device=work.device,
                                            label=name)
        result.settings["avatar"] = str(avatar)
        result.settings["source"] = str(dataset or driver or f"--views {views}")
        results.append(result)
        say(f"evaluated {name}")
    return evaluation.write_outputs(out, results)


def avatar_label(avatar: Path) -> str:
    """runs/NAME/avatar/avatar.ckpt -> NAME; a step's checkpoint inside a run (runs/NAME/round1/avatar.ckpt,
    runs/NAME/fit/avatar.ckpt) -> NAME/round1, NAME/fit; anything else -> the file's stem."""
    run_dir = avatar.parent.parent
    if avatar.parent.name == "avatar" and avatar.stem == "avatar":
        return run_dir.name or avatar.stem
    if avatar.stem == "avatar" and (run_dir / "manifest.json").is_file():
        return f"{run_dir.name}/{avatar.parent.name}"
    return avatar.stem


def ablate(grid: str | Path, out: str | Path | None = None, *, backend: str = "local", gpus: int = 0,
           address: str | None = None, retry_failed: bool = True, skip_invalid: bool = False, reuse: bool = True,
           device: str | None = None, quiet: bool = False, log: Log | None = None):
    """Run and evaluate a grid of runs (components x options x restore rounds x portraits); finished cells are
    kept, so calling it again resumes. Returns the Study (results in ``study.root``)."""
    from ophav_core.study import ablate as study_lib

    grid = Path(grid)
    out = Path(out) if out is not None else Path("studies") / grid.stem
    return study_lib.run_study(grid, out, backend=backend, gpus=gpus, address=address, retry_failed=retry_failed,
                               skip_invalid=skip_invalid, registry=get_host().registry, device=device,
                               log=_logger(log, quiet), reuse=reuse)
