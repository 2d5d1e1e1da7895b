"""Segmenter ``mediapipe``: MediaPipe selfie segmentation (the person matte, model inside the wheel) cut to the
head with the face geometry, without a face parser.

Per frame: alpha = person matte x head region. The head region comes from the face-mesh points in the image
(the tracking's projected mesh when its topology names the groups of :class:`HeadLandmarks`, MediaPipe's face
mesh run here otherwise): the face oval pushed outwards, sideways for ears and hair and upwards for hair, filled
and feathered, and cut below the jaw line with a soft band over the neck. The matte is smoothed over time with
an exponential moving average run forwards and backwards (no lag), and the face points come from a smooth
tracking, so masks do not flicker.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ophav_core.stages import FrameSet, MaskSet, MeshTopology, Segmenter, Tracking
from ophav_mediapipe.options import MediapipeSegmenterOptions


@dataclass(frozen=True)
class HeadLandmarks:
    """The vertices of a face mesh that the head region is built from (indices into one topology): the face's
    frame (forehead, chin, cheeks), its outline, and the lower jaw (the jaw contour below the mouth corners,
    from one jaw angle to the other) where the neck is cut."""

    forehead: int
    chin: int
    left_cheek: int
    right_cheek: int
    face_oval: np.ndarray
    lower_jaw: np.ndarray

    GROUPS = ("forehead", "chin", "left_cheek", "right_cheek", "face_oval", "jaw", "mouth_left")

    @classmethod
    def of(cls, topology: MeshTopology, neutral: np.ndarray) -> "HeadLandmarks":
        """From a topology's groups; ``neutral`` (V, 3) head-space shape (the topology's template where it has
        one) tells which jaw vertices lie below the mouth."""
        topology.require(*cls.GROUPS, user="the mediapipe segmenter")
        shape = topology.template if topology.template is not None else neutral
        jaw, corner = topology.group("jaw"), topology.group("mouth_left")[0]
        one = lambda name: int(topology.group(name)[0])  # noqa: E731
        return cls(one("forehead"), one("chin"), one("left_cheek"), one("right_cheek"), topology.group("face_oval"),
                   jaw[shape[jaw, 1] > shape[corner, 1]])

    @classmethod
    def covers(cls, topology: MeshTopology) -> bool:
        return all(name in topology.groups for name in cls.GROUPS)


@lru_cache(maxsize=1)
def mediapipe_landmarks() -> HeadLandmarks:
    """The head landmarks of MediaPipe's own mesh (for frames this segmenter detects itself)."""
    from ophav_mediapipe.mesh import topology

    mesh = topology()
    return HeadLandmarks.of(mesh, mesh.template)


def person_mattes(frames: np.ndarray, model_selection: int = 0) -> np.ndarray:
    """MediaPipe selfie segmentation of every frame: float32 (N, H, W) in [0, 1]."""
    from ophav_mediapipe.detect import _upscale_for_detection, mediapipe_solution, native_stderr_silenced

    import cv2

    SelfieSegmentation = mediapipe_solution("selfie_segmentation").SelfieSegmentation
    n, h, w = frames.shape[:3]
    out = np.zeros((n, h, w), np.float32)
    with native_stderr_silenced():
        model = SelfieSegmentation(model_selection=model_selection)
        if n:
            model.process(np.ascontiguousarray(_upscale_for_detection(frames[0], 256)))
    with model:
        for i in range(n):
            image = np.ascontiguousarray(_upscale_for_detection(frames[i], 256))
            mask = model.process(image).segmentation_mask
            if mask is None:
                continue
            if mask.shape != (h, w):
                mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_AREA)
            out[i] = mask
    return np.clip(out, 0.0, 1.0, out=out)


