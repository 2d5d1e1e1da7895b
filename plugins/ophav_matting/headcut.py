"""Cut a person matte below the jaw, using the tracked face mesh.

A matting network keeps the whole person; the avatar needs the head only. For every frame the tracked mesh is
projected into the image and the cut follows its jaw:

* the image "down" direction of the head comes from the head rotation (canonical y points down), so a tilted
  or rolled head is cut along its own jaw, not along an image row;
* the jaw is ``Tracking.semantic["jaw"]`` when the tracker names it, else the lower boundary of the convex hull
  of the projected mesh (for a face mesh that boundary is the jaw line);
* across the jaw's width the cut lies ``neck_margin`` face heights below the jaw; to the sides of the face
  (hair, background) it lies that far below the chin, so hair beside the face is kept down to chin level;
* the edge is a linear ramp ``feather`` face heights wide (a soft matte, no staircase).

Only numpy: the function is shared by every segmenter that has a tracking.
"""
from __future__ import annotations

import numpy as np

from ophav_core.errors import InvalidData
from ophav_core.stages.data import Tracking


def head_cut(alpha: np.ndarray, tracking: Tracking, neck_margin: float = 0.08, feather: float = 0.04,
             inplace: bool = False) -> np.ndarray:
    """``alpha`` (N, H, W) float in [0, 1] times a per-frame mask that is 0 below the jaw line (plus
    ``neck_margin``) and 1 above it; ``neck_margin`` and ``feather`` are fractions of the face height.
    The tracking may refer to another image size than ``alpha``: its projections are rescaled."""
    alpha = np.asarray(alpha)
    if alpha.ndim != 3:
        raise InvalidData(f"head_cut: alpha must be (N, H, W), got shape {alpha.shape}")
    if len(tracking) != alpha.shape[0]:
        raise InvalidData(f"head_cut: tracking has {len(tracking)} frames but alpha has {alpha.shape[0]}")
    out = alpha if inplace else alpha.astype(np.float32, copy=True)
    height, width = alpha.shape[1:]
    for i in range(alpha.shape[0]):
        out[i] *= keep_below_jaw(tracking, i, (width, height), neck_margin, feather)
    return out


def keep_below_jaw(tracking: Tracking, index: int, size: tuple[int, int], neck_margin: float = 0.08,
                   feather: float = 0.04) -> np.ndarray:
    """Frame ``index``'s mask (H, W) float32 for an image of ``size`` = (width, height): 1 above the cut line."""
    width, height = size
    uv = _project_to(tracking, tracking.vertices[index], size)
    down = _image_down(tracking, index, size)
    across = np.array([down[1], -down[0]])
    s_all, a_all = uv @ down, uv @ across
    face_height = max(float(np.ptp(s_all)), 1e-6)
    jaw_idx = tracking.semantic.get("jaw")
    a_jaw, s_jaw = (a_all, s_all) if jaw_idx is None else (a_all[jaw_idx], s_all[jaw_idx])
    chain_a, chain_s = lower_envelope(a_jaw, s_jaw)

    xs = np.arange(width, dtype=np.float32)[None, :]
    ys = np.arange(height, dtype=np.float32)[:, None]
    s_px = xs * np.float32(down[0]) + ys * np.float32(down[1])
    a_px = xs * np.float32(across[0]) + ys * np.float32(across[1])
    cut = np.interp(a_px, chain_a, chain_s)
    beside_face = (a_px < chain_a[0]) | (a_px > chain_a[-1])
    cut[beside_face] = chain_s.max()  # beside the face: keep down to chin level
    cut += neck_margin * face_height
    ramp = feather * face_height
    if ramp <= 0:
        return (s_px <= cut).astype(np.float32)
    return np.clip((cut - s_px) / ramp + 0.5, 0.0, 1.0).astype(np.float32)


def lower_envelope(a: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The part of the convex hull of points (a, s) seen from s = +inf (the bottom, with s pointing down),
    as increasing ``a`` with their ``s``: a piecewise linear jaw line for :func:`numpy.interp`."""
    a, s = np.asarray(a, np.float64).ravel(), np.asarray(s, np.float64).ravel()
    if a.size == 0:
        raise InvalidData("head_cut: no jaw points")
    order = np.lexsort((-s, a))  # by a, the lowest point first among equal a
    a, s = a[order], s[order]
    _, first = np.unique(a, return_index=True)
    a, s = a[first], s[first]
    chain: list[int] = []
    for k in range(a.size):
        # Drop the last point unless it lies strictly below (larger s) the segment from its predecessor to k.
        while len(chain) >= 2:
            i, j = chain[-2], chain[-1]
            cross = (a[j] - a[i]) * (s[k] - s[i]) - (s[j] - s[i]) * (a[k] - a[i])
            if cross < 0:
                break
            chain.pop()
        chain.append(k)
    idx = np.asarray(chain)
    return a[idx], s[idx]


def _project_to(tracking: Tracking, points_cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pixels (..., 2) of camera points in an image of ``size`` (the intrinsics refer to tracking.image_size)."""
    uv = tracking.project(np.asarray(points_cam, np.float64))
    sx = size[0] / float(tracking.image_size[0])
    sy = size[1] / float(tracking.image_size[1])
    # Pixel centres sit at integers in both sizes.
    return np.stack([(uv[..., 0] + 0.5) * sx - 0.5, (uv[..., 1] + 0.5) * sy - 0.5], axis=-1)


def _image_down(tracking: Tracking, index: int, size: tuple[int, int]) -> np.ndarray:
    """Unit 2D direction of the head's own "down" (canonical +y) in the image, at the face centre."""
    verts = tracking.vertices[index].astype(np.float64)
    centre = verts.mean(axis=0)
    step = 0.25 * max(float(np.ptp(tracking.canonical_vertices[:, 1])), 1e-6)
    axis_y = tracking.rotation[index][:, 1].astype(np.float64)
    ends = _project_to(tracking, np.stack([centre, centre + step * axis_y]), size)
    down = ends[1] - ends[0]
    norm = float(np.linalg.norm(down))
    if not np.isfinite(norm) or norm < 1e-6:  # looking straight along the head's y axis: use the image down
        return np.array([0.0, 1.0])
    return down / norm
