"""Turning motions and driving videos into render requests for a trained avatar."""
from __future__ import annotations

import numpy as np

from ophav_core.stages.motion import Motion, rotation_angle
from ophav_core.stages.data import RenderRequest, Tracking, scale_intrinsics


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
                   widen_pitch: float = 0.0) -> RenderRequest:
    """``count`` render requests for a round of the iterative dataset update: tracked expressions and poses, each
    turned so that the views cover the yaw and pitch range the tracking covers, grown by ``widen_yaw`` /
    ``widen_pitch`` degrees on each side (uniformly over that range: the edges, where the avatar is weakest, get
    as many views as the centre).

    The growth is what a round adds: a round renders only a little beyond what the avatar has already learned,
    so the restorer sees renders it can repair, and the next round starts from the widened avatar."""
    from ophav_core.stages.motion import euler_to_matrix

    index = rng.choice(len(tracking), size=count, replace=count > len(tracking))
    yaw, pitch = pose_angles(tracking)
    lo_yaw, hi_yaw = np.percentile(yaw, 2) - widen_yaw, np.percentile(yaw, 98) + widen_yaw
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
