"""Dense correspondence from a render to the portrait through the mesh both are tracked with.

A render pixel on triangle f with barycentrics b shows the surface point that appears in the portrait at
``sum_k b_k * portrait_vertices2d[faces[f, k]]``. That point carries information only where the portrait sees
it: the triangle faces the portrait's camera and nothing nearer covers it there. How much detail it carries
depends on foreshortening, measured by the triangle's portrait/render area ratio.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ophav_core.media.raster import Raster, front_facing, rasterise, signed_areas

_DEPTH_TOLERANCE = 0.02  # of the portrait mesh's depth range: nearer surfaces than this occlude


@dataclass
class PortraitReference:
    """What every render of a batch reuses about the portrait.

    pyramid: float32 portrait images, level k downsampled by 2^k with a Gaussian (anti-aliased) filter, so a
        render that shows the face smaller than the portrait samples a level without aliasing.
    raster: the portrait's visible surface; depth: float32 (H, W) its z-buffer (inf where no mesh).
    front: (F,) triangles facing the portrait's camera; area: (F,) their pixel areas in the portrait.
    """

    pyramid: list[np.ndarray]
    raster: Raster
    depth: np.ndarray
    vertices2d: np.ndarray
    vertex_depth: np.ndarray
    faces: np.ndarray
    front: np.ndarray
    area: np.ndarray
    depth_tolerance: float

    @classmethod
    def build(cls, image: np.ndarray, vertices2d: np.ndarray, vertex_depth: np.ndarray, faces: np.ndarray,
              max_level: int = 4) -> "PortraitReference":
        import cv2

        faces = np.asarray(faces, np.int64)
        vertices2d = np.asarray(vertices2d, np.float64)
        vertex_depth = np.asarray(vertex_depth, np.float64)
        pyramid = [np.asarray(image, np.float32)]
        while len(pyramid) <= max_level and min(pyramid[-1].shape[:2]) >= 64:
            pyramid.append(cv2.pyrDown(pyramid[-1]))
        raster = rasterise(vertices2d, vertex_depth, faces, image.shape[:2])
        depth = raster.dense(raster.interpolate(vertex_depth), fill=np.inf)
        span = float(np.ptp(vertex_depth)) if vertex_depth.size else 0.0
        return cls(pyramid, raster, depth, vertices2d, vertex_depth, faces, front_facing(vertices2d, faces),
                   np.abs(signed_areas(vertices2d, faces)), max(span * _DEPTH_TOLERANCE, 1e-6))


@dataclass
class Correspondence:
    """Where each covered render pixel comes from in the portrait.

    raster: the render's visible surface (pixels ys, xs on triangles tri).
    portrait_xy: float32 (P, 2) the same surface points in full-resolution portrait pixels.
    visible: bool (P,) the portrait sees the point.
    foreshortening: float32 (P,) the triangle's portrait/render area ratio over its median on the visible face
        (about cos in the portrait over cos in the render; 1 = as well resolved as the rest of the face).
    scale: portrait pixels per render pixel (median, linear), to pick the portrait's pyramid level.
    """

    raster: Raster
    portrait_xy: np.ndarray
    visible: np.ndarray
    foreshortening: np.ndarray
    scale: float


def correspond(reference: PortraitReference, vertices2d: np.ndarray, vertex_depth: np.ndarray,
               size: tuple[int, int]) -> Correspondence:
    """The correspondence of a render of ``size`` = (height, width) whose mesh projects to ``vertices2d``."""
    faces = reference.faces
    raster = rasterise(vertices2d, vertex_depth, faces, size)
    xyz = raster.interpolate(np.column_stack([reference.vertices2d, reference.vertex_depth]))
    xy, z = xyz[:, :2], xyz[:, 2]
    visible = reference.front[raster.tri] & _unoccluded(reference, raster.tri, xy, z)
    ratio = reference.area / np.maximum(np.abs(signed_areas(vertices2d, faces)), 1e-9)  # per triangle
    typical = max(_weighted_median(ratio, np.bincount(raster.tri[visible], minlength=len(faces))), 1e-9)
    return Correspondence(raster, xy, visible, (ratio[raster.tri] / typical).astype(np.float32),
                          float(np.sqrt(typical)))


def _weighted_median(values: np.ndarray, counts: np.ndarray) -> float:
    """Median of ``values`` repeated ``counts`` times (the per-pixel median, computed per triangle)."""
    if counts.sum() == 0:
        return 1.0
    order = np.argsort(values)
    cumulative = np.cumsum(counts[order])
    return float(values[order][np.searchsorted(cumulative, cumulative[-1] / 2.0)])


def _unoccluded(reference: PortraitReference, tri: np.ndarray, xy: np.ndarray, z: np.ndarray) -> np.ndarray:
    """True where the portrait shows the point itself: the same triangle covers its pixel there, or the surface
    there is no nearer than the point (a neighbouring triangle of the same surface)."""
    height, width = reference.depth.shape
    u = np.rint(xy[:, 0]).astype(np.int64)
    v = np.rint(xy[:, 1]).astype(np.int64)
    inside = (u >= 0) & (u < width) & (v >= 0) & (v < height)
    u, v = np.clip(u, 0, width - 1), np.clip(v, 0, height - 1)
    same = reference.raster.ids[v, u] == tri
    behind = reference.depth[v, u] >= z - reference.depth_tolerance
    return inside & (same | behind)
