"""The warp outside the face mesh: a smooth backward displacement field interpolated from control points.

Control points are (a) the face-oval vertices of the mesh, which move exactly as the mesh does, (b) the head
shell around the face (:mod:`ophav_meshwarp.shell`) and (c) still points: the image border and the background
away from the head. A thin-plate spline through them, evaluated on a coarse grid and resized, gives each output
pixel where to sample the portrait.
"""
from __future__ import annotations

import numpy as np


def in_plane_angle(rotation: np.ndarray) -> float:
    """The image-plane (roll) part of a camera-frame rotation, radians (positive: clockwise in the image)."""
    return float(np.arctan2(rotation[1, 0] - rotation[0, 1], rotation[0, 0] + rotation[1, 1]))


def border_points(size: int, per_side: int = 16) -> np.ndarray:
    """(4 * per_side, 2) pixel positions spread along the image border (just outside the pixel centres)."""
    t = np.linspace(-0.5, size - 0.5, per_side, endpoint=False)
    far = size - 0.5
    return np.concatenate([
        np.stack([t, np.full_like(t, -0.5)], 1), np.stack([np.full_like(t, far), t], 1),
        np.stack([far - t, np.full_like(t, far)], 1), np.stack([np.full_like(t, -0.5), far - t], 1),
    ]).astype(np.float64)


def _tps_kernel(r2: np.ndarray) -> np.ndarray:
    # U(r) = r^2 log r^2 (a constant factor is absorbed by the weights)
    return r2 * np.log(np.maximum(r2, 1e-20))


def _sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T, 0.0)


class ThinPlateField:
    """Thin-plate spline displacement fields with a fixed set of still points (background anchors, the image
    border) and per-frame moving points.

    The still points' part of the linear system and of the evaluation lattice is factored once; each frame then
    solves only a system the size of the moving points (Schur complement), so a few hundred anchors cost
    nothing per frame. Coordinates are normalised to [0, 1] so ``smoothing`` does not depend on the resolution.
    The field is evaluated on a ``grid`` x ``grid`` lattice and resized bilinearly to ``size`` x ``size``.
    """

    def __init__(self, still: np.ndarray, size: int, grid: int, smoothing: float = 1e-4):
        self.size, self.grid, self.smoothing = size, grid, smoothing
        self.scale = 1.0 / max(size, 1)
        self.still = still.astype(np.float64) * self.scale
        n = len(self.still)
        block = np.zeros((n + 3, n + 3))
        block[:n, :n] = _tps_kernel(_sq_dist(self.still, self.still)) + smoothing * np.eye(n)
        poly = np.concatenate([np.ones((n, 1)), self.still], axis=1)
        block[:n, n:], block[n:, :n] = poly, poly.T
        self._block_inv = np.linalg.pinv(block) if n < 3 else np.linalg.inv(block)
        # Lattice nodes where cv2.resize (half-pixel convention) expects them, so the resize interpolates exactly.
        axis = ((np.arange(grid) + 0.5) * (size / grid) - 0.5) * self.scale
        gx, gy = np.meshgrid(axis, axis)
        self.lattice = np.stack([gx.ravel(), gy.ravel()], axis=1)
        self._lattice_still = np.concatenate(
            [_tps_kernel(_sq_dist(self.lattice, self.still)), np.ones((len(self.lattice), 1)), self.lattice], axis=1)

    def __call__(self, points: np.ndarray, displacement: np.ndarray) -> np.ndarray:
        """(size, size, 2) float32 field through ``displacement`` (P, 2) at ``points`` (P, 2) and 0 at the still
        points."""
        import cv2

        p = points.astype(np.float64) * self.scale
        m = len(p)
        coupling = np.concatenate([_tps_kernel(_sq_dist(self.still, p)), np.ones((1, m)), p.T], axis=0)  # (n+3, m)
        solved = self._block_inv @ coupling
        schur = _tps_kernel(_sq_dist(p, p)) + self.smoothing * np.eye(m) - coupling.T @ solved
        weights = np.linalg.solve(schur, displacement.astype(np.float64))  # (m, 2)
        rest = -solved @ weights  # still-point weights and the affine part, (n+3, 2)
        values = _tps_kernel(_sq_dist(self.lattice, p)) @ weights + self._lattice_still @ rest
        coarse = values.reshape(self.grid, self.grid, 2).astype(np.float32)
        return cv2.resize(coarse, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
