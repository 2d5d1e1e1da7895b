"""Turning motions and driving videos into render requests for a trained avatar."""
from __future__ import annotations

import numpy as np

from ophav_core.stages.motion import Motion, rotation_angle
from ophav_core.stages.data import FrameSet, MaskSet, RenderRequest, RenderResult, Tracking, scale_intrinsics


def frontal_index(tracking: Tracking) -> int:
    """The frame whose head pose is closest to looking straight at the camera."""
    return int(np.argmin(rotation_angle(tracking.rotation)))


def _camera(template: Tracking, resolution: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    size = tuple(int(s) for s in template.image_size)
    if resolution is None or tuple(resolution) == size:
        return template.K, np.array(size)
    return scale_intrinsics(template.K, size, resolution), np.array(resolution)


def requests_from_motion(template: Tracking, motion: Motion, expressions: np.ndarray | None = None,
                         base: int | None = None, resolution: tuple[int, int] | None = None) -> RenderRequest:
    """The avatar at frame ``base`` of its template, turned by the motion's relative pose (about the head's
    origin) and with ``expressions`` (N, E) added to the base expression."""
    base = frontal_index(template) if base is None else base
    n = len(motion)
    rotation = motion.rotations() @ template.rotation[base]
    translation = np.repeat(template.translation[base][None], n, axis=0)
    expression = np.repeat(template.expression[base][None], n, axis=0)
    if expressions is not None:
        expression = expression + expressions
    K, size = _camera(template, resolution)
    return RenderRequest(rotation, translation, expression, K, size)


def requests_from_driver(template: Tracking, driver: Tracking, base: int | None = None,
                         resolution: tuple[int, int] | None = None) -> RenderRequest:
    """Cross-identity reenactment, relative as in FOMM: the driver's rotation and expression change since its
    first frame are applied to the avatar's base frame. ``driver`` must be tracked in the avatar's expression
    basis (``Tracker.track(video, reference=template)``)."""
    if driver.expression.shape[1] != template.expression.shape[1]:
        raise ValueError("the driver is not tracked in the avatar's expression basis (track it with reference=)")
    base = frontal_index(template) if base is None else base
    relative = driver.rotation @ np.transpose(driver.rotation[:1], (0, 2, 1))
    rotation = relative @ template.rotation[base]
    translation = np.repeat(template.translation[base][None], len(driver), axis=0)
    expression = template.expression[base][None] + (driver.expression - driver.expression[:1])
    K, size = _camera(template, resolution)
    return RenderRequest(rotation, translation, expression, K, size)


def pose_angles(tracking: Tracking) -> tuple[np.ndarray, np.ndarray]:
    """(yaw, pitch) in degrees of every tracked frame's head rotation."""
    from ophav_core.stages.motion import matrix_to_euler

    yaw, pitch, _ = matrix_to_euler(tracking.rotation)
    return np.asarray(yaw, np.float64), np.asarray(pitch, np.float64)


def widening_views(tracking: Tracking, count: int, rng: np.random.Generator, widen_yaw: float = 0.0,
                   widen_pitch: float = 0.0, symmetric: bool = False) -> RenderRequest:
    """``count`` render requests for a round of the iterative dataset update: tracked expressions and poses, each
    turned so that the views cover the yaw and pitch range the tracking covers, grown by ``widen_yaw`` /
    ``widen_pitch`` degrees on each side (uniformly over that range: the edges, where the avatar is weakest, get
    as many views as the centre).

    The growth is what a round adds: a round renders only a little beyond what the avatar has already learned,
    so the restorer sees renders it can repair, and the next round starts from the widened avatar.

    ``symmetric``: the yaw range is first joined with its mirror image (a portrait turned 15 degrees gives a
    coarse video from -37 to +67; the views then also reach -67), for a round that can take a view the avatar
    never learned from its mirror view (:func:`mirrored_request`)."""
    from ophav_core.stages.motion import euler_to_matrix

    index = rng.choice(len(tracking), size=count, replace=count > len(tracking))
    yaw, pitch = pose_angles(tracking)
    lo_yaw, hi_yaw = np.percentile(yaw, 2), np.percentile(yaw, 98)
    if symmetric:
        lo_yaw, hi_yaw = min(lo_yaw, -hi_yaw), max(hi_yaw, -lo_yaw)
    lo_yaw, hi_yaw = lo_yaw - widen_yaw, hi_yaw + widen_yaw
    lo_pitch, hi_pitch = np.percentile(pitch, 2) - widen_pitch, np.percentile(pitch, 98) + widen_pitch
    extra_yaw = rng.uniform(lo_yaw, hi_yaw, count) - yaw[index]
    extra_pitch = rng.uniform(lo_pitch, hi_pitch, count) - pitch[index]
    rotation = euler_to_matrix(extra_yaw, extra_pitch, np.zeros(count)) @ tracking.rotation[index]
    return RenderRequest(rotation, tracking.translation[index], tracking.expression[index], tracking.K,
                         tracking.image_size)


def tracking_for_request(template: Tracking, request: RenderRequest) -> Tracking:
    """The tracking that describes rendered images exactly (their known render parameters)."""
    K = request.K[0]
    vertices = template.mesh_for(request.rotation, request.translation, request.expression)
    return Tracking(K=K, image_size=request.resolution, rotation=request.rotation, translation=request.translation,
                    expression=request.expression, vertices=vertices, canonical_vertices=template.canonical_vertices,
                    expression_basis=template.expression_basis, valid=np.ones(len(request), bool),
                    **template.topology.tracking_fields())


_MIRROR = np.diag([-1.0, 1.0, 1.0])  # x negated: the camera's and the head's left-right mirror


def mirrored_expressions(template: Tracking, expression: np.ndarray, observed: np.ndarray | None = None,
                         prior: float = 0.01) -> np.ndarray:
    """(N, E) the expressions whose offsets are closest to the mirror images of ``expression``'s (N, E): each
    vertex's offset taken from its mirror vertex, x negated, expressed in the template's basis.

    A basis of left/right pairs (or of symmetric directions) maps exactly; a tracked video's principal
    components do not, and a plain least-squares fit leans on components the video barely used (tens of times
    their range). So the fit is pulled towards the ``observed`` expressions (N', E) (the template's own by
    default): a Gaussian prior with their per-coefficient spread, of weight ``prior`` against the mesh's fit,
    and the result is kept within their range."""
    basis = np.asarray(template.expression_basis, np.float64)
    count = basis.shape[0]
    flat = basis.reshape(count, -1).T  # (3V, E)
    target = np.einsum("ne,evc->nvc", np.asarray(expression, np.float64), basis)[:, template.symmetry]
    target = (target * np.diag(_MIRROR)).reshape(len(target), -1)
    observed = np.asarray(template.expression if observed is None else observed, np.float64)
    mean, spread = observed.mean(axis=0), observed.std(axis=0) + 1e-6
    gram = flat.T @ flat
    weight = prior * np.trace(gram) / count * np.diag(np.mean(spread ** 2) / spread ** 2)
    solved = np.linalg.solve(gram + weight, (target @ flat + mean @ weight).T).T
    return np.clip(solved, observed.min(axis=0), observed.max(axis=0)).astype(np.float32)


def mirrored_request(template: Tracking, request: RenderRequest, observed: np.ndarray | None = None
                     ) -> RenderRequest | None:
    """The views whose renders, flipped left to right (:func:`flip_renders`), show the head of ``request`` as its
    mirror image: the head turned the other way (yaw and roll negated), with the mirrored expression, seen by the
    mirrored camera. For a symmetric head that is the same picture, drawn from what the avatar learned of the
    other side: a portrait turned to one side leaves the avatar's far side unseen, and its near side is the
    mirror image of exactly that. None when the template's mesh has no mirror map. ``observed``: the expressions
    the avatar was trained on (:func:`mirrored_expressions`).

    Pixel centres sit at integer coordinates (as :meth:`Tracking.project`), so the flip maps x to W - 1 - x."""
    if template.symmetry is None:
        return None
    rotation = np.asarray(request.rotation, np.float64)
    expression = mirrored_expressions(template, request.expression, observed)
    mirrored_rotation = _MIRROR @ rotation @ _MIRROR
    # Translation: the mirrored head's vertex i must sit, once mirrored back, where vertex symmetry[i] of the
    # original is (least squares, so a canonical shape a little off the plane x = 0 still lines up).
    original = template.mesh_for(rotation, np.asarray(request.translation, np.float64), request.expression)
    local = template.canonical_vertices[None] + np.einsum("ne,evc->nvc", expression, template.expression_basis)
    turned = np.einsum("nij,nvj->nvi", rotation @ _MIRROR, local)
    translation = (original[:, template.symmetry] - turned).mean(axis=1) @ _MIRROR
    K = np.array(request.K, np.float64)
    K[:, 0, 2] = (int(request.resolution[0]) - 1) - K[:, 0, 2]
    return RenderRequest(mirrored_rotation.astype(np.float32), translation.astype(np.float32), expression, K,
                         request.resolution)


def flip_renders(result: RenderResult) -> RenderResult:
    """Renders mirrored left to right (image, alpha and depth)."""
    return RenderResult(rgb=np.ascontiguousarray(result.rgb[:, :, ::-1]),
                        alpha=np.ascontiguousarray(result.alpha[:, :, ::-1]),
                        depth=np.ascontiguousarray(result.depth[:, :, ::-1]))


def mirrored_frames(frames: FrameSet, masks: MaskSet, tracking: Tracking
                    ) -> tuple[FrameSet, MaskSet, Tracking, np.ndarray] | None:
    """The symmetry prior applied to the training data: the frames whose mirror images show the head turned
    further than the video reaches on the other side, flipped left to right, with the tracking that describes
    the flipped images exactly (:func:`mirrored_request`), and the indices of the frames they came from.

    A portrait turned 14 degrees gives a coarse video from about -35 to +65 degrees of yaw: the avatar never sees
    the head beyond -35, and renders fog there. The frames beyond +35, mirrored, show it from -35 to -65. Only
    frames whose mirrored yaw lies outside the range the video covers (its 2nd to 98th percentile) are taken, so
    a mirrored frame never competes with a real one (an asymmetric face keeps its own look wherever the video
    saw it). None when the mesh has no mirror map, the camera's principal point is off the image's vertical
    centre line (a flip would move it) or no frame reaches beyond the other side."""
    if tracking.symmetry is None:
        return None
    width = int(tracking.image_size[0])
    if abs(float(tracking.K[0, 2]) - (width - 1) / 2.0) > 1e-3:
        return None
    valid = np.ones(len(tracking), bool) if tracking.valid is None else np.asarray(tracking.valid, bool)
    if not valid.any():
        return None
    yaw, _ = pose_angles(tracking)
    lo, hi = np.percentile(yaw[valid], 2), np.percentile(yaw[valid], 98)
    index = np.flatnonzero(valid & ((-yaw < lo) | (-yaw > hi)))
    if not len(index):
        return None
    request = RenderRequest.from_tracking(tracking, index)
    mirrored = mirrored_request(tracking, request, observed=tracking.expression[valid])
    views = tracking_for_request(tracking, mirrored)
    flip = lambda a: np.ascontiguousarray(a[index][:, :, ::-1])  # noqa: E731
    return FrameSet(flip(frames.frames), fps=frames.fps), MaskSet(flip(masks.alpha)), views, index
