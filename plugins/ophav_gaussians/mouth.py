"""A mouth pocket for the Gaussians: the inside of the mouth as triangles that follow the lips.

A face mesh such as MediaPipe's closes the mouth with a strip of thin triangles between the upper and the lower
inner lip, in the lips' plane. Gaussians bound to that strip sit in the opening: when a driver opens the mouth
wider than the coarse video did, the strip's triangles stretch and their Gaussians become dark streaks with the
background showing between them (benchmarks/RESULTS.md, tenth session).

The pocket replaces the strip with a fan from every edge of the inner-lip contour to one point behind the
mouth: the centroid of the contour moved back into the head (head space: +z points away from the camera at
rest) by ``depth`` times the mouth's width, both measured on each frame's mesh. The fan is a closed bag behind
the lips: closed, the lips hide it; opened any width, its walls fill the opening at a depth behind the lips,
and its Gaussians stay about as large as the walls are. The extra point is a fixed linear function of the
tracked vertices, so the mesh keeps its meaning; it is appended as vertex ``V`` to every mesh the field places
Gaussians on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BACK = np.array([0.0, 0.0, 1.0])  # head space: +z points away from the camera at rest (into the head)
# The inside of a mouth where the coarse video never showed it: dark red (image RGB in [0, 1]).
INTERIOR_RGB = (0.25, 0.1, 0.1)


@dataclass(frozen=True)
class MouthPocket:
    """faces: the tracker's triangles without the mouth opening, then the pocket's fan (``pocket_faces`` long);
    ``extend`` appends the pocket's back point to meshes of the tracker's ``num_vertices``."""

    faces: np.ndarray
    pocket_faces: int
    loop: np.ndarray
    corners: tuple[int, int]
    depth: float
    num_vertices: int

    def extend(self, vertices):
        """(..., V, 3) numpy or torch -> (..., V + 1, 3): the meshes with the back point appended."""
        a, b = self.corners
        centre = vertices[..., self.loop, :].mean(-2)
        width = (((vertices[..., a, :] - vertices[..., b, :]) ** 2).sum(-1) ** 0.5)[..., None]
        if isinstance(vertices, np.ndarray):
            back = centre + self.depth * width * BACK.astype(vertices.dtype)
            return np.concatenate([vertices, back[..., None, :]], axis=-2)
        import torch

        back = centre + self.depth * width * torch.as_tensor(BACK, dtype=vertices.dtype, device=vertices.device)
        return torch.cat([vertices, back[..., None, :]], dim=-2)

    def interior(self) -> np.ndarray:
        """(F',) bool: the pocket's triangles (the last ``pocket_faces``)."""
        out = np.zeros(len(self.faces), bool)
        out[len(self.faces) - self.pocket_faces:] = True
        return out


def mouth_pocket(faces: np.ndarray, lips_inner: np.ndarray | None, canonical: np.ndarray,
                 depth: float) -> MouthPocket | None:
    """The pocket for a mesh of ``faces`` (F, 3) and neutral shape ``canonical`` (V, 3) whose inner-lip contour
    is ``lips_inner`` (an ordered closed loop of vertex indices, the topology's semantic group of that name), or
    ``None`` where there is none."""
    if lips_inner is None:
        return None
    loop = np.asarray(lips_inner, np.int64)
    # A group carried over from another topology (the flame tracker's: the nearest vertex of each MediaPipe
    # landmark) can name a vertex twice in a row: one fan triangle per distinct edge.
    loop = loop[loop != np.roll(loop, 1)] if len(loop) > 1 else loop
    if len(np.unique(loop)) < 3:
        return None
    faces = np.asarray(faces, np.int64)
    canonical = np.asarray(canonical, np.float64)
    num_vertices = canonical.shape[0]
    on_loop = np.zeros(num_vertices, bool)
    on_loop[loop] = True
    opening = on_loop[faces].all(axis=1)  # triangles with every corner on the contour span the mouth opening
    x = canonical[loop, 0]
    corners = (int(loop[np.argmin(x)]), int(loop[np.argmax(x)]))
    fan = np.stack([loop, np.roll(loop, -1), np.full_like(loop, num_vertices)], axis=1)

    def build(fan: np.ndarray) -> MouthPocket:
        return MouthPocket(np.concatenate([faces[~opening], fan]), len(fan), loop, corners, float(depth),
                           num_vertices)

    # Wind the fan so that its normals face out of the pocket (towards the camera at rest, -z), as the rest of
    # the mesh faces outwards: a Gaussian's offset along its triangle's normal then means the same everywhere.
    pocket = build(fan)
    corners3 = pocket.extend(canonical)[fan]
    normals = np.cross(corners3[:, 1] - corners3[:, 0], corners3[:, 2] - corners3[:, 0])
    return build(fan[:, [1, 0, 2]]) if (normals @ BACK).sum() > 0 else pocket
