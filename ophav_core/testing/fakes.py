"""Tiny fake components for testing the core (scheduler, CLI, config) in seconds, without models.

They register through the same hooks as real plugins: ``build_host(extra_plugins=[("fakes", FakePlugin())])``,
or set ``OPHAV_TEST_FAKES=1`` for the CLI. ``CALLS`` counts the work each fake did (resume tests check that
nothing finished is recomputed); ``OPHAV_FAKE_CRASH=<event>`` (e.g. ``restore1``, ``fit0``) makes the fake raise
at that event, to simulate a crash.
"""
from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ophav_core import hookimpl
from ophav_core.errors import NoFaceFound
from ophav_core.stages.motion import Motion
from ophav_core.registry import ComponentSpec
from ophav_core.stages import (AvatarCheckpoint, AvatarField, FrameSet, Image2Video, MaskSet, Portrait, RenderRequest,
                               RenderResult, RestoreInput, Restorer, Segmenter, Tracker, Tracking)
from ophav_core.stages.data import atomic_write_bytes
from ophav_core.testing.synthetic import ellipsoid_mesh, synthetic_tracking

CALLS: Counter = Counter()


class CrashForTest(RuntimeError):
    pass


class OutOfMemoryError(RuntimeError):
    """Stands in for ``torch.cuda.OutOfMemoryError`` (the scheduler recognises it by name, without torch)."""


def _maybe_crash(event: str) -> None:
    CALLS[event] += 1
    crash = os.environ.get("OPHAV_FAKE_CRASH")
    if crash == event:
        raise CrashForTest(f"simulated crash at {event}")
    if crash == f"{event}:out-of-memory":
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    if crash == f"{event}:disk-full":
        import errno

        raise OSError(errno.ENOSPC, "No space left on device", f"{event}.npz")


class FakeI2VOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shift: float = Field(0.3, description="pixels of horizontal shift per degree of yaw")


class FakeImage2Video(Image2Video):
    Options = FakeI2VOptions

    def generate(self, portrait: Portrait, motion: Motion) -> FrameSet:
        _maybe_crash("image2video")
        size = self.context.profile.resolution
        import cv2

        base = cv2.resize(portrait.image, (size, size), interpolation=cv2.INTER_AREA)
        frames = np.stack([np.roll(base, int(round(self.options.shift * y * size / 64)), axis=1) for y in motion.yaw])
        return FrameSet(frames, fps=motion.fps, driving=motion.driving_arrays())


class FakeTracker(Tracker):
    def track(self, frames: FrameSet, *, single_image: bool = False, reference: Tracking | None = None,
              source: str = "") -> Tracking:
        # Tracking into another tracking's basis (a driver, a round's renders checked) is counted apart from
        # tracking a run's own frames, so tests can tell whether the run's track step was computed.
        _maybe_crash("track" if reference is None else "track_with_reference")
        if single_image and frames.frames.std() < 1.0:
            raise NoFaceFound(f"no face found in {source or 'the image'}")
        n = len(frames)
        width, height = frames.size
        base = synthetic_tracking(max(n, 1), max(width, height), seed=0, max_yaw=0.0)
        yaw = frames.driving.get("yaw", np.zeros(n))
        from ophav_core.stages.motion import euler_to_matrix

        R = euler_to_matrix(yaw, np.zeros(n), np.zeros(n))
        expression = np.zeros((n, base.num_expressions), np.float32)
        vertices = np.einsum("nij,vj->nvi", R, base.canonical_vertices) + base.translation[:n, None]
        return Tracking(K=base.K, image_size=np.array([width, height]), rotation=R, translation=base.translation[:n],
                        expression=expression, vertices=vertices, canonical_vertices=base.canonical_vertices,
                        faces=base.faces, expression_basis=base.expression_basis, valid=np.ones(n, bool),
                        semantic=base.semantic, mesh_type="ellipsoid")

    def expressions_for(self, motion: Motion, tracking: Tracking) -> np.ndarray:
        smile = motion.expressions.get("smile", np.zeros(len(motion)))
        out = np.zeros((len(motion), tracking.num_expressions), np.float32)
        out[:, 0] = smile
        return out


class FakeSegmenter(Segmenter):
    def segment(self, frames: FrameSet, tracking: Tracking | None = None) -> MaskSet:
        _maybe_crash("segment")
        n, h, w = frames.frames.shape[:3]
        y, x = np.mgrid[:h, :w]
        ellipse = (((x - w / 2) / (0.35 * w)) ** 2 + ((y - h / 2) / (0.45 * h)) ** 2 <= 1).astype(np.float32)
        return MaskSet(np.repeat(ellipse[None], n, axis=0))


class FakeFieldOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    iterations: int | None = Field(None, ge=0, description="iterations (profile's if unset)")


class FakeField(AvatarField):
    """Learns the mean colour of the head; renders an ellipse of it around the projected mesh."""

    Options = FakeFieldOptions

    def fit(self, frames, masks, tracking, out, init=None, iterations=None):
        _maybe_crash("refit" if init is not None else "fit0")
        weights = masks.alpha[..., None]
        colour = (frames.frames * weights).sum(axis=(0, 1, 2)) / max(float(weights.sum()), 1.0)
        if init is not None:
            colour = 0.5 * colour + 0.5 * np.asarray(init.info["colour"])
        info = {"colour": [float(c) for c in colour], "frames": len(frames),
                "iterations": iterations or self.options.iterations or self.context.profile.fit_iterations}
        template = tracking.subset(np.arange(min(3, len(tracking))))
        buffer = io.BytesIO()
        np.savez(buffer, info=np.array(json.dumps(info)), **{f"t_{k}": v for k, v in template.to_arrays().items()})
        atomic_write_bytes(out, buffer.getvalue())
        return AvatarCheckpoint(Path(out), template, info)

    def load(self, path: Path) -> AvatarCheckpoint:
        with np.load(path, allow_pickle=False) as data:
            info = json.loads(str(data["info"]))
            template = Tracking.from_arrays({k[2:]: data[k] for k in data.files if k.startswith("t_")})
        return AvatarCheckpoint(Path(path), template, info)

    def render(self, avatar: AvatarCheckpoint, request: RenderRequest) -> RenderResult:
        w, h = (int(s) for s in request.resolution)
        n = len(request)
        t = avatar.template
        vertices = t.mesh_for(request.rotation, request.translation, request.expression)
        rgb = np.zeros((n, h, w, 3), np.uint8)
        alpha = np.zeros((n, h, w), np.float32)
        y, x = np.mgrid[:h, :w]
        for i in range(n):
            uv = t.project(vertices[i], request.K[i])
            centre, radius = uv.mean(axis=0), np.maximum(uv.std(axis=0) * 1.8, 1.0)
            inside = ((x - centre[0]) / radius[0]) ** 2 + ((y - centre[1]) / radius[1]) ** 2 <= 1
            rgb[i][inside] = np.asarray(avatar.info["colour"]).astype(np.uint8)
            alpha[i][inside] = 1.0
        depth = alpha * float(request.translation[:, 2].mean())
        return RenderResult(rgb, alpha, depth)


class FakeRestorerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gain: int = Field(1, ge=0, le=50, description="brightness added inside the head")


class FakeRestorer(Restorer):
    Options = FakeRestorerOptions

    def restore(self, batch: RestoreInput) -> np.ndarray:
        index = CALLS["restore"] + 1
        _maybe_crash(f"restore{index}")
        CALLS["restore"] = index
        out = batch.images.astype(np.int16) + (batch.alpha[..., None] > 0.5) * self.options.gain
        return np.clip(out, 0, 255).astype(np.uint8)


class FakePlugin:
    """The fakes as one plugin object (hook implementations as methods)."""

    __ophav_package__ = "ophav-test-fakes"
    __version__ = "0"

    @hookimpl
    def register_image2video(self, register):
        register(ComponentSpec("image2video", "fake", FakeImage2Video, FakeI2VOptions, "test fake"))

    @hookimpl
    def register_tracker(self, register):
        register(ComponentSpec("tracker", "fake", FakeTracker, None, "test fake"))

    @hookimpl
    def register_segmenter(self, register):
        register(ComponentSpec("segmenter", "fake", FakeSegmenter, None, "test fake"))

    @hookimpl
    def register_avatar_field(self, register):
        register(ComponentSpec("field", "fake", FakeField, FakeFieldOptions, "test fake"))

    @hookimpl
    def register_restorer(self, register):
        register(ComponentSpec("restorer", "fake", FakeRestorer, FakeRestorerOptions, "test fake"))


FAKE_CONFIG = {stage: {"name": "fake"} for stage in ("image2video", "segmenter", "tracker", "field", "restorer")}
__all__ = ["CALLS", "FAKE_CONFIG", "FakePlugin", "CrashForTest", "ellipsoid_mesh"]
