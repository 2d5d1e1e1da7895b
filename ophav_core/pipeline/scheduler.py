"""The method as a resumable sequence of steps, each leaving an artifact in the run directory.

    portrait -> image2video -> track -> segment -> fit -> R x (render -> restore -> refit) -> export

Tracking runs before segmentation so that a segmenter can use the face geometry (cutting below the jaw).
``manifest.json`` records the config, the components with their versions, and per step its status, timing and
the sha256 of every file it wrote. Every file is written atomically and a step is marked done only after all its
files are, so a run killed at any moment resumes (``--resume``) from the last finished step; a finished step whose
files are missing or altered is computed again. Each step draws its random numbers from the run's seed and the
step's name, so a resumed run gives the result it would have had.

Each step also records a key: a hash of everything it depends on (the portrait's bytes, the profile, seed and
device, the components and options of the stages it and the steps before it used, and its place in the chain).
Two steps with the same key compute the same thing, so a run given other run directories to ``reuse`` takes a
finished step with its key from them (hard links, intact files only) instead of computing it: another restorer
on top of an existing fit, or three rounds after a run of two, start where the shared work ends.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ophav_core import __version__
from ophav_core.config import ResolvedConfig
from ophav_core.errors import OphavError, UsageError
from ophav_core.stages import (AvatarCheckpoint, FrameSet, MaskSet, Portrait, RenderRequest, RenderResult,
                               RestoreInput, RunContext, Tracking)
from ophav_core.stages.data import atomic_write_bytes
from ophav_core.weights import sha256_of

STOP_POINTS = {"portrait": "portrait", "image2video": "image2video", "track": "track", "tracker": "track",
               "segment": "segment", "segmenter": "segment", "fit": "fit", "field": "fit"}


def _may_have_a_gpu() -> bool:
    """False only where a GPU certainly is absent: a Linux machine with no NVIDIA, AMD (ROCm) or WSL2 GPU
    device node. Asking torch costs seconds of import (4-5 s on a 2-core laptop), which a CPU-only preprocess
    would otherwise pay for nothing."""
    import sys

    if not sys.platform.startswith("linux"):
        return True
    return any(Path(p).exists() for p in (
        "/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg"))  # dxg: WSL2


def resolve_device(device: str) -> str:
    if device != "auto":
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UsageError("--device cuda was asked for but no CUDA device is available")
        return device
    import importlib.util

    if importlib.util.find_spec("torch") is None or not _may_have_a_gpu():
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False, default=str) + "\n").encode())


def step_names(rounds: int) -> list[str]:
    """The steps of a run with ``rounds`` restore rounds, in order."""
    names = ["portrait", "image2video", "track", "segment", "fit"]
    for r in range(1, rounds + 1):
        names += [f"render{r}", f"restore{r}", f"refit{r}"]
    return names + ["export"]


def _content_digest(path: str | Path | None) -> str:
    if path is None:  # the built-in script, by content: a run made with an older script is not this computation
        from ophav_core.stages.motion import default_script

        return "builtin:" + hashlib.sha256(json.dumps(default_script(), sort_keys=True).encode()).hexdigest()[:16]
    return sha256_of(Path(path)) if Path(path).is_file() else str(path)


# Bumped when what a round computes changes (2: widening views, renders checked by the tracker, refit on the coarse
# video plus the restored views; 3: rejected renders taken from their mirror views), so a run of an older method is
# not taken as the same computation.
ROUND_METHOD = 3


def step_keys(resolved: ResolvedConfig, portrait_path: Path, device: str) -> dict[str, str]:
    """Per step, a key that is equal for two steps exactly when they compute the same thing: the key of the step
    before it (so everything upstream), the step's name, and what the step itself adds. The export writes the
    whole config into the avatar's description, so its key holds the whole config."""
    def stage(name: str) -> dict[str, Any]:
        chosen = resolved.stages[name]
        return {"name": chosen.spec.name, "package": chosen.spec.package, "version": chosen.spec.version,
                "options": chosen.options.model_dump(mode="json", exclude=result_neutral_options(chosen.options))}

    adds: dict[str, Any] = {
        "portrait": {"portrait": sha256_of(portrait_path), "profile": resolved.profile.model_dump(mode="json"),
                     "seed": resolved.config.seed, "device": device, "ophav": __version__,
                     "tracker": stage("tracker")},
        "image2video": {"image2video": stage("image2video"), "driver": _content_digest(resolved.config.driver),
                        **_drawn_on(resolved, "image2video", stage)},
        "track": {"generated_pose": resolved.config.generated_pose}, "segment": {"segmenter": stage("segmenter")},
        "fit": {"field": stage("field"),  # mirror_frames named only when on: runs made without it keep their keys
                **({"mirror_frames": True} if resolved.config.mirror_frames else {})},
        "export": resolved.to_dict(),
    }
    for r in range(1, resolved.rounds + 1):
        adds[f"render{r}"] = {"method": ROUND_METHOD, "mirror_views": resolved.config.mirror_views}
        adds[f"restore{r}"] = {"restorer": stage("restorer")}
    keys, previous = {}, ""
    for name in step_names(resolved.rounds):
        text = json.dumps({"after": previous, "step": name, "adds": adds.get(name, {})}, sort_keys=True, default=str)
        previous = keys[name] = hashlib.sha256(text.encode()).hexdigest()[:24]
    return keys


