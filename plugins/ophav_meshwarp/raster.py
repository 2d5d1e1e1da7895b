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


def triangle_affines(points2d: np.ndarray, values: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F, K, 3) affine maps ``value = M[:, :2] @ (x, y) + M[:, 2]`` that interpolate per-vertex ``values``
    (V, K) linearly over each triangle of ``points2d`` (V, 2). Degenerate triangles get their mean value."""
    p = points2d[faces].astype(np.float64)  # (F, 3, 2)
    v = values[faces].astype(np.float64)  # (F, 3, K)
    e1, e2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    ok = np.abs(det) > 1e-9
    inv_det = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
    # Barycentric weights of the 2nd and 3rd corner as affine functions of (x, y).
    b1 = np.stack([e2[:, 1], -e2[:, 0]], axis=1) * inv_det[:, None]
    b2 = np.stack([-e1[:, 1], e1[:, 0]], axis=1) * inv_det[:, None]
    dv1, dv2 = v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]  # (F, K)
    linear = dv1[:, :, None] * b1[:, None, :] + dv2[:, :, None] * b2[:, None, :]  # (F, K, 2)
    offset = v[:, 0] - np.einsum("fkc,fc->fk", linear, p[:, 0])
    mean = v.mean(axis=1)
    offset = np.where(ok[:, None], offset, mean)
    return np.concatenate([linear, offset[:, :, None]], axis=2).astype(np.float32)


def evaluate_affines(ids: np.ndarray, affines: np.ndarray, rows: np.ndarray | None = None,
                     cols: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evaluate each pixel's triangle's affine map.

    Returns (rows, cols, values (P, K)) for the covered pixels (or for the given ``rows``/``cols``)."""
    if rows is None:
        rows, cols = np.nonzero(ids >= 0)
    tri = ids[rows, cols]
    m = affines[tri]  # (P, K, 3)
    x = cols.astype(np.float32)
    y = rows.astype(np.float32)
    values = m[:, :, 0] * x[:, None] + m[:, :, 1] * y[:, None] + m[:, :, 2]
    return rows, cols, values


def signed_areas(points2d: np.ndarray, faces: np.ndarray) -> np.ndarray:
    p = points2d[faces]
    e1, e2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    return 0.5 * (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