def ema_zero_phase(x: np.ndarray, keep: float) -> np.ndarray:
    """Exponential moving average over axis 0 with weight ``keep`` on the past, forwards and backwards averaged.

    Frame by frame into two preallocated arrays, with no whole-video temporaries: a 512x512 video's mattes are
    about 1 MB a frame, and allocating four more copies of them cost more than the arithmetic."""
    if keep <= 0 or len(x) < 2:
        return x
    x = np.asarray(x)
    forward = np.empty_like(x)
    backward = np.empty_like(x)
    forward[0], backward[-1] = x[0], x[-1]
    for i in range(1, len(x)):
        np.multiply(forward[i - 1], keep, out=forward[i])
        forward[i] += (1 - keep) * x[i]
        j = len(x) - 1 - i
        np.multiply(backward[j + 1], keep, out=backward[j])
        backward[j] += (1 - keep) * x[j]
    forward += backward
    forward *= 0.5
    return forward


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def head_region(points: np.ndarray, size: tuple[int, int], options: MediapipeSegmenterOptions,
                landmarks: HeadLandmarks | None = None, work_size: int = 160) -> np.ndarray:
    """Soft head region float32 (H, W) from face-mesh points (V, 2) in pixels whose ``landmarks`` (MediaPipe's
    by default) are named.

    The region is smooth (feathered edges, a soft neck band), so it is built at ``work_size`` pixels on the
    longer side and upsampled: about 10x faster than at 512x512 with no visible difference."""
    import cv2

    full_w, full_h = size
    scale = min(1.0, work_size / max(full_w, full_h))
    if scale < 1.0:
        small = (max(1, round(full_w * scale)), max(1, round(full_h * scale)))
        sx, sy = small[0] / full_w, small[1] / full_h
        region = head_region((points + 0.5) * np.array([sx, sy]) - 0.5, small, options, landmarks, work_size)
        return cv2.resize(region, (full_w, full_h), interpolation=cv2.INTER_LINEAR)
    marks = landmarks or mediapipe_landmarks()
    width, height = size
    down = points[marks.chin] - points[marks.forehead]
    face_h = float(np.linalg.norm(down)) or 1.0
    down = down / face_h
    right = np.array([down[1], -down[0]])  # image right when the face is upright
    face_w = float(np.linalg.norm(points[marks.left_cheek] - points[marks.right_cheek])) or face_h
    oval = points[marks.face_oval]
    centre = oval.mean(0)
    rel = oval - centre
    a, b = rel @ right, rel @ down  # local coordinates: a to the right, b down
    radius = np.maximum(np.hypot(a, b), 1e-6)
    # Push the oval outwards: sideways for ears and hair everywhere, upwards for hair in the upper half.
    grow_side = options.side_margin * face_w * np.abs(a) / radius
    grow_up = options.hair_margin * face_h * np.clip(-b / radius, 0.0, 1.0)
    a2 = a + np.sign(a) * grow_side
    b2 = b - grow_up
    # Keep the chin side as it is: the neck cut below decides there.
    polygon = centre + a2[:, None] * right + b2[:, None] * down
    canvas = np.zeros((height, width), np.uint8)
    hull = cv2.convexHull(np.round(polygon * 4).astype(np.int32))
    cv2.fillConvexPoly(canvas, hull, 255, lineType=cv2.LINE_AA, shift=2)
    region = canvas.astype(np.float32) / 255.0
    sigma = options.feather * face_w
    if sigma > 0.3:
        region = cv2.GaussianBlur(region, (0, 0), sigma)
    return region * neck_cut(points[marks.lower_jaw], size, right, down, face_w, face_h, options.neck_margin,
                             options.side_drop)


def neck_cut(jaw: np.ndarray, size: tuple[int, int], right: np.ndarray, down: np.ndarray, face_w: float,
             face_h: float, neck_margin: float, side_drop: float = 1.0) -> np.ndarray:
    """1 above the jaw line, falling smoothly to 0 over ``neck_margin`` face heights below it.

    ``jaw`` (J, 2) is the lower jaw in its chain order, from one jaw angle to the other. The cut follows it and,
    beside it, lies up to ``side_drop`` face heights below its ends: the upper jaw rises steeply to the ears, and
    cutting level with the jaw's end would cut the ear lobes. The drop is only taken on a side whose jaw angle
    is the outline's corner there. On a face turned past about 40 degrees, the far angle is hidden behind the
    cheek and the chin is the outermost point on that side: a drop there would reach below the chin into the
    throat."""
    width, height = size
    ja, jb = jaw @ right, jaw @ down
    ramp = 0.05 * face_w
    right_end, left_end = (0, -1) if ja[0] > ja[-1] else (-1, 0)  # the chain's ends: the jaw angles

    def drop(end: int, outward: float) -> float:
        """The full drop where no jaw point lies beyond this angle (outwards), none from 2 ramps beyond."""
        beyond = (outward * (ja - ja[end])).max()
        return side_drop * face_h * float(np.clip(1.0 - beyond / (2 * ramp), 0.0, 1.0))

    drop_right, drop_left = drop(right_end, 1.0), drop(left_end, -1.0)
    order = np.argsort(ja)
    ja, jb = ja[order], jb[order]
    ja = np.concatenate([[ja[0] - ramp], ja, [ja[-1] + ramp]])
    jb = np.concatenate([[jb[0] + drop_left], jb, [jb[-1] + drop_right]])
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    pa = xs * right[0] + ys * right[1]
    pb = xs * down[0] + ys * down[1]
    cut = np.interp(pa.ravel(), ja, jb).reshape(height, width)
    band = max(neck_margin * face_h, 1.0)
    return 1.0 - _smoothstep((pb - cut) / band)


