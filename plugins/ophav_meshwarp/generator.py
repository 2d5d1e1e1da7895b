"""Image2Video ``meshwarp``: the portrait's own pixels, moved by its tracked face mesh (no network, no weights).

1. The portrait is tracked with the run's tracker, cropped to a square around the face
   (:mod:`ophav_meshwarp.crop`) at the output resolution, and the crop is tracked again: its camera, head pose
   and face mesh, whose topology (groups, mirror map, template: :mod:`ophav_meshwarp.topology`) comes with the
   tracking. The run's segmenter gives the crop's head matte.
2. Each frame turns the mesh by the motion's relative rotation about the head centre and adds the motion's
   expression: the tracker's head-space offsets for the named expressions and/or a driving video's dense offsets
   (:meth:`~ophav_core.stages.Tracker.expression_offsets`).
3. :func:`ophav_meshwarp.warper.render_frame` warps the crop accordingly.
"""
from __future__ import annotations

import numpy as np

from ophav_core.errors import UsageError
from ophav_core.stages.motion import Motion
from ophav_core.stages import FrameSet, Image2Video, Portrait, Tracking
from ophav_core.stages.image2video import GENERATED_CAMERA, GENERATED_VERTICES
from ophav_meshwarp.options import MeshwarpOptions


class MeshWarp(Image2Video):
    """See the module docstring."""

    Options = MeshwarpOptions
    options: MeshwarpOptions
    draws_on = ("tracker", "segmenter")

    @property
    def resolution(self) -> int:
        return int(self.options.resolution or self.context.profile.resolution)

    # ------------------------------------------------------------------------------------------ public

    def generate(self, portrait: Portrait, motion: Motion) -> FrameSet:
        source, box, tracking = self.prepare_tracked(portrait)
        offsets = self.expression_offsets(motion, tracking)
        rotations = motion.rotations().astype(np.float64)
        n, size = len(motion), self.resolution
        frames = np.empty((n, size, size, 3), np.uint8)
        mouth, eyes, unseen = np.zeros(n, np.float32), np.zeros((n, 2), np.float32), np.zeros(n, np.float32)
        vertices = np.empty((n,) + tracking.canonical_vertices.shape, np.float32)
        from ophav_meshwarp.parallel import draw_frames, worker_count

        workers = worker_count(n, self.options.workers)
        frame_offsets = [offsets(i) for i in range(n)]
        with self.context.progress(n, "meshwarp") as bar:
            for i, (frame, info) in enumerate(draw_frames(source, rotations, frame_offsets, workers)):
                frames[i] = frame
                mouth[i], eyes[i], unseen[i] = info.mouth_fill, info.eye_fill, info.unseen_fraction
                vertices[i] = info.vertices
                bar.advance(1)
        driving = dict(motion.driving_arrays())
        driving.update({
            "crop_box": np.repeat(box[None], n, axis=0),
            "fill_mouth": mouth, "fill_eyes": eyes, "fill_unseen": unseen,
            # The mesh each frame was drawn with: the pipeline poses the coarse video's tracking onto it.
            GENERATED_VERTICES: vertices, GENERATED_CAMERA: np.repeat(tracking.K[None], n, axis=0),
        })
        return FrameSet(frames, fps=motion.fps, driving=driving)

    def prepare(self, portrait: Portrait):
        """Crop and track the portrait; returns the warper's :class:`~ophav_meshwarp.warper.SourceFace` and the
        crop box (x0, y0, x1, y1) in portrait pixels."""
        source, box, _ = self.prepare_tracked(portrait)
        return source, box

    def prepare_tracked(self, portrait: Portrait):
        """:meth:`prepare`, plus the crop's tracking (what :meth:`expression_offsets` needs)."""
        from ophav_meshwarp.crop import crop_box, crop_image, integer_box
        from ophav_meshwarp.topology import build_parts
        from ophav_meshwarp.warper import prepare_source

        size = self.resolution
        full = self._track_image(portrait.image, portrait.source)
        box = integer_box(crop_box(full.project(face_points(full)), portrait.size, self.options.crop_scale,
                                   self.options.crop_shift, self.options.min_crop_scale))
        crop = crop_image(portrait.image, box, size)
        tracking = self._track_image(crop, f"{portrait.source or 'the portrait'} (cropped)")
        head_alpha = self._head_matte(crop, tracking) if self.options.head_matte else None
        parts = build_parts(tracking.topology, tracking.canonical_vertices)
        source = prepare_source(crop, tracking.K, tracking.rotation[0], tracking.translation[0],
                                tracking.vertices[0], parts, self._settings(), head_alpha)
        return source, box, tracking

    def expression_offsets(self, motion: Motion, tracking: Tracking):
        """A function frame -> head-space vertex offsets (V, 3) of ``tracking``'s mesh (or None for a neutral
        face), from the run's tracker."""
        expressive = any(np.abs(v).max() > 0 for v in motion.expressions.values())
        if not expressive and motion.offsets is None:
            return lambda i: None
        if motion.offsets is not None and (motion.topology != tracking.mesh_type
                                           or motion.offsets.shape[1:] != tracking.canonical_vertices.shape):
            raise UsageError(f"the driving offsets are for topology {motion.topology!r} {motion.offsets.shape[1:]}; "
                             f"the tracker's mesh is {tracking.mesh_type!r} "
                             f"({tracking.canonical_vertices.shape[0]} vertices)")
        offsets = self.stage_component("tracker").expression_offsets(motion, tracking)
        offsets = np.asarray(offsets, np.float64) * self.options.expression_scale
        return lambda i: offsets[i]

    # ------------------------------------------------------------------------------------------ helpers

    def _track_image(self, image: np.ndarray, source: str) -> Tracking:
        return self.stage_component("tracker").track(FrameSet(image[None], fps=1.0), single_image=True, source=source)

    def _head_matte(self, crop: np.ndarray, tracking: Tracking) -> np.ndarray:
        """The crop's head matte (the run's segmenter, given the crop's tracking): what moves with the head."""
        masks = self.stage_component("segmenter").segment(FrameSet(crop[None], fps=1.0), tracking)
        return masks.alpha[0]

    def _settings(self):
        from ophav_meshwarp.warper import WarpSettings

        o = self.options
        return WarpSettings(symmetry_fill=o.symmetry_fill, mouth_fill=o.mouth_fill, eye_fill=o.eye_fill,
                            neck_follow=o.neck_follow, pivot_depth=o.pivot_depth, field_grid=o.field_grid,
                            feather_px=max(1.0, 1.5 * self.resolution / 512))


def face_points(tracking: Tracking) -> np.ndarray:
    """The first frame's vertices the crop is sized on: the face outline where the topology names one (a
    full-head mesh such as FLAME's is about twice the face, and the crop scales are in face sizes), else all of
    them (MediaPipe's mesh is the face: its outline spans the same box)."""
    vertices = tracking.vertices[0].astype(np.float64)
    oval = tracking.semantic.get("face_oval")
    if oval is not None and len(oval) >= 3:
        return vertices[np.asarray(oval, np.int64)]
    return vertices
