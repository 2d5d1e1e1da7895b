"""The triangle rasteriser of ophav: which triangle of a projected mesh covers each pixel, and interpolation
over it. Pure numpy, no GPU, no renderer.

Meshes here are small (a face mesh has ~900 triangles), so every (triangle, pixel) pair is generated from exact
scanline spans (per triangle and pixel row, the row's intersection with the triangle's edges gives the pixels
whose centres lie inside, edges included) and a z-buffer keeps the nearest triangle per pixel (interpolated
depth, so touching or interpenetrating parts are resolved per pixel, not per triangle). Pixel centres are at
integer coordinates, as everywhere in ophav. Every per-pixel quantity is then an affine function of the pixel
position per triangle.

Orientation: ophav's triangles are counter-clockwise seen from outside; with x right and y down in the image, a
triangle facing the camera has a negative signed area. For a pinhole camera that is exactly the sign of the
cosine :func:`facing_camera` measures in 3D, so culling in the image is culling by the surface's facing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def signed_areas(points2d: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F,) float64 signed pixel areas of the projected triangles (negative: facing the camera)."""
    tri = np.asarray(points2d, np.float64)[faces]
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    return 0.5 * (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])


def front_facing(points2d: np.ndarray, faces: np.ndarray, min_area: float = 1e-6) -> np.ndarray:
    """(F,) bool: the triangle faces the camera and is not degenerate."""
    return signed_areas(points2d, faces) < -min_area


