"""A small triangle rasteriser for projected meshes: which triangle covers each pixel, with barycentrics.

Meshes here are small (a face mesh has ~900 triangles), so the rasteriser is plain vectorised numpy: every
pixel centre of every triangle's bounding box is tested against the triangle (exact barycentric inside test),
and a z-buffer keeps the nearest triangle per pixel. Pixel centres are at integer coordinates, as in the rest
of ophav.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def signed_areas(vertices2d: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F,) signed pixel areas of the projected triangles. With x right, y down in the image, a triangle that is
    counter-clockwise seen from outside (ophav's convention) and faces the camera has a negative area."""
    tri = vertices2d[faces].astype(np.float64)
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    return 0.5 * (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])


def front_facing(vertices2d: np.ndarray, faces: np.ndarray, min_area: float = 1e-6) -> np.ndarray:
    """(F,) bool: the triangle faces the camera and is not degenerate."""
    return signed_areas(vertices2d, faces) < -min_area


@dataclass
class Raster:
    """The visible surface of a mesh in one image.

    ids: int32 (H, W) triangle covering each pixel, -1 where none.
    ys, xs: int (P,) the covered pixels; tri: int (P,) their triangles; bary: float32 (P, 3) barycentrics.
    """

    ids: np.ndarray
    ys: np.ndarray
    xs: np.ndarray
    tri: np.ndarray
    bary: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return self.ids >= 0

    def interpolate(self, values: np.ndarray, faces: np.ndarray) -> np.ndarray:
        """Per-vertex values (V, ...) interpolated at the covered pixels: (P, ...)."""
        corner = values[faces[self.tri]]  # (P, 3, ...)
        weights = self.bary.reshape(self.bary.shape + (1,) * (corner.ndim - 2))
        return (corner * weights).sum(axis=1)

    def dense(self, per_pixel: np.ndarray, fill: float = 0.0, dtype=np.float32) -> np.ndarray:
        """Scatter covered-pixel values (P, ...) into an image (H, W, ...)."""
        out = np.full(self.ids.shape + per_pixel.shape[1:], fill, dtype)
        out[self.ys, self.xs] = per_pixel
        return out


def _barycentric_planes(vertices2d: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F, 2, 3): per triangle, the affine functions giving barycentrics b1 and b2 of a pixel (x, y) as
    ``plane[f, k] @ (x, y, 1)`` (b0 = 1 - b1 - b2)."""
    a, b, c = (vertices2d[faces[:, k]].astype(np.float64) for k in range(3))
    e1, e2 = b - a, c - a
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    det = np.where(np.abs(det) < 1e-12, 1e-12, det)
    rows = np.stack([np.stack([e2[:, 1], -e2[:, 0]], -1), np.stack([-e1[:, 1], e1[:, 0]], -1)], 1) / det[:, None, None]
    offset = -np.einsum("fij,fj->fi", rows, a)
    return np.concatenate([rows, offset[..., None]], axis=2)


def _barycentrics(planes: np.ndarray, tri: np.ndarray, xs: np.ndarray,
                  ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Barycentrics (b0, b1, b2), each (P,), of pixels (xs, ys) in triangles ``tri``."""
    flat = [np.ascontiguousarray(planes[:, i, j])[tri] for i in range(2) for j in range(3)]
    b1 = flat[0] * xs + flat[1] * ys + flat[2]
    b2 = flat[3] * xs + flat[4] * ys + flat[5]
    return 1.0 - b1 - b2, b1, b2


def _candidates(tri2d: np.ndarray, keep: np.ndarray, width: int, height: int):
    """Every (triangle, pixel) pair of the kept triangles' pixel bounding boxes, clipped to the image."""
    lo = np.ceil(tri2d.min(axis=1)).astype(np.int64)
    hi = np.floor(tri2d.max(axis=1)).astype(np.int64)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, [width - 1, height - 1])
    span = hi - lo + 1
    count = np.where(keep & (span > 0).all(axis=1), span[:, 0] * span[:, 1], 0)
    tri = np.repeat(np.arange(len(tri2d)), count)
    start = np.repeat(np.cumsum(count) - count, count)
    local = np.arange(len(tri)) - start
    box_w = span[tri, 0]
    return tri, lo[tri, 0] + local % box_w, lo[tri, 1] + local // box_w


def rasterise(vertices2d: np.ndarray, depth: np.ndarray, faces: np.ndarray, size: tuple[int, int],
              cull: bool = True) -> Raster:
    """The nearest triangle and its barycentrics at every pixel of an image of ``size`` = (height, width).

    Vectorised over (triangle, pixel) pairs of the triangles' bounding boxes: an exact inside test per pixel
    centre, then a z-buffer (smallest interpolated depth wins). Back-facing triangles are dropped when ``cull``."""
    height, width = size
    vertices2d = np.asarray(vertices2d, np.float64)
    depth = np.asarray(depth, np.float64)
    faces = np.asarray(faces, np.int64)
    keep = front_facing(vertices2d, faces) if cull else np.abs(signed_areas(vertices2d, faces)) > 1e-6
    planes = _barycentric_planes(vertices2d, faces)
    tri, xs, ys = _candidates(vertices2d[faces], keep, width, height)
    b0, b1, b2 = _barycentrics(planes, tri, xs, ys)
    eps = -1e-7
    inside = np.flatnonzero((b0 >= eps) & (b1 >= eps) & (b2 >= eps))
    tri, xs, ys = tri[inside], xs[inside], ys[inside]
    bary = np.stack([b0[inside], b1[inside], b2[inside]], -1)
    winner = _nearest_per_pixel(ys * width + xs, (bary * depth[faces[tri]]).sum(axis=1), height * width)
    tri, xs, ys = tri[winner], xs[winner], ys[winner]
    ids = np.full((height, width), -1, np.int32)
    ids[ys, xs] = tri
    bary = np.clip(bary[winner], 0.0, 1.0).astype(np.float32)
    return Raster(ids, ys, xs, tri, bary)


def _nearest_per_pixel(pixel: np.ndarray, z: np.ndarray, num_pixels: int) -> np.ndarray:
    """Indices of the nearest candidate of every covered pixel (a z-buffer). Most pixels have one candidate
    (front faces rarely overlap), so only the others are sorted."""
    count = np.bincount(pixel, minlength=num_pixels)
    shared = count[pixel] > 1
    single = np.flatnonzero(~shared)
    multi = np.flatnonzero(shared)
    if len(multi) == 0:
        return single
    order = multi[np.lexsort((z[multi], pixel[multi]))]  # by pixel, nearest first
    first = order[np.r_[True, pixel[order][1:] != pixel[order][:-1]]]
    return np.concatenate([single, first])