def hull_region(points: np.ndarray, size: tuple[int, int], feather: float) -> np.ndarray:
    """Soft convex hull of arbitrary projected mesh points: the head region for a tracking of another topology."""
    import cv2

    width, height = size
    canvas = np.zeros((height, width), np.uint8)
    hull = cv2.convexHull(np.round(points * 4).astype(np.int32))
    cv2.fillConvexPoly(canvas, hull, 255, lineType=cv2.LINE_AA, shift=2)
    region = canvas.astype(np.float32) / 255.0
    sigma = feather * float(np.ptp(points[:, 0]))
    return cv2.GaussianBlur(region, (0, 0), sigma) if sigma > 0.3 else region


def keep_the_head(alpha: np.ndarray, region: np.ndarray, level: float = 0.25) -> np.ndarray:
    """``alpha`` with every part cut away that is not connected to the face: the component of ``alpha > level``
    that overlaps the face's core (where the head region is 1) most, grown by two pixels so its soft edge stays.
    A shoulder or collar reaching into the head region beside the jaw is a separate blob; kept, the avatar
    learns it as a dark floater under the jaw."""
    import cv2

    count, labels = cv2.connectedComponents((alpha > level).astype(np.uint8), connectivity=8)
    if count <= 2:  # background and at most one blob: nothing to cut
        return alpha
    core = region > 0.99
    overlap = np.bincount(labels[core], minlength=count)
    overlap[0] = 0
    if not overlap.any():
        return alpha
    head = (labels == int(np.argmax(overlap))).astype(np.uint8)
    head = cv2.dilate(head, np.ones((5, 5), np.uint8))
    return alpha * head


class MediapipeSegmenter(Segmenter):
    Options = MediapipeSegmenterOptions
    options: MediapipeSegmenterOptions
    _prepared: tuple[FrameSet, np.ndarray] | None = None  # (frames, their mattes) from prepare, taken by segment

    def prepare(self, frames: FrameSet) -> None:
        """The person mattes (MediaPipe's selfie segmentation, smoothed over time) need no tracking: made here,
        they run beside the tracker (both are MediaPipe graphs on their own threads)."""
        self._prepared = (frames, self._mattes(frames))

    def _mattes(self, frames: FrameSet) -> np.ndarray:
        mattes = person_mattes(frames.frames, self.options.model_selection)
        return ema_zero_phase(mattes, self.options.temporal) if len(frames) > 1 else mattes

    def segment(self, frames: FrameSet, tracking: Tracking | None = None) -> MaskSet:
        prepared, self._prepared = self._prepared, None
        alpha = prepared[1] if prepared is not None and prepared[0] is frames else self._mattes(frames)
        # Region, cut and clip one frame at a time, in place: whole-video temporaries of (N, H, W) floats cost
        # more than the work (about a third of a 512x512 video's segmentation).
        for i, region in enumerate(self._regions(frames, tracking) or ()):
            alpha[i] *= region
            alpha[i] = keep_the_head(alpha[i], region)
        np.clip(alpha, 0.0, 1.0, out=alpha)
        return MaskSet(alpha.astype(np.float32, copy=False))

    def _regions(self, frames: FrameSet, tracking: Tracking | None) -> Iterator[np.ndarray] | None:
        size = frames.size
        if tracking is not None and tuple(int(s) for s in tracking.image_size) == size and len(tracking) == len(frames):
            points = tracking.project(tracking.vertices.astype(np.float64))
            topology = tracking.topology
            if HeadLandmarks.covers(topology):
                marks = HeadLandmarks.of(topology, tracking.canonical_vertices)
                return (head_region(p, size, self.options, marks) for p in points)
            return (hull_region(p, size, self.options.feather) for p in points)
        points = self._face_points(frames)
        if points is None:
            warnings.warn("no face found in any frame: the masks are the whole person matte", stacklevel=3)
            return None
        return (head_region(p, size, self.options) for p in points)

    def _face_points(self, frames: FrameSet) -> np.ndarray | None:
        """Face-mesh points (N, 468, 2) from MediaPipe, gaps filled from the neighbouring frames."""
        from ophav_mediapipe import fit
        from ophav_mediapipe.detect import detect_landmarks

        det = detect_landmarks(frames.frames, single_image=len(frames) == 1)
        if not det.valid.any():
            return None
        points = fit.fill_gaps(det.landmarks[..., :2], det.valid)
        if len(frames) > 2:
            points = fit.one_euro_zero_phase(points, frames.fps, min_cutoff=1.5, beta=0.05)
        return points