def facing_camera(vertices_cam: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F,) cosine between each triangle's outward normal and the direction to the camera (> 0: front-facing),
    from camera-space vertices (V, 3)."""
    tri = np.asarray(vertices_cam, np.float64)[faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    centres = tri.mean(axis=1)
    num = -(normals * centres).sum(axis=1)
    den = np.linalg.norm(normals, axis=1) * np.linalg.norm(centres, axis=1) + 1e-12
    return num / den


@dataclass
class Raster:
    """The visible surface of a mesh in one image.

    ids: int32 (H, W) triangle covering each pixel, -1 where none.
    ys, xs: int64 (P,) the covered pixels; tri: int64 (P,) their triangles.
    planes: float64 (F, 2, 3) per triangle, the affine functions of (x, y, 1) giving barycentrics b1 and b2
        (b0 = 1 - b1 - b2).
    faces: int64 (F, 3) the mesh's triangles.
    """

    ids: np.ndarray
    ys: np.ndarray
    xs: np.ndarray
    tri: np.ndarray
    planes: np.ndarray
    faces: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return self.ids >= 0

    def interpolate(self, values: np.ndarray, select: np.ndarray | None = None) -> np.ndarray:
        """Per-vertex ``values`` (V,) or (V, C) at the covered pixels, or at the ``select``ed ones (a bool mask
        or index array over the covered pixels): float32 (P,) or (P, C)."""
        if select is None:
            return self._affine(values, self.tri, self.xs, self.ys)
        return self._affine(values, self.tri[select], self.xs[select], self.ys[select])

    def interpolate_at(self, values: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Like :meth:`interpolate`, at given pixels (each must be covered: ``ids[ys, xs] >= 0``)."""
        return self._affine(values, self.ids[ys, xs].astype(np.int64), xs, ys)

    def _affine(self, values: np.ndarray, tri: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        # Interpolation inside a triangle is affine in the pixel position, so each triangle's affine function is
        # built once and evaluated per pixel with three one-dimensional gathers per channel: much cheaper than
        # gathering three corners and two barycentrics per pixel.
        values = np.asarray(values, np.float64)
        flat = values.reshape(len(values), -1)
        v0, v1, v2 = (flat[self.faces[:, k]] for k in range(3))
        coeff = (v1 - v0)[:, :, None] * self.planes[:, None, 0, :] + (v2 - v0)[:, :, None] * self.planes[:, None, 1, :]
        coeff[:, :, 2] += v0
        x, y = xs.astype(np.float64), ys.astype(np.float64)
        out = np.empty((len(tri), flat.shape[1]), np.float32)
        for c in range(flat.shape[1]):
            a, b, d = (np.ascontiguousarray(coeff[:, c, j])[tri] for j in range(3))
            out[:, c] = a * x + b * y + d
        return out.reshape((len(tri),) + values.shape[1:])

    def dense(self, per_pixel: np.ndarray, fill: float = 0.0, dtype=np.float32) -> np.ndarray:
        """Scatter covered-pixel values (P, ...) into an image (H, W, ...)."""
        out = np.full(self.ids.shape + per_pixel.shape[1:], fill, dtype)
        out[self.ys, self.xs] = per_pixel
        return out


def rasterise(points2d: np.ndarray, depth: np.ndarray, faces: np.ndarray, shape: tuple[int, int],
              cull: bool = True, keep: np.ndarray | None = None) -> Raster:
    """The nearest triangle at every pixel of an image of ``shape`` = (height, width).

    points2d: (V, 2) pixel positions; depth: (V,) camera z (smaller is nearer). ``cull`` drops back-facing
    triangles; ``keep`` (F,) bool draws only the triangles it marks. Degenerate triangles are never drawn."""
    height, width = int(shape[0]), int(shape[1])
    points2d = np.asarray(points2d, np.float64)
    depth = np.asarray(depth, np.float64)
    faces = np.asarray(faces, np.int64)
    drawn = front_facing(points2d, faces) if cull else np.abs(signed_areas(points2d, faces)) > 1e-6
    if keep is not None:
        drawn &= np.asarray(keep, bool)
    planes = _barycentric_planes(points2d, faces)
    tri, xs, ys = _covered_pixels(points2d[faces], drawn, width, height)
    winner = _nearest_per_pixel(ys * width + xs, tri, xs, ys, planes, depth[faces], height * width)
    tri, xs, ys = tri[winner], xs[winner], ys[winner]
    ids = np.full((height, width), -1, np.int32)
    ids[ys, xs] = tri
    return Raster(ids, ys, xs, tri, planes, faces)


def _barycentric_planes(points2d: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F, 2, 3): per triangle, the affine functions giving barycentrics b1 and b2 of a pixel (x, y) as
    ``plane[f, k] @ (x, y, 1)``."""
    a, b, c = (points2d[faces[:, k]] for k in range(3))
    e1, e2 = b - a, c - a
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    det = np.where(np.abs(det) < 1e-12, 1e-12, det)
    rows = np.stack([np.stack([e2[:, 1], -e2[:, 0]], -1), np.stack([-e1[:, 1], e1[:, 0]], -1)], 1) / det[:, None, None]
    offset = -np.einsum("fij,fj->fi", rows, a)
    return np.concatenate([rows, offset[..., None]], axis=2)


def _enumerate(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For groups of the given sizes: the group of every element and its index within the group."""
    group = np.repeat(np.arange(len(counts)), counts)
    start = np.repeat(np.cumsum(counts) - counts, counts)
    return group, np.arange(len(group)) - start


def _covered_pixels(tri2d: np.ndarray, keep: np.ndarray, width: int, height: int):
    """Every (triangle, pixel) pair whose pixel centre lies inside the triangle (edges included), by scanline
    spans, so no pixel outside a triangle is ever generated. Triangles wholly outside the image cost nothing."""
    y_lo = np.maximum(np.ceil(tri2d[:, :, 1].min(axis=1)), 0)
    y_hi = np.minimum(np.floor(tri2d[:, :, 1].max(axis=1)), height - 1)
    inside = keep & (tri2d[:, :, 0].max(axis=1) >= 0) & (tri2d[:, :, 0].min(axis=1) <= width - 1)
    rows = np.where(inside & (y_hi >= y_lo), y_hi - y_lo + 1, 0).astype(np.int64)
    tri, row = _enumerate(rows)
    y = y_lo[tri] + row
    left = np.full(len(tri), np.inf)
    right = np.full(len(tri), -np.inf)
    for i, j in ((0, 1), (1, 2), (2, 0)):
        ax, ay, bx, by = tri2d[tri, i, 0], tri2d[tri, i, 1], tri2d[tri, j, 0], tri2d[tri, j, 1]
        crosses = (np.minimum(ay, by) <= y) & (y <= np.maximum(ay, by)) & (ay != by)
        x = ax + (y - ay) * (bx - ax) / np.where(ay != by, by - ay, 1.0)
        left = np.where(crosses, np.minimum(left, x), left)
        right = np.where(crosses, np.maximum(right, x), right)
    x0 = np.maximum(np.ceil(left), 0)
    x1 = np.minimum(np.floor(right), width - 1)
    length = np.where(np.isfinite(x0) & np.isfinite(x1), np.maximum(x1 - x0 + 1, 0), 0).astype(np.int64)
    span, offset = _enumerate(length)
    return tri[span], x0[span].astype(np.int64) + offset, y[span].astype(np.int64)


def _nearest_per_pixel(pixel: np.ndarray, tri: np.ndarray, xs: np.ndarray, ys: np.ndarray, planes: np.ndarray,
                       corner_depth: np.ndarray, num_pixels: int) -> np.ndarray:
    """Indices of the nearest candidate of every covered pixel (a z-buffer). Most pixels have one candidate
    (front faces overlap only along shared edges and where one part of the face hides another), so depth is
    interpolated and sorted for the others only."""
    count = np.bincount(pixel, minlength=num_pixels)
    shared = count[pixel] > 1
    single = np.flatnonzero(~shared)
    multi = np.flatnonzero(shared)
    if len(multi) == 0:
        return single
    t, x, y = tri[multi], xs[multi], ys[multi]
    p = planes[t]
    b1 = p[:, 0, 0] * x + p[:, 0, 1] * y + p[:, 0, 2]
    b2 = p[:, 1, 0] * x + p[:, 1, 1] * y + p[:, 1, 2]
    d = corner_depth[t]
    z = (1.0 - b1 - b2) * d[:, 0] + b1 * d[:, 1] + b2 * d[:, 2]
    order = np.lexsort((z, pixel[multi]))  # by pixel, nearest first
    first = order[np.r_[True, pixel[multi][order][1:] != pixel[multi][order][:-1]]]
    return np.concatenate([single, multi[first]])
