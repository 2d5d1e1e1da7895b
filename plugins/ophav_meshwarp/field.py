"""The warp outside the face mesh: a smooth backward displacement field interpolated from control points.

Control points are (a) the face-oval vertices of the mesh, which move exactly as the mesh does, (b) two rings of
head-proxy points around the face (hair, ears, the sides of the head), moved rigidly with the head (points below
the chin only partly: the neck follows the head less), and (c) the image border, which stays still. A thin-plate
spline through them, evaluated on a coarse grid and resized, gives each output pixel where to sample the
portrait: the background far from the head stays where it is, the hair and ears turn with the face.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class HeadRings:
    """Head-proxy points in head space and how much each follows the head's motion (1 = rigidly)."""

    points: np.ndarray  # (P, 3)
    follow: np.ndarray  # (P,)


def head_rings(local: np.ndarray, face_oval: np.ndarray, face_width: float, neck_follow: float,
               scales: tuple[float, ...] = (1.25, 1.6), depths: tuple[float, ...] = (0.12, 0.3),
               far_follow: float = 0.7) -> HeadRings:
    """Rings around the face oval: each oval point pushed out from the oval's centre by ``scales`` (in the face
    plane) and back by ``depths`` face widths (behind the face, where hair and ears are). The outer ring follows
    the head by ``far_follow``; points below the chin blend towards ``neck_follow``."""
    oval = local[face_oval]
    centre = oval.mean(axis=0)
    rel = oval[:, :2] - centre[:2]
    direction_y = rel[:, 1] / (np.linalg.norm(rel, axis=1) + 1e-9)  # +1 straight down (y points down)
    below = np.clip((direction_y - 0.3) / 0.6, 0.0, 1.0)
    below = below * below * (3 - 2 * below)
    points, follow = [], []
    for k, (scale, depth) in enumerate(zip(scales, depths)):
        ring = np.empty_like(oval)
        ring[:, :2] = centre[:2] + scale * rel
        ring[:, 2] = oval[:, 2] + depth * face_width
        rigid = 1.0 if k == 0 else far_follow
        points.append(ring)
        follow.append(rigid * (1 - below) + min(neck_follow, rigid) * below)
    return HeadRings(np.concatenate(points).astype(np.float32), np.concatenate(follow).astype(np.float32))


def border_points(size: int, per_side: int = 8) -> np.ndarray:
    """(4 * per_side, 2) pixel positions spread along the image border (just outside the pixel centres)."""
    t = np.linspace(-0.5, size - 0.5, per_side, endpoint=False)
    far = size - 0.5
    return np.concatenate([
        np.stack([t, np.full_like(t, -0.5)], 1), np.stack([np.full_like(t, far), t], 1),
        np.stack([far - t, np.full_like(t, far)], 1), np.stack([np.full_like(t, -0.5), far - t], 1),
    ]).astype(np.float64)


def _tps_kernel(r2: np.ndarray) -> np.ndarray:
    # U(r) = r^2 log r^2 (a constant factor is absorbed by the weights)
    return np.where(r2 > 1e-12, r2 * np.log(np.maximum(r2, 1e-12)), 0.0)


def thin_plate_field(points: np.ndarray, displacement: np.ndarray, size: int, grid: int,
                     smoothing: float = 1e-4) -> np.ndarray:
    """Dense (size, size, 2) float32 displacement field interpolating ``displacement`` (P, 2) at ``points``
    (P, 2) pixels with a thin-plate spline, evaluated on a ``grid`` x ``grid`` lattice and resized bilinearly.

    Coordinates are normalised to [0, 1] so ``smoothing`` does not depend on the resolution."""
    import cv2

    scale = 1.0 / max(size, 1)
    p = points.astype(np.float64) * scale
    d = displacement.astype(np.float64)
    n = len(p)
    r2 = ((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)
    system = np.zeros((n + 3, n + 3))
    system[:n, :n] = _tps_kernel(r2) + smoothing * np.eye(n)
    poly = np.concatenate([np.ones((n, 1)), p], axis=1)
    system[:n, n:] = poly
    system[n:, :n] = poly.T
    rhs = np.zeros((n + 3, 2))
    rhs[:n] = d
    coeffs = np.linalg.lstsq(system, rhs, rcond=None)[0] if not np.isfinite(system).all() else np.linalg.solve(system, rhs)
    # Lattice nodes where cv2.resize (half-pixel convention) expects them, so the resize interpolates exactly.
    axis = ((np.arange(grid) + 0.5) * (size / grid) - 0.5) * scale
    gx, gy = np.meshgrid(axis, axis)
    q = np.stack([gx.ravel(), gy.ravel()], axis=1)
    r2q = ((q[:, None, :] - p[None, :, :]) ** 2).sum(-1)
    values = _tps_kernel(r2q) @ coeffs[:n] + np.concatenate([np.ones((len(q), 1)), q], axis=1) @ coeffs[n:]
    coarse = values.reshape(grid, grid, 2).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR)
