"""Tracker ``mediapipe``: camera, head pose, expression and a 468-vertex face mesh per frame, from the face mesh
model inside the ``mediapipe==0.10.21`` wheel (no downloaded weights).

Pipeline per call (numpy over all frames, one cv2.solvePnP per frame):

1. MediaPipe face mesh landmarks (pixels plus MediaPipe's relative depth) for every frame.
2. Camera: pinhole, fx = fy = ``focal_scale * max(W, H)`` (the stated assumption, see the options), or the
   reference tracking's focal scale.
3. Rigid pose: weighted Procrustes (Umeyama similarity) of the landmark cloud to MediaPipe's metric canonical
   mesh on rigid points (nose, forehead, temples, eye corners; mouth, lids and brows down-weighted to 0),
   then cv2.solvePnP (iterative, from that guess) of the 2D landmarks against the shape, twice: first the
   canonical prior, then the person's own neutral shape.
4. Landmarks are lifted onto their pixel rays (depth from the pose plus MediaPipe's relative depth) and
   brought to head space by the inverse pose. The person's neutral shape (``canonical_vertices``) is the
   median over the frames with the most relaxed mouth (video) or the portrait's own shape (single image),
   its head frame anchored on the metric prior's rigid points.
5. Expression: the head-space residual, least-squares projected onto the expression basis
   (:mod:`ophav_mediapipe.basis`: the four named expressions first, at intensity 1, then the video's principal
   components or generic local modes). With ``reference=`` the reference's canonical mesh and basis are kept;
   by default the residual is measured from this video's own neutral face and rescaled to the reference's
   face width, so the driver's face shape does not leak into the avatar.
6. Video only: a zero-phase One-Euro filter on rotation vectors, translations and coefficients; short gaps
   without a face are interpolated (``valid`` False), then every mesh is rebuilt as R (canonical + basis .
   expression) + t, so the contract holds exactly.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np

from ophav_core.errors import InvalidData, NoFaceFound
from ophav_core.stages.motion import Motion
from ophav_core.stages import FrameSet, Tracker, Tracking
from ophav_mediapipe import fit
from ophav_mediapipe.basis import build_basis, project_onto_basis
from ophav_mediapipe.blendshapes import named_offsets
from ophav_mediapipe.mesh import (MESH_TYPE, SEMANTIC, face_width, load_canonical_mesh, rigid_indices, rigid_weights,
                                  topology)
from ophav_mediapipe.options import MediapipeTrackerOptions


# One-Euro filter settings at smooth = 1: (min_cutoff in Hz, beta in Hz per unit/s). Units: rotation vectors in
# radians, translations in cm, expression coefficients. A still head gets the min_cutoff (strong smoothing of
# MediaPipe's jitter); a head turning at 1 rad/s gets a ~2.7 Hz cutoff. Expressions follow their motion faster
# (beta 5; it was 0.2): with 0.2 the small, quick mouth movements of a nodding, talking driver were smoothed
# away (the tracked mouth opening's correlation with dlib's reading of the same frames of nod_175f: 0.75 with
# 0.2, 0.90 with 5, 0.91 unsmoothed), for 0.16 instead of 0.06 px a frame of jitter on a still, noisy portrait
# (benchmarks/RESULTS.md, "mouth-opening correlation").
_FILTERS = {"rotation": (0.7, 2.0), "translation": (0.7, 0.2), "expression": (1.0, 5.0)}


@dataclass
class Timings:
    """Seconds spent in each part of the last ``track`` call (for benchmarks)."""

    detect: float = 0.0
    pose: float = 0.0
    expression: float = 0.0
    smooth: float = 0.0
    total: float = 0.0
    frames: int = 0


def neutral_shape(shapes: np.ndarray, fraction: float = 0.3) -> np.ndarray:
    """The person's neutral face from head-space shapes (N, V, 3): the per-vertex median over the frames with
    the most relaxed mouth (narrowest and most closed, the ``fraction`` lowest by a robust z-score).

    A plain median over a video where the person smiles half the time would be half a smile, and every neutral
    frame would then read as a negative smile. Blinks and short expressions are removed by the median."""
    if len(shapes) < 5:
        return np.median(shapes, axis=0)
    width = face_width(shapes)
    left, right = SEMANTIC["mouth_left"][0], SEMANTIC["mouth_right"][0]
    mouth_width = np.linalg.norm(shapes[:, left] - shapes[:, right], axis=-1) / width
    upper, lower = SEMANTIC["upper_lip_inner"][0], SEMANTIC["lower_lip_inner"][0]
    lip_gap = np.linalg.norm(shapes[:, lower] - shapes[:, upper], axis=-1) / width

    def robust_z(x: np.ndarray) -> np.ndarray:
        mad = np.median(np.abs(x - np.median(x)))
        return (x - np.median(x)) / (1.4826 * mad + 1e-3)

    score = robust_z(mouth_width) + robust_z(lip_gap)
    relaxed = score <= np.quantile(score, fraction)
    return np.median(shapes[relaxed], axis=0)


def _rotvec(R: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(R).as_rotvec()


def _matrix(rotvec: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_rotvec(rotvec).as_matrix()


class MediapipeTracker(Tracker):
    """See the module docstring. ``last_timings`` holds the per-part time of the last call."""

    Options = MediapipeTrackerOptions
    options: MediapipeTrackerOptions

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self.last_timings = Timings()

    # ------------------------------------------------------------------------------------------ public

    def track(self, frames: FrameSet, *, single_image: bool = False, reference: Tracking | None = None,
              source: str = "") -> Tracking:
        from ophav_mediapipe.detect import detect_landmarks

        start = time.perf_counter()
        timings = Timings(frames=len(frames))
        if reference is not None and reference.mesh_type != MESH_TYPE:
            raise InvalidData(f"reference tracking has mesh type {reference.mesh_type!r}; the mediapipe tracker "
                              f"needs {MESH_TYPE!r}")
        o = self.options
        det = detect_landmarks(frames.frames, single_image=single_image, min_detection_confidence=o.min_detection_confidence,
                               min_detection_size=o.min_detection_size)
        timings.detect = time.perf_counter() - start
        self._check_faces(det.valid, det.crowded, single_image, source, len(frames))
        width, height = frames.size
        K = self._camera(width, height, reference)

        t0 = time.perf_counter()
        valid = det.valid
        R, t, shapes, identity = self._fit_pose(det.landmarks[valid], K)
        video = not single_image and len(frames) > 2
        if video and o.smooth > 0:
            R, t = self._smooth_pose(R, t, frames.fps)
            shapes = fit.to_canonical(fit.lift_to_camera(det.landmarks[valid], R, t, identity, rigid_weights(), K), R, t)
        timings.pose = time.perf_counter() - t0

        t0 = time.perf_counter()
        if reference is None:
            canonical = identity
            basis = build_basis(canonical, shapes - canonical, o.num_expressions)
            residual = shapes - canonical
        else:
            canonical = reference.canonical_vertices.astype(np.float64)
            basis = reference.expression_basis
            if o.reference_expression == "relative":
                residual = (shapes - identity) * (face_width(canonical) / face_width(identity))
            else:
                residual = shapes - canonical
        expression = project_onto_basis(residual, basis)
        timings.expression = time.perf_counter() - t0

        t0 = time.perf_counter()
        if video and o.smooth > 0:
            expression = self._filter(expression, frames.fps, "expression")
        R, t, expression = self._fill(R, t, expression, valid)
        timings.smooth = time.perf_counter() - t0

        tracking = self._assemble(K, (width, height), R, t, expression, canonical, basis, det.landmarks, valid)
        timings.total = time.perf_counter() - start
        self.last_timings = timings
        return tracking

    def expressions_for(self, motion: Motion, tracking: Tracking) -> np.ndarray:
        """Coefficients (N, E) in ``tracking``'s basis for the motion's named expressions (scaled to the
        tracking's face width) plus its dense offsets (face-width units, topology ``mediapipe468``)."""
        offsets = self.expression_offsets(motion, tracking)
        return project_onto_basis(offsets, tracking.expression_basis).astype(np.float32)

    def expression_offsets(self, motion: Motion, tracking: Tracking) -> np.ndarray:
        """Head-space offsets (N, 468, 3) float64: the named expressions (MediaPipe-mesh blendshapes scaled to the
        tracking's face width) plus the motion's dense offsets (face-width units, topology ``mediapipe468``)."""
        if tracking.mesh_type != MESH_TYPE:
            raise InvalidData(f"tracking has mesh type {tracking.mesh_type!r}; named expressions exist for {MESH_TYPE!r}")
        n = len(motion)
        canonical = tracking.canonical_vertices
        width = face_width(canonical)
        offsets = np.zeros((n,) + canonical.shape, np.float64)
        named = named_offsets()
        scale = width / face_width(load_canonical_mesh()[0])
        for name, intensity in motion.expressions.items():
            if np.any(intensity != 0):
                offsets += intensity[:, None, None] * named[name][None].astype(np.float64) * scale
        if motion.offsets is not None:
            if motion.topology != MESH_TYPE or motion.offsets.shape[1:] != canonical.shape:
                raise InvalidData(f"motion offsets are for topology {motion.topology!r} {motion.offsets.shape[1:]}, "
                                  f"this tracking is {MESH_TYPE!r} {canonical.shape}")
            offsets += motion.offsets.astype(np.float64) * width
        return offsets

    # ------------------------------------------------------------------------------------------ steps

    @staticmethod
    def _check_faces(valid: np.ndarray, crowded: list[int], single_image: bool, source: str, count: int) -> None:
        name = source or ("the portrait" if single_image else "the video")
        if single_image and not valid.all():
            raise NoFaceFound(f"no face found in {name}; use a photo where the face is visible and roughly frontal")
        if not valid.any():
            raise NoFaceFound(f"no face found in any of the {count} frames of {name}")
        if not single_image and not valid.all():
            missing = np.nonzero(~valid)[0]
            listed = ", ".join(f"#{i}" for i in missing[:12]) + (" ..." if len(missing) > 12 else "")
            warnings.warn(f"{name}: no face in {len(missing)} of {count} frames ({listed}); their pose and expression "
                          f"are interpolated from the neighbouring frames and marked valid=False", stacklevel=3)
        if crowded:
            where = "the portrait" if single_image else f"{len(crowded)} frame(s) (first #{crowded[0]})"
            warnings.warn(f"{name}: more than one face in {where}; tracking the largest", stacklevel=3)

    def _camera(self, width: int, height: int, reference: Tracking | None) -> np.ndarray:
        if reference is not None:
            # The reference's camera model: the same focal length relative to the image size.
            focal = float(reference.K[0, 0]) / float(max(reference.image_size)) * max(width, height)
        elif self.options.focal_length is not None:
            focal = float(self.options.focal_length)
        else:
            focal = self.options.focal_scale * max(width, height)
        return fit.intrinsics(width, height, focal)

    def _fit_pose(self, landmarks: np.ndarray, K: np.ndarray):
        """Pose against the metric prior, the person's neutral shape from it, then the pose against that shape."""
        prior = load_canonical_mesh()[0].astype(np.float64)
        weights, index = rigid_weights(), rigid_indices()
        R, t = fit.weak_perspective_pose(landmarks, prior, weights, K)
        R, t = fit.refine_pnp(landmarks[..., :2], prior, R, t, K, index)
        shapes = fit.to_canonical(fit.lift_to_camera(landmarks, R, t, prior, weights, K), R, t)
        identity = neutral_shape(shapes)
        R, t = fit.refine_pnp(landmarks[..., :2], identity, R, t, K, index)
        shapes = fit.to_canonical(fit.lift_to_camera(landmarks, R, t, identity, weights, K), R, t)
        # Re-anchor the head frame on the prior's rigid points (the neutral shape may have drifted a little);
        # shapes and poses move with it so X_cam is unchanged.
        neutral = neutral_shape(shapes)
        _, Ra, b = fit.weighted_similarity(prior, neutral[None], weights)
        Ra, b = Ra[0], b[0]
        shapes = (shapes - b) @ Ra
        t = t + np.einsum("nij,j->ni", R, b)
        R = R @ Ra
        return R, t, shapes, (neutral - b) @ Ra

    def _smooth_pose(self, R: np.ndarray, t: np.ndarray, fps: float) -> tuple[np.ndarray, np.ndarray]:
        mean = _matrix(_rotvec(R).mean(0, keepdims=True))[0]
        rel = _rotvec(np.einsum("ij,njk->nik", mean.T, R))  # small angles around the mean: no wrap-around
        rel = self._filter(rel, fps, "rotation")
        return mean[None] @ _matrix(rel), self._filter(t, fps, "translation")

    def _filter(self, values: np.ndarray, fps: float, what: str) -> np.ndarray:
        min_cutoff, beta = _FILTERS[what]
        s = self.options.smooth
        return fit.one_euro_zero_phase(values, fps, min_cutoff=min_cutoff / s, beta=beta / s)

    def _fill(self, R: np.ndarray, t: np.ndarray, expression: np.ndarray, valid: np.ndarray):
        """Values for every frame: tracked frames as they are, gaps interpolated (long gaps hold the pose)."""
        n = len(valid)
        if valid.all():
            return R, t, expression
        lengths = fit.gap_lengths(valid)
        mean = _matrix(_rotvec(R).mean(0, keepdims=True))[0]

        def spread(values: np.ndarray) -> np.ndarray:
            full = np.zeros((n,) + values.shape[1:])
            full[valid] = values
            filled = fit.fill_gaps(full, valid)
            # Beyond max_gap: hold the nearest tracked frame instead of a long linear drift.
            long_gap = lengths > self.options.max_gap
            if long_gap.any():
                idx = np.nonzero(valid)[0]
                nearest = idx[np.abs(np.arange(n)[:, None] - idx[None]).argmin(1)]
                filled[long_gap] = full[nearest[long_gap]]
            return filled

        rel = spread(_rotvec(np.einsum("ij,njk->nik", mean.T, R)))
        return mean[None] @ _matrix(rel), spread(t), spread(expression)

    def _assemble(self, K, size, R, t, expression, canonical, basis, pixels, valid) -> Tracking:
        R = R.astype(np.float32)
        t = t.astype(np.float32)
        expression = expression.astype(np.float32)
        canonical = canonical.astype(np.float32)
        local = canonical[None] + np.einsum("ne,evc->nvc", expression, basis)
        vertices = np.einsum("nij,nvj->nvi", R, local) + t[:, None]
        tracking = Tracking(K=K, image_size=np.array(size), rotation=R, translation=t, expression=expression,
                            vertices=vertices, canonical_vertices=canonical, expression_basis=basis,
                            landmarks=None, valid=valid.copy(), **topology().tracking_fields())
        # What the tracker saw; frames without a face get the interpolated mesh's projection.
        landmarks = tracking.project(vertices.astype(np.float64)).astype(np.float32)
        landmarks[valid] = pixels[valid, :, :2]
        tracking.landmarks = landmarks
        return tracking