def result_neutral_options(options) -> set[str]:
    """Options that change how a step runs but not what it computes (worker counts: a field declared with
    ``json_schema_extra={"affects_result": False}``): left out of the step keys, so changing them reuses a result."""
    fields = type(options).model_fields
    return {name for name, f in fields.items()
            if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("affects_result") is False}


def _drawn_on(resolved: ResolvedConfig, name: str, stage) -> dict[str, Any]:
    """The stages a step's component draws on (meshwarp: the tracker and segmenter) shape its result too."""
    drawn = resolved.stages[name].spec.component_class().draws_on
    return {"draws_on": {s: stage(s) for s in drawn}} if drawn else {}


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows (artifacts are only ever replaced, never changed in place, so a
    link stays correct), else a copy; atomic either way."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    tmp.replace(target)


class Manifest:
    def __init__(self, path: Path, data: dict[str, Any]):
        self.path, self.data = path, data

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        try:
            return cls(path, json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"cannot read {path}: {exc}; start a new run with another --out") from exc

    def save(self) -> None:
        write_json(self.path, self.data)

    def step(self, name: str) -> dict[str, Any]:
        return self.data.setdefault("steps", {}).setdefault(name, {"status": "pending"})

    def is_done(self, name: str, root: Path) -> bool:
        entry = self.data.get("steps", {}).get(name)
        if not entry or entry.get("status") != "done":
            return False
        for rel, digest in entry.get("outputs", {}).items():
            path = root / rel
            if not path.is_file() or sha256_of(path) != digest:
                return False
        return True


@dataclass
class RunResult:
    run_dir: Path
    avatar: Path | None
    timings: dict[str, float] = field(default_factory=dict)
    stopped_after: str | None = None


