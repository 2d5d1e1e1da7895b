"""Image2Video ``meshwarp``: the portrait's own pixels, moved by its tracked face mesh (no network, no weights).

1. The portrait is tracked, cropped to a square around the face (:mod:`ophav_meshwarp.crop`) at the output
   resolution, and the crop is tracked again: its camera, head pose and 468-vertex face mesh.
2. Each frame turns the mesh by the motion's relative rotation about the head centre and adds the motion's
   expression: named expressions (MediaPipe tracker's offsets, scaled to this face) and/or a driving video's
   dense offsets (face-width units).
3. :func:`ophav_meshwarp.warper.render_frame` warps the crop accordingly.
"""
from __future__ import annotations

import numpy as np

from ophav_core.errors import InvalidData, UsageError
from ophav_core.stages.motion import Motion
from ophav_core.stages import FrameSet, Image2Video, Portrait, Tracking
from ophav_meshwarp.options import MeshwarpOptions

MESH_TYPE = "mediapipe468"


class MeshWarp(Image2Video):
    """See the module docstring."""

    Options = MeshwarpOptions
    options: MeshwarpOptions

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self._tracker = None

    @property
    def resolution(self) -> int:
        return int(self.options.resolution or self.context.profile.resolution)

    def tracker(self):
        """The MediaPipe tracker (created on first use; one per component so its models load once)."""
        if self._tracker is None:
            from ophav_mediapipe.tracker import MediapipeTracker

            self._tracker = MediapipeTracker(None, self.context)
        return self._tracker

    # ------------------------------------------------------------------------------------------ public

    def generate(self, portrait: Portrait, motion: Motion) -> FrameSet:
        source, box = self.prepare(portrait)
        offsets = self.expression_offsets(motion, source)
        rotations = motion.rotations().astype(np.float64)
        n, size = len(motion), self.resolution
        frames = np.empty((n, size, size, 3), np.uint8)
        mouth, eyes, unseen = np.zeros(n, np.float32), np.zeros((n, 2), np.float32), np.zeros(n, np.float32)
        from ophav_meshwarp.warper import render_frame

        with self.context.progress(n, "meshwarp") as bar:
            for i in range(n):
                frames[i], info = render_frame(source, rotations[i], offsets(i))
                mouth[i], eyes[i], unseen[i] = info.mouth_fill, info.eye_fill, info.unseen_fraction
                bar.advance(1)
        driving = dict(motion.driving_arrays())
        driving.update({
            "crop_box": np.repeat(box[None], n, axis=0),
            "fill_mouth": mouth, "fill_eyes": eyes, "fill_unseen": unseen,
        })
        return FrameSet(frames, fps=motion.fps, driving=driving)

    def prepare(self, portrait: Portrait):
        """Crop and track the portrait; returns the warper's :class:`~ophav_meshwarp.warper.SourceFace` and the
        crop box (x0, y0, x1, y1) in portrait pixels."""
        from ophav_meshwarp.crop import crop_box, crop_image, integer_box
        from ophav_meshwarp.warper import prepare_source

        size = self.resolution
        full = self._track_image(portrait.image, portrait.source)
        box = integer_box(crop_box(full.project(full.vertices[0].astype(np.float64)), portrait.size,
                                   self.options.crop_scale, self.options.crop_shift,
                                   self.options.min_crop_scale))
        crop = crop_image(portrait.image, box, size)
        tracking = self._track_image(crop, f"{portrait.source or 'the portrait'} (cropped)")
        head_alpha = self._head_matte(crop, tracking) if self.options.head_matte else None
        source = prepare_source(crop, tracking.K, tracking.rotation[0], tracking.translation[0],
                                tracking.vertices[0], self._parts(tracking), self._settings(), head_alpha)
        return source, box

    def expression_offsets(self, motion: Motion, source):
        """A function frame -> head-space vertex offsets (V, 3) (or None for a neutral face)."""
        from ophav_mediapipe.blendshapes import named_offsets
        from ophav_mediapipe.mesh import face_width, load_canonical_mesh

        gain = self.options.expression_scale
        width = face_width(source.local)
        named = named_offsets()
        scale = width / face_width(load_canonical_mesh()[0]) * gain
        names = [k for k, v in motion.expressions.items() if np.abs(v).max() > 0 and k in named]
        basis = np.stack([named[k] for k in names]).astype(np.float64) * scale if names else None
        weights = np.stack([motion.expressions[k] for k in names], axis=1).astype(np.float64) if names else None
        dense = None
        if motion.offsets is not None:
            if motion.topology != MESH_TYPE or motion.offsets.shape[1:] != source.local.shape:
                raise UsageError(f"the driving offsets are for topology {motion.topology!r} {motion.offsets.shape[1:]}; "
                                 f"meshwarp needs {MESH_TYPE!r} ({source.local.shape[0]} vertices)")
            dense = motion.offsets.astype(np.float64) * width * gain

        def offsets(i: int) -> np.ndarray | None:
            out = None
            if basis is not None:
                out = np.einsum("k,kvc->vc", weights[i], basis)
            if dense is not None:
                out = dense[i] if out is None else out + dense[i]
            return out

        return offsets

    # ------------------------------------------------------------------------------------------ helpers

    def _track_image(self, image: np.ndarray, source: str) -> Tracking:
        tracking = self.tracker().track(FrameSet(image[None], fps=1.0), single_image=True, source=source)
        if tracking.mesh_type != MESH_TYPE:
            raise InvalidData(f"meshwarp needs a {MESH_TYPE} tracking, the tracker gave {tracking.mesh_type!r}")
        return tracking

    def _head_matte(self, crop: np.ndarray, tracking: Tracking) -> np.ndarray:
        """The crop's head matte (MediaPipe selfie segmentation cut to the head): what moves with the head."""
        from ophav_mediapipe.segmenter import MediapipeSegmenter

        masks = MediapipeSegmenter(None, self.context).segment(FrameSet(crop[None], fps=1.0), tracking)
        return masks.alpha[0]

    @staticmethod
    def _parts(tracking: Tracking):
        from ophav_mediapipe.mesh import load_canonical_mesh

        from ophav_meshwarp.topology import build_parts

        canonical, faces, _ = load_canonical_mesh()  # exactly symmetric: the mirror map comes from it
        return build_parts(canonical, tracking.faces, tracking.semantic)

    def _settings(self):
        from ophav_meshwarp.warper import WarpSettings

        o = self.options
        return WarpSettings(symmetry_fill=o.symmetry_fill, mouth_fill=o.mouth_fill, eye_fill=o.eye_fill,
                            neck_follow=o.neck_follow, pivot_depth=o.pivot_depth, field_grid=o.field_grid,
                            feather_px=max(1.0, 1.5 * self.resolution / 512))
