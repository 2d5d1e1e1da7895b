"""The head around the face: control points for the warp of hair, ears and neck.

A head is roughly an ellipsoid about the point it turns about; its outline (the head matte's edge) hardly
changes when it turns, while what lies on it slides along. Along a ray from the face's centre through each
face-oval vertex, points between the face's edge and the head's outline are lifted onto that ellipsoid (their
depth falls smoothly from the face's edge to the head's centre plane at the outline) and turn rigidly with the
head; the outline points themselves keep their place and only follow the in-plane rotation (roll). Points
below the chin follow less (the neck moves less than the head), points near the image border not at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class HeadShell:
    """points: (R * O, 3) head space, ring-major (ring r holds one point per face-oval vertex); points2d: their
    pixels in the portrait; follow: (R * O,) how much each follows the head (1 = fully); outline: (R * O,) bool,
    points on the head's outline (roll only); rings: R."""

    points: np.ndarray
    points2d: np.ndarray
    follow: np.ndarray
    outline: np.ndarray
    rings: int


def outline_distances(origins: np.ndarray, directions: np.ndarray, head_alpha: np.ndarray | None,
                      fallback: np.ndarray, least: float) -> np.ndarray:
    """(O,) distance in pixels from each origin along its direction to the head matte's edge (alpha < 0.5) or
    to the image border, whichever comes first; ``fallback`` where there is no matte."""
    if head_alpha is None:
        return np.maximum(fallback, least)
    size = head_alpha.shape[0]
    steps = np.arange(0.0, float(size), 1.0)
    probe = origins[:, None, :] + steps[None, :, None] * directions[:, None, :]
    col = np.rint(probe[..., 0]).astype(int)
    row = np.rint(probe[..., 1]).astype(int)
    inside_image = (col >= 0) & (col < size) & (row >= 0) & (row < size)
    alpha = np.where(inside_image, head_alpha[np.clip(row, 0, size - 1), np.clip(col, 0, size - 1)], 0.0)
    leaves = (alpha < 0.5) & (steps[None, :] > 0)
    first = np.where(leaves.any(axis=1), leaves.argmax(axis=1), len(steps) - 1)
    distance = steps[first]
    # Leaving through the image border: stop short of it, where the still border points take over.
    at_border = ~inside_image[np.arange(len(first)), first]
    distance = np.where(at_border, np.maximum(distance - 0.04 * size, 0.0), distance)
    return np.maximum(distance, least)


def lift_to_depth(pixels: np.ndarray, head_z: np.ndarray, K: np.ndarray, rotation: np.ndarray,
                  translation: np.ndarray) -> np.ndarray:
    """Head-space points (P, 3) that project to ``pixels`` (P, 2) and have head-space depth ``head_z`` (P,)."""
    rays = np.stack([(pixels[:, 0] - K[0, 2]) / K[0, 0], (pixels[:, 1] - K[1, 2]) / K[1, 1],
                     np.ones(len(pixels))], axis=1)
    axis_z = rotation[:, 2]  # head z in camera space
    scale = (head_z + axis_z @ translation) / np.where(np.abs(rays @ axis_z) > 1e-9, rays @ axis_z, 1e-9)
    camera = rays * scale[:, None]
    return (camera - translation) @ rotation


def build_shell(local: np.ndarray, points2d: np.ndarray, face_oval: np.ndarray, pivot: np.ndarray,
                face_width_px: float, K: np.ndarray, rotation: np.ndarray,
                translation: np.ndarray, head_alpha: np.ndarray | None, neck_follow: float, size: int,
                rings: tuple[tuple[float, float], ...] = ((0.15, 0.0), (0.45, 0.4), (0.75, 0.75))) -> HeadShell:
    """The head shell of a tracked portrait (see the module docstring).

    rings: (way out from the face's edge to the outline, way down from the face's depth to the centre plane)
    per ring inside the outline. The first ring is still face (the mesh stops short of the face's edge): it
    turns with the face and hides behind the far cheek, so no band of skin shows beyond a turned face."""
    centre = points2d.mean(axis=0)
    origins = points2d[face_oval]
    directions = origins - centre
    reach = np.linalg.norm(directions, axis=1)
    directions = directions / (reach[:, None] + 1e-9)
    distance = outline_distances(origins, directions, head_alpha, 0.6 * reach, 0.06 * face_width_px)
    # Depth: the face's edge lies at q0 of the way out on an ellipsoid whose front is the nose tip, the
    # outline at q = 1 (the centre plane through the pivot).
    depth_radius = max(float(pivot[2] - local[:, 2].min()), 1e-6)
    oval_z = local[face_oval, 2]
    q0 = np.sqrt(np.clip(1.0 - ((pivot[2] - oval_z) / depth_radius) ** 2, 0.0, 1.0))
    down = directions[:, 1]  # +1 straight down in the image
    below = np.clip((down - 0.3) / 0.6, 0.0, 1.0)
    below = below * below * (3 - 2 * below)
    neck = (1 - below) + neck_follow * below
    points, pixels, follow, outline = [], [], [], []
    for f, g in tuple(rings) + ((1.0, 1.0),):
        pix = origins + (f * distance)[:, None] * directions
        q = q0 + g * (1.0 - q0)
        head_z = pivot[2] - depth_radius * np.sqrt(np.clip(1.0 - q * q, 0.0, 1.0))
        points.append(lift_to_depth(pix, head_z, K, rotation, translation))
        pixels.append(pix)
        margin = np.minimum(pix.min(axis=1), (size - 1 - pix).min(axis=1))
        follow.append(neck * np.clip(margin / (0.05 * size), 0.0, 1.0) ** 2)
        outline.append(np.full(len(face_oval), f >= 1.0))
    return HeadShell(np.concatenate(points), np.concatenate(pixels), np.concatenate(follow).astype(np.float32),
                     np.concatenate(outline), len(rings) + 1)