class Scheduler:
    """Runs (or resumes) the pipeline in ``run_dir``.

    components: optional pre-built stage components (tests inject them); otherwise each is created from the
    resolved config when first needed, so a resumed run never loads a model it no longer needs.
    reuse: other run directories whose finished steps this run takes where the step keys are equal.
    """

    def __init__(self, run_dir: Path, resolved: ResolvedConfig, portrait_path: Path, *, resume: bool = False,
                 stop_after: str | None = None, quiet: bool = False, device: str | None = None,
                 log: Callable[[str], None] | None = None, reuse: Sequence[Path] = ()):
        self.root = Path(run_dir)
        self.resolved = resolved
        self.portrait_path = Path(portrait_path)
        self.resume = resume
        if stop_after is not None and stop_after not in STOP_POINTS and not stop_after.startswith("round"):
            raise UsageError(f"--stop-after {stop_after!r}: choose one of {', '.join(sorted(STOP_POINTS))} or roundN")
        self.stop_after = STOP_POINTS.get(stop_after, stop_after) if stop_after else None
        self.quiet = quiet
        self.device = device or resolve_device(resolved.config.device)
        self.log = log or (lambda msg: None)
        self._components: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.reuse = [Path(p) for p in reuse if Path(p).resolve() != self.root.resolve()]
        self.reused: dict[str, dict[str, Any]] = {}  # step -> {"from": run dir, "seconds": its compute time}
        self._keys: dict[str, str] | None = None

    def keys(self) -> dict[str, str]:
        if self._keys is None:
            self._keys = step_keys(self.resolved, self.portrait_path, self.device)
        return self._keys

    def _take_from_other_run(self, manifest: Manifest, name: str, outputs: list[str], extras: list[str]) -> bool:
        """Take step ``name`` from a run in ``reuse`` that finished it with the same key and intact files."""
        key = self.keys().get(name)
        for other in self.reuse:
            try:
                entry = Manifest.load(other / "manifest.json").data.get("steps", {}).get(name)
            except UsageError:
                continue
            if not entry or entry.get("status") != "done" or entry.get("key") != key:
                continue
            recorded = entry.get("outputs", {})
            if set(recorded) != set(outputs) or not all((other / rel).is_file() for rel in recorded):
                continue
            for rel in outputs + [e for e in extras if (other / e).is_file()]:
                _link_or_copy(other / rel, self.root / rel)
            taken = {"from": entry.get("reused", {}).get("from", str(other.resolve())),
                     "seconds": entry.get("seconds", 0.0) + entry.get("reused", {}).get("seconds", 0.0)}
            mine = manifest.step(name)
            mine.clear()
            mine.update(status="done", key=key, seconds=0.0, finished=_now(), outputs=dict(recorded), reused=taken)
            # Checked after linking: what this run now holds is what the other run recorded, even if that run
            # replaced a file meanwhile.
            if not manifest.is_done(name, self.root):
                mine.clear()
                mine["status"] = "pending"
                for rel in outputs:
                    (self.root / rel).unlink(missing_ok=True)
                continue
            manifest.save()
            self.reused[name] = taken
            return True
        return False

    # ------------------------------------------------------------------------------------------ plumbing

    def component(self, stage: str):
        if stage not in self._components:
            resolved = self.resolved.stages[stage]
            work = self.root / "work" / stage
            work.mkdir(parents=True, exist_ok=True)
            context = RunContext(device=self.device, profile=self.resolved.profile, seed=self.resolved.config.seed,
                                 work_dir=work, quiet=self.quiet, components=lambda other, _: self.component(other))
            self._components[stage] = resolved.spec.create(resolved.options, context)
        return self._components[stage]

    def _prepare(self) -> Manifest:
        manifest_path = self.root / "manifest.json"
        fingerprint = self.resolved.fingerprint()
        if manifest_path.exists():
            if not self.resume:
                raise UsageError(f"{self.root} already holds a run; add --resume to continue it, or choose another --out")
            manifest = Manifest.load(manifest_path)
            if manifest.data.get("fingerprint") != fingerprint:
                raise UsageError(f"{self.root} was started with another configuration; --resume needs the same "
                                 f"options (see {self.root / 'config.json'}), or choose another --out")
            if manifest.data.get("portrait", {}).get("sha256") != sha256_of(self.portrait_path):
                raise UsageError(f"{self.root} was started from another portrait; choose another --out")
            for stale in self.root.rglob(".*.tmp"):  # half-written files of a killed process
                stale.unlink(missing_ok=True)
            manifest.data["status"] = "running"
            manifest.data.setdefault("resumed", []).append(_now())
            return manifest
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise UsageError(f"cannot write to {self.root}: {exc.strerror}; choose another --out") from exc
        config = self.resolved.to_dict()
        write_json(self.root / "config.json", config)
        manifest = Manifest(manifest_path, {
            "ophav": __version__, "created": _now(), "status": "running", "fingerprint": fingerprint,
            "device": self.device, "config": config,
            "components": {s: {"name": r.spec.name, "package": r.spec.package, "version": r.spec.version}
                           for s, r in self.resolved.stages.items()},
            "portrait": {"path": str(self.portrait_path.resolve()), "sha256": sha256_of(self.portrait_path)},
            "steps": {},
        })
        manifest.save()
        return manifest

    def _step(self, manifest: Manifest, name: str, outputs: list[str], compute: Callable[[], Any],
              load: Callable[[], Any], extras: Sequence[str] = ()) -> Any:
        """``outputs`` are hashed and define the step; ``extras`` are pictures for people, carried along on reuse."""
        if manifest.is_done(name, self.root):
            self.log(f"[skip] {name}: done earlier")
            self.timings[name] = manifest.step(name).get("seconds", 0.0)
            if "reused" in manifest.step(name):
                self.reused[name] = manifest.step(name)["reused"]
            return load()
        if self.reuse and self._take_from_other_run(manifest, name, outputs, list(extras)):
            self.log(f"[reuse] {name}: from {self.reused[name]['from']}")
            self.timings[name] = 0.0
            return load()
        self.log(f"[run ] {name}")
        entry = manifest.step(name)
        entry.update(status="running", started=_now(), key=self.keys()[name])
        entry.pop("outputs", None)
        entry.pop("reused", None)
        manifest.save()
        start = time.perf_counter()
        try:
            value = compute()
        except Exception as exc:
            entry.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            try:
                manifest.save()
            except OSError:
                pass  # the disk may be what failed; the manifest on disk still says "running", never "done"
            if isinstance(exc, OSError):
                raise _io_error(exc, name) from exc
            if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda's, recognised without importing torch
                raise OphavError(f"{name}: the GPU ran out of memory. Use a smaller profile (--profile preview), a "
                                 f"smaller batch (e.g. --set field.batch_rays=2048) or --device cpu") from exc
            raise
        seconds = time.perf_counter() - start
        entry.update(status="done", seconds=round(seconds, 3), finished=_now(),
                     outputs={rel: sha256_of(self.root / rel) for rel in outputs})
        entry.pop("error", None)
        manifest.save()
        self.timings[name] = seconds
        return value

    # ------------------------------------------------------------------------------------------ the run

    def run(self) -> RunResult:
        manifest = self._prepare()
        try:
            result = self._run(manifest)
        except BaseException as exc:
            manifest.data["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            try:
                manifest.save()
            except OSError:
                pass
            raise
        manifest.data["status"] = "stopped" if result.stopped_after else "done"
        manifest.data["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        manifest.save()
        return result

    def _stop(self, step: str) -> bool:
        return self.stop_after == step

    def _run(self, manifest: Manifest) -> RunResult:
        from ophav_core.media import read_image

        # The portrait as the run uses it (turned upright if it was stored sideways) is the step's output.
        portrait, portrait_tracking = self._step(
            manifest, "portrait", ["input/portrait.npz", "input/portrait_tracking.npz"],
            lambda: self._track_portrait(read_image(self.portrait_path)),
            lambda: (Portrait.load(self.root / "input/portrait.npz"),
                     Tracking.load(self.root / "input/portrait_tracking.npz")))
        if self._stop("portrait"):
            return RunResult(self.root, None, self.timings, "portrait")
        frames = self._step(manifest, "image2video", ["image2video/frames.npz"],
                            lambda: self._image2video(portrait),
                            lambda: FrameSet.load(self.root / "image2video/frames.npz"),
                            extras=["image2video/video.mp4", "image2video/contact.png"])
        if self._stop("image2video"):
            return RunResult(self.root, None, self.timings, "image2video")
        tracking, portrait_tracking = self._step(
            manifest, "track", ["track/tracking.npz", "track/portrait_tracking.npz"],
            lambda: self._track(frames, portrait),
            lambda: (Tracking.load(self.root / "track/tracking.npz"),
                     Tracking.load(self.root / "track/portrait_tracking.npz")),
            extras=["track/pose.png", "track/mesh.png"])
        if self._stop("track"):
            return RunResult(self.root, None, self.timings, "track")
        masks = self._step(manifest, "segment", ["segment/masks.npz"], lambda: self._segment(frames, tracking),
                           lambda: MaskSet.load(self.root / "segment/masks.npz"), extras=["segment/overlay.png"])
        if self._stop("segment"):
            return RunResult(self.root, None, self.timings, "segment")
        avatar_rel = "fit/avatar.ckpt"
        train_frames, train_masks, train_tracking = self._training_set(frames, masks, tracking)
        avatar = self._step(manifest, "fit", [avatar_rel],
                            lambda: self._fit(train_frames, train_masks, train_tracking, avatar_rel, None),
                            lambda: self.component("field").load(self.root / avatar_rel))
        if self._stop("fit"):
            return RunResult(self.root, avatar.path, self.timings, "fit")
        for r in range(1, self.resolved.rounds + 1):
            avatar = self._round(manifest, r, avatar, train_frames, train_masks, train_tracking, portrait,
                                 portrait_tracking)
            if self._stop(f"round{r}"):
                return RunResult(self.root, avatar.path, self.timings, f"round{r}")
        final = self._step(manifest, "export", ["avatar/avatar.ckpt", "avatar/avatar.json", "preview.mp4"],
                           lambda: self._export(avatar, frames.frames[0]), lambda: self.root / "avatar/avatar.ckpt")
        from ophav_core.pipeline.report import write_report

        write_report(self.root, manifest.data, self.timings)
        return RunResult(self.root, final, self.timings)

    # ------------------------------------------------------------------------------------------ steps

    def _track_portrait(self, portrait: Portrait) -> tuple[Portrait, Tracking]:
        from ophav_core.media import track_upright

        tracker, source = self.component("tracker"), str(self.portrait_path)
        portrait, tracking, _ = track_upright(
            portrait, lambda p: tracker.track(FrameSet(p.image[None], fps=1.0), single_image=True, source=source),
            source)
        portrait.save(self.root / "input/portrait.npz")
        tracking.save(self.root / "input/portrait_tracking.npz")
        return portrait, tracking

    def _driving_motion(self):
        from ophav_core.stages import motion as motion_lib

        profile, driver = self.resolved.profile, self.resolved.config.driver
        if driver is None:
            return motion_lib.motion_from_script(motion_lib.default_script(), fps=profile.fps,
                                                 duration=profile.video_seconds)
        path = Path(driver)
        if path.suffix.lower() in {".yaml", ".yml", ".json"}:
            return motion_lib.load_motion_script(path, fps=profile.fps, duration=profile.video_seconds)
        from ophav_core.media import read_video

        video = read_video(path, max_frames=int(profile.fps * profile.video_seconds) or None)
        driver_tracking = self.component("tracker").track(video, source=str(path))
        return motion_lib.relative_motion_from_tracking(driver_tracking, video.fps, video)

    def _image2video(self, portrait: Portrait) -> FrameSet:
        from ophav_core.media import contact_sheet, pick_evenly, save_png, write_video

        frames = self.component("image2video").generate(portrait, self._driving_motion())
        frames.save(self.root / "image2video/frames.npz")
        write_video(self.root / "image2video/video.mp4", frames.frames, frames.fps)
        index = pick_evenly(len(frames), 12)
        save_png(self.root / "image2video/contact.png", contact_sheet(frames.frames[index], labels=[f"#{i}" for i in index]))
        return frames

    def _track(self, frames: FrameSet, portrait: Portrait) -> tuple[Tracking, Tracking]:
        from ophav_core.media import mesh_overlay, plot_pose, save_png

        tracker = self.component("tracker")
        tracking = tracker.track(frames, source="the coarse video")
        tracking.check_matches(frames)
        tracking = self._generated_pose(frames, tracking)
        portrait_tracking = tracker.track(FrameSet(portrait.image[None], fps=1.0), single_image=True,
                                          reference=tracking, source=str(self.portrait_path))
        tracking.save(self.root / "track/tracking.npz")
        portrait_tracking.save(self.root / "track/portrait_tracking.npz")
        plot_pose(tracking, self.root / "track/pose.png", fps=frames.fps, title="head pose of the coarse video")
        save_png(self.root / "track/mesh.png", mesh_overlay(frames, tracking))
        return tracking, portrait_tracking

    def _generated_pose(self, frames: FrameSet, tracking: Tracking) -> Tracking:
        """The tracking posed onto the mesh the image2video drew each frame with, where it gave one of the
        tracker's topology (the tracker keeps shape and expression; MediaPipe reads a head turned past 30 degrees
        as 4-9 degrees less turned, and the field would learn those views under the wrong pose)."""
        from ophav_core.stages.image2video import GENERATED_CAMERA, GENERATED_VERTICES

        drawn = frames.driving.get(GENERATED_VERTICES)
        if not self.resolved.config.generated_pose or drawn is None:
            return tracking
        if drawn.shape != tracking.vertices.shape:
            self.log(f"track: the image2video's mesh {drawn.shape[1:]} is not the tracker's "
                     f"{tracking.vertices.shape[1:]}; keeping the tracked poses")
            return tracking
        posed = tracking.posed_onto(drawn, frames.driving.get(GENERATED_CAMERA))
        from ophav_core.stages.motion import rotation_angle

        moved = rotation_angle(np.swapaxes(tracking.rotation, 1, 2) @ posed.rotation)
        self.log(f"track: poses fitted onto the image2video's mesh (moved by {np.median(moved):.1f} deg median, "
                 f"{moved.max():.1f} max)")
        return posed

    def _segment(self, frames: FrameSet, tracking: Tracking) -> MaskSet:
        from ophav_core.media import mask_overlay, save_png

        masks = self.component("segmenter").segment(frames, tracking)
        masks.check_matches(frames)
        masks.save(self.root / "segment/masks.npz")
        save_png(self.root / "segment/overlay.png", mask_overlay(frames, masks))
        return masks

    def _training_set(self, frames: FrameSet, masks: MaskSet, tracking: Tracking
                      ) -> tuple[FrameSet, MaskSet, Tracking]:
        """What every training of the run learns from: the coarse video, plus (``mirror_frames``) its frames turned
        beyond what it reaches on the other side, mirrored (:func:`~ophav_core.pipeline.animate.mirrored_frames`).
        Cheap to recompute, so a resumed run rebuilds it rather than storing a second copy of the video."""
        if not self.resolved.config.mirror_frames:
            return frames, masks, tracking
        from ophav_core.pipeline.animate import mirrored_frames, pose_angles

        mirrored = mirrored_frames(frames, masks, tracking)
        if mirrored is None:
            return frames, masks, tracking
        more_frames, more_masks, views, index = mirrored
        yaw = pose_angles(views)[0]
        self.log(f"fit: {len(index)} coarse frames turned further than the video reaches on the other side are "
                 f"added mirrored (yaw {yaw.min():.0f} to {yaw.max():.0f} deg; fit/mirrored.png)")
        sheet = self.root / "fit/mirrored.png"
        if not sheet.exists():
            from ophav_core.media import contact_sheet, pick_evenly, save_png

            pick = pick_evenly(len(index), 4)
            tiles = [im for i in pick for im in (frames.frames[index[i]], more_frames.frames[i])]
            labels = [t for i in pick for t in (f"coarse #{index[i]}", f"mirrored, yaw {yaw[i]:.0f}")]
            save_png(sheet, contact_sheet(tiles, columns=4, labels=labels))
        return (FrameSet(np.concatenate([frames.frames, more_frames.frames]), fps=frames.fps),
                MaskSet(np.concatenate([masks.alpha, more_masks.alpha])), tracking.joined(views))

    def _fit(self, frames: FrameSet, masks: MaskSet, tracking: Tracking, rel: str,
             init: AvatarCheckpoint | None) -> AvatarCheckpoint:
        out = self.root / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        return self.component("field").fit(frames, masks, tracking, out, init=init)

    def _round(self, manifest: Manifest, r: int, avatar: AvatarCheckpoint, frames: FrameSet, masks: MaskSet,
               tracking: Tracking, portrait: Portrait, portrait_tracking: Tracking) -> AvatarCheckpoint:
        """Round ``r`` of the iterative dataset update: render views a little wider than the avatar has learned,
        keep the renders the run's own tracker still reads as the face they should show, restore them, and
        retrain on the coarse video plus the restored views (the coarse frames keep the avatar anchored to what
        the image2video stage saw; the restored views teach sharper detail and the wider angles)."""
        folder = f"round{r}"
        renders_rel, restored_rel, avatar_rel = f"{folder}/renders.npz", f"{folder}/restored.npz", f"{folder}/avatar.ckpt"
        request_rel, tracking_rel, checks_rel = f"{folder}/request.npz", f"{folder}/tracking.npz", f"{folder}/checks.json"
        profile = self.resolved.profile

        def render() -> tuple[RenderResult, Tracking, dict[str, Any]]:
            from ophav_core.pipeline.animate import tracking_for_request, widening_views
            from ophav_core.stages.base import hash_str

            rng = np.random.default_rng([self.resolved.config.seed, hash_str(f"round{r}")])
            mirror = self.resolved.config.mirror_views and avatar.template.symmetry is not None
            request = widening_views(tracking, profile.restore_views, rng, widen_yaw=r * profile.widen_yaw,
                                     widen_pitch=r * profile.widen_pitch, symmetric=mirror)
            field, tracker = self.component("field"), self.component("tracker")
            result = field.render(avatar, request)
            views = tracking_for_request(avatar.template, request)
            checks = check_renders(tracker, result, views)
            if mirror:
                result, checks = mirror_rejected(lambda req: field.render(avatar, req), tracker, avatar.template,
                                                 request, views, result, checks, observed=tracking.expression)
                self.log(f"round {r}: {sum(checks['mirrored'])} renders the avatar could not draw were taken "
                         f"from their mirror views")
            request.save(self.root / request_rel)
            views.save(self.root / tracking_rel)
            result.save(self.root / renders_rel)
            write_json(self.root / checks_rel, checks)
            return result, views, checks

        def load_render() -> tuple[RenderResult, Tracking, dict[str, Any]]:
            return (RenderResult.load(self.root / renders_rel), Tracking.load(self.root / tracking_rel),
                    json.loads((self.root / checks_rel).read_text()))

        renders, views, checks = self._step(manifest, f"render{r}",
                                            [renders_rel, request_rel, tracking_rel, checks_rel], render, load_render)
        kept = np.asarray(checks["kept"], bool)
        mirrored = checks.get("mirrored") or [False] * len(kept)  # absent in runs made without mirror views
        self.log(f"round {r}: {int(kept.sum())} of {len(kept)} renders still read as the face they show (the rest "
                 f"are left out of the refit; {checks_rel})")

        def restore() -> FrameSet:
            from ophav_core.media import contact_sheet, pick_evenly, save_png

            batch = restore_input(renders, views, portrait, portrait_tracking)
            images = self.component("restorer").restore(batch)
            if images.shape != renders.rgb.shape or images.dtype != np.uint8:
                raise OphavError(f"restorer {self.resolved.stages['restorer'].spec.name!r} returned {images.shape} "
                                 f"{images.dtype}, expected {renders.rgb.shape} uint8")
            restored = FrameSet(images, fps=profile.fps)
            restored.save(self.root / restored_rel)
            index = pick_evenly(len(images), 6)
            tiles = [im for i in index for im in (renders.rgb[i], images[i])]
            note = lambda i: " (mirrored)" if mirrored[i] else ("" if kept[i] else " (left out)")  # noqa: E731
            labels = [t for i in index for t in (f"render #{i}{note(i)}", f"restored #{i}")]
            save_png(self.root / f"{folder}/contact.png", contact_sheet(tiles, columns=4, labels=labels))
            return restored

        restored = self._step(manifest, f"restore{r}", [restored_rel], restore,
                              lambda: FrameSet.load(self.root / restored_rel), extras=[f"{folder}/contact.png"])

        def refit() -> AvatarCheckpoint:
            data = refit_dataset(frames, masks, tracking, restored, renders, views, kept,
                                 self.component("segmenter"))
            return self._fit(*data, avatar_rel, avatar)

        return self._step(manifest, f"refit{r}", [avatar_rel], refit,
                          lambda: self.component("field").load(self.root / avatar_rel))

    def _export(self, avatar: AvatarCheckpoint, reference_image: np.ndarray) -> Path:
        target = self.root / "avatar/avatar.ckpt"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(".avatar.ckpt.tmp")
        shutil.copyfile(avatar.path, tmp)
        tmp.replace(target)
        description = {
            "ophav": __version__, "created": _now(), "checkpoint": "avatar.ckpt",
            "field": self.resolved.stages["field"].spec.name,
            "tracker": self.resolved.stages["tracker"].spec.name,
            "components": {s: r.spec.name for s, r in self.resolved.stages.items()},
            "profile": self.resolved.profile.name, "rounds": self.resolved.rounds,
            "portrait": str(self.portrait_path), "info": avatar.info,
            "render": f"ophav render {target} --views turntable --out turntable.mp4",
        }
        write_json(self.root / "avatar/avatar.json", description)
        write_preview(self.root / "preview.mp4", self.component("field"), self.component("tracker"), avatar,
                      reference_image, self.resolved.profile.preview_frames, self.resolved.profile.fps)
        return target


def restore_input(renders: RenderResult, views: Tracking, portrait: Portrait, portrait_tracking: Tracking) -> RestoreInput:
    """Everything a restorer may use about the renders: exact landmarks and the dense mesh correspondence."""
    return RestoreInput(
        images=renders.rgb, alpha=renders.alpha, landmarks5=views.landmarks5(),
        vertices2d=views.project(views.vertices), vertex_depth=views.vertices[..., 2], portrait=portrait,
        portrait_vertices2d=portrait_tracking.project(portrait_tracking.vertices[0]),
        portrait_vertex_depth=portrait_tracking.vertices[0, :, 2], faces=views.faces)


RENDER_CHECK_TOLERANCE = 0.25  # landmark error, in inter-ocular distances, above which a render is left out


def check_renders(tracker, renders: RenderResult, views: Tracking) -> dict[str, Any]:
    """Which renders of a round still show the face they should: the run's tracker, run on the render, must find
    a face whose five landmarks lie within ``RENDER_CHECK_TOLERANCE`` inter-ocular distances of where the render
    parameters put them. A render that dissolved into noise (a view beyond what the avatar learned) fails, and
    training on it would teach the noise back."""
    import warnings

    expected = views.landmarks5()
    ocular = np.linalg.norm(expected[:, 0] - expected[:, 1], axis=-1).clip(1e-6, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frames without a face are the point here, not a warning
        try:
            seen = tracker.track(FrameSet(renders.rgb, fps=1.0), reference=views, source="the round's renders")
        except OphavError:  # no face in any render
            seen = None
    if seen is None:
        error = np.full(len(views), np.inf)
        found = np.zeros(len(views), bool)
    else:
        found = np.ones(len(views), bool) if seen.valid is None else seen.valid.copy()
        error = np.linalg.norm(seen.landmarks5() - expected, axis=-1).mean(axis=1) / ocular
        error[~found] = np.inf
    kept = found & (error <= RENDER_CHECK_TOLERANCE)
    return {"kept": kept.tolist(), "face_found": found.tolist(),
            "landmark_error": [round(float(e), 4) if np.isfinite(e) else None for e in error],
            "tolerance": RENDER_CHECK_TOLERANCE, "unit": "inter-ocular distance"}


def mirror_rejected(render: Callable[[RenderRequest], RenderResult], tracker, template: Tracking,
                    request: RenderRequest, views: Tracking, renders: RenderResult,
                    checks: dict[str, Any], observed: np.ndarray | None = None) -> tuple[RenderResult, dict[str, Any]]:
    """The symmetry prior of a round: each render :func:`check_renders` left out is drawn again from its mirror
    view (:func:`~ophav_core.pipeline.animate.mirrored_request`) and flipped; where the run's tracker reads that
    one as the face the view should show, it takes the render's place. A portrait turned to one side leaves the
    avatar's far side unlearned, and the near side it did learn is the far side's mirror image. The mirrored
    render keeps the other side's light: matching its mean colour to the failed render's made it grey and hazy
    and measured worse (benchmarks/RESULTS.md, fifth session, "drawn from its mirror view").

    ``checks`` gains ``mirrored`` (per render) and the replaced renders' landmark errors. ``observed``: the
    expressions the avatar was trained on, which the mirrored ones are kept near."""
    from ophav_core.pipeline.animate import flip_renders, mirrored_request

    checks = dict(checks)
    kept = np.asarray(checks["kept"], bool).copy()
    mirrored_flags = np.zeros(len(kept), bool)
    rejected = np.flatnonzero(~kept)
    mirrored = mirrored_request(template, request, observed) if len(rejected) else None
    if mirrored is not None:
        flipped = flip_renders(render(mirrored.subset(rejected)))
        again = check_renders(tracker, flipped, views.subset(rejected))
        take = np.asarray(again["kept"], bool)
        use = rejected[take]
        rgb, alpha, depth = renders.rgb.copy(), renders.alpha.copy(), renders.depth.copy()
        rgb[use], alpha[use], depth[use] = flipped.rgb[take], flipped.alpha[take], flipped.depth[take]
        renders = RenderResult(rgb=rgb, alpha=alpha, depth=depth)
        kept[use] = mirrored_flags[use] = True
        checks["face_found"] = list(checks["face_found"])
        checks["landmark_error"] = list(checks["landmark_error"])
        for i, j in zip(use, np.flatnonzero(take)):
            checks["face_found"][i], checks["landmark_error"][i] = True, again["landmark_error"][j]
    checks["kept"], checks["mirrored"] = kept.tolist(), mirrored_flags.tolist()
    return renders, checks


def refit_dataset(frames: FrameSet, masks: MaskSet, tracking: Tracking, restored: FrameSet, renders: RenderResult,
                  views: Tracking, kept: np.ndarray, segmenter) -> tuple[FrameSet, MaskSet, Tracking]:
    """The coarse video plus the kept restored renders, the renders repeated so they make up about a third of
    the frames (a round's 200 views beside 1500 coarse frames would otherwise barely count). A render's mask is
    its alpha cut by what the segmenter calls head in it, so a floater the avatar carries is not trained back."""
    index = np.flatnonzero(kept)
    if not len(index):
        return frames, masks, tracking
    # One render at a time: the renders are unrelated views, not a video a segmenter may smooth over time.
    head = np.concatenate([segmenter.segment(FrameSet(restored.frames[i:i + 1], fps=frames.fps),
                                             views.subset(np.array([i]))).alpha for i in index])
    alpha = np.minimum(renders.alpha[index], head)
    repeat = int(np.clip(np.ceil(0.5 * len(frames) / len(index)), 1, 4))
    return (FrameSet(np.concatenate([frames.frames, np.tile(restored.frames[index], (repeat, 1, 1, 1))]),
                     fps=frames.fps),
            MaskSet(np.concatenate([masks.alpha, np.tile(alpha, (repeat, 1, 1))]).astype(np.float32)),
            tracking.joined(views.subset(np.tile(index, repeat))))


def preview_motion(template: Tracking, tracker, frames: int, fps: float):
    """A turntable (-45 to +45 degrees) followed by an expression sweep, with the sweep's coefficients."""
    from ophav_core.stages.motion import Motion, expression_sweep, turntable

    half = max(2, frames // 2)
    turn, sweep = turntable(half, fps, 45.0), expression_sweep(frames - half if frames - half >= 2 else 2, fps)
    try:
        sweep_expr = tracker.expressions_for(sweep, template)
    except NotImplementedError:
        sweep_expr = np.zeros((len(sweep), template.num_expressions), np.float32)
    expressions = np.concatenate([np.zeros((len(turn), template.num_expressions), np.float32), sweep_expr])
    motion = Motion(fps, np.concatenate([turn.yaw, sweep.yaw]), np.concatenate([turn.pitch, sweep.pitch]),
                    np.concatenate([turn.roll, sweep.roll]))
    return motion, expressions


def write_preview(path: Path, field, tracker, avatar: AvatarCheckpoint, reference_image: np.ndarray, frames: int,
                  fps: float) -> None:
    """preview.mp4: the portrait (as the pipeline framed it: the coarse video's first frame) beside the avatar
    turning its head and going through expressions."""
    from ophav_core.pipeline.animate import requests_from_motion
    from ophav_core.media import square_resize, write_video

    import warnings

    motion, expressions = preview_motion(avatar.template, tracker, frames, fps)
    request = requests_from_motion(avatar.template, motion, expressions)
    with warnings.catch_warnings():
        # The sweep goes through every named expression at full strength, past what a coarse video may have
        # shown; a field that tells (insta clamps its colour there) would warn about the run's own preview, which
        # the person running it can do nothing about.
        warnings.simplefilter("ignore", UserWarning)
        result = field.render(avatar, request)
    side = result.rgb.shape[1]
    left = square_resize(reference_image, side)
    write_video(path, np.concatenate([np.repeat(left[None], len(result), 0), result.rgb], axis=2), fps)


def _io_error(exc: OSError, step: str) -> OphavError:
    if exc.errno == errno.ENOSPC:
        return OphavError(f"{step}: the disk is full ({exc.filename or ''}); free some space and rerun with --resume "
                          f"(finished steps are kept)")
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return OphavError(f"{step}: cannot write {exc.filename or ''}: {exc.strerror}; fix the permissions or "
                          f"choose another --out")
    return OphavError(f"{step}: {exc}")
