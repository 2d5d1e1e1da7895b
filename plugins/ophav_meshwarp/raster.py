"""Triangle rasterisation and per-triangle affine maps (numpy + OpenCV, no GPU, no renderer).

A face mesh has ~900 small triangles; drawing them far-to-near with ``cv2.fillConvexPoly`` (sub-pixel
precision) is a z-buffer for a mesh without interpenetrations and costs a few milliseconds at 512x512. Every
per-pixel quantity is then one gather of a per-triangle affine function of the pixel position.
"""
from __future__ import annotations

import numpy as np

_SHIFT = 4  # fillConvexPoly's fractional bits: 1/16 pixel precision


def face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F, 3) unnormalised normals (counter-clockwise seen from outside -> outwards)."""
    tri = vertices[faces]
    return np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])


def facing_camera(vertices_cam: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F,) cosine between each triangle's outward normal and the direction to the camera (> 0: front-facing)."""
    normals = face_normals(vertices_cam, faces)
    centres = vertices_cam[faces].mean(axis=1)
    num = -(normals * centres).sum(axis=1)
    den = np.linalg.norm(normals, axis=1) * np.linalg.norm(centres, axis=1) + 1e-12
    return num / den


def rasterise_ids(points2d: np.ndarray, depth: np.ndarray, faces: np.ndarray, size: tuple[int, int],
                  keep: np.ndarray | None = None) -> np.ndarray:
    """(H, W) int32 map of the nearest triangle at each pixel centre (-1: none).

    points2d: (V, 2) pixel positions; depth: (V,) camera z; keep: (F,) bool, triangles to draw (e.g. the
    front-facing ones). Triangles are drawn far to near, so nearer ones overwrite."""
    import cv2

    width, height = size
    ids = np.full((height, width), -1, np.int32)
    index = np.arange(len(faces)) if keep is None else np.nonzero(keep)[0]
    if index.size == 0:
        return ids
    order = index[np.argsort(-depth[faces[index]].mean(axis=1), kind="stable")]
    fixed = np.rint(points2d * (1 << _SHIFT)).astype(np.int32)
    corners = fixed[faces[order]]
    # Skip triangles wholly outside the image (cheap) so huge off-screen coordinates never reach OpenCV.
    lo, hi = corners.min(axis=1), corners.max(axis=1)
    limit = np.array([width, height]) << _SHIFT
    inside = (hi > 0).all(axis=1) & (lo < limit).all(axis=1)
    for tri_id, tri in zip(order[inside].tolist(), corners[inside]):
        cv2.fillConvexPoly(ids, tri, tri_id, cv2.LINE_8, _SHIFT)
    return ids


def barycentric_affines(points2d: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F, 2, 3) affine maps from a pixel (x, y) to the barycentric weights of each triangle's 2nd and 3rd
    corner: ``b = M[:, :2] @ (x, y) + M[:, 2]``. Degenerate triangles map everything to their first corner."""
    p = points2d[faces].astype(np.float64)  # (F, 3, 2)
    e1, e2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    ok = np.abs(det) > 1e-9
    inv_det = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
    lin1 = np.stack([e2[:, 1], -e2[:, 0]], axis=1) * inv_det[:, None]
    lin2 = np.stack([-e1[:, 1], e1[:, 0]], axis=1) * inv_det[:, None]
    linear = np.stack([lin1, lin2], axis=1)  # (F, 2, 2)
    offset = -np.einsum("fkc,fc->fk", linear, p[:, 0])
    return np.concatenate([linear, offset[:, :, None]], axis=2).astype(np.float32)


def interpolate(ids: np.ndarray, bary: np.ndarray, faces: np.ndarray, values: np.ndarray,
                rows: np.ndarray | None = None, cols: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-vertex ``values`` (V, K) interpolated at pixels of the id map (all covered pixels, or ``rows``,
    ``cols``). Barycentric weights are clamped to the triangle, so pixels that the rasteriser's edge rule puts
    just outside a thin triangle never extrapolate. Returns (rows, cols, values (P, K))."""
    if rows is None:
        rows, cols = np.nonzero(ids >= 0)
    tri = ids[rows, cols]
    m = bary[tri]  # (P, 2, 3)
    x = cols.astype(np.float32)[:, None]
    y = rows.astype(np.float32)[:, None]
    b = m[:, :, 0] * x + m[:, :, 1] * y + m[:, :, 2]  # (P, 2)
    b = np.clip(b, 0.0, 1.0)
    total = b.sum(axis=1, keepdims=True)
    b = b / np.maximum(total, 1.0)
    corner = values[faces[tri]].astype(np.float32)  # (P, 3, K)
    out = corner[:, 0] + b[:, :1] * (corner[:, 1] - corner[:, 0]) + b[:, 1:] * (corner[:, 2] - corner[:, 0])
    return rows, cols, out


def signed_areas(points2d: np.ndarray, faces: np.ndarray) -> np.ndarray:
    p = points2d[faces]
    e1, e2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    return 0.5 * (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
