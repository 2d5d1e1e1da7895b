"""What the warper needs to know about the face mesh's topology, derived once from the tracking's
:class:`~ophav_core.stages.MeshTopology` (its groups, mirror map and template shape).

Pure numpy. The warp expects a face mesh that is one sheet (a disk) spanning the eyes and the mouth, as
MediaPipe's is: the triangles whose three corners all lie on the inner-lip contour are the mouth opening, those
on an eye contour the eye opening. Any tracker whose topology names the groups of :data:`GROUPS` and has a mirror
map drives it, in any vertex order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ophav_core.stages import MeshTopology

# The vertex groups the warp reads from the topology (ordered closed contours; subject's left/right).
GROUPS = ("lips_inner", "face_oval", "right_eye_contour", "left_eye_contour", "right_brow", "left_brow", "nose")


@dataclass(frozen=True)
class MeshParts:
    """Index sets of one face-mesh topology.

    faces: (F, 3) triangles; symmetry: (V,) the left/right mirror vertex of each vertex.
    mouth_faces, eye_faces: (F,) bool, triangles inside the inner-lip / either eye contour.
    lips_inner, face_oval: ordered closed contours; eyes: the two ordered eye contours.
    upper_lid: per eye, the vertices of the upper half of the contour (what a blink moves).
    above_eye_faces: per eye, the triangles touching the upper lid from above; lid_skin_faces: per eye, the
        triangles between the lashes and the brow (the colour of a closed lid).
    mouth_uv: (V, 2) mouth-interior coordinates of the inner-lip vertices (u along the mouth from the subject's
        right corner, v = 0 on the upper lip, 1 on the lower lip), 0 elsewhere.
    side: (F,) +1 for triangles on the subject's left (head x > 0), -1 on the right, 0 on the midline.
    nose_faces: (F,) bool, triangles touching the nose (semantic ``nose_region``, when the mesh has it).
    """

    faces: np.ndarray
    symmetry: np.ndarray
    mouth_faces: np.ndarray
    eye_faces: np.ndarray
    eye_face_owner: np.ndarray
    lips_inner: np.ndarray
    face_oval: np.ndarray
    eyes: tuple[np.ndarray, np.ndarray]
    upper_lid: tuple[np.ndarray, np.ndarray]
    above_eye_faces: tuple[np.ndarray, np.ndarray]
    lid_skin_faces: tuple[np.ndarray, np.ndarray]
    mouth_uv: np.ndarray
    side: np.ndarray
    nose_faces: np.ndarray


def _inside_contour(faces: np.ndarray, contour: np.ndarray) -> np.ndarray:
    members = np.zeros(int(faces.max()) + 1, bool)
    members[contour] = True
    return members[faces].all(axis=1)


def _split_contour(contour: np.ndarray, canonical: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a closed contour at its two extreme-x vertices into (upper, lower) chains, both running from the
    small-x corner to the large-x corner, corners included in both."""
    x = canonical[contour, 0]
    a, b = int(np.argmin(x)), int(np.argmax(x))
    n = len(contour)
    forward = [contour[(a + k) % n] for k in range(((b - a) % n) + 1)]
    backward = [contour[(a - k) % n] for k in range(((a - b) % n) + 1)]
    forward, backward = np.asarray(forward), np.asarray(backward)
    if canonical[forward, 1].mean() <= canonical[backward, 1].mean():  # y points down: smaller y is the upper one
        return forward, backward
    return backward, forward


def _mouth_uv(canonical: np.ndarray, lips_inner: np.ndarray) -> np.ndarray:
    upper, lower = _split_contour(lips_inner, canonical)
    uv = np.zeros((len(canonical), 2), np.float32)
    x0, x1 = canonical[upper[0], 0], canonical[upper[-1], 0]
    for chain, v in ((upper, 0.0), (lower, 1.0)):
        uv[chain, 0] = (canonical[chain, 0] - x0) / max(x1 - x0, 1e-6)
        uv[chain, 1] = v
    uv[[upper[0], upper[-1]], 1] = 0.5
    return uv


def _faces_above(faces: np.ndarray, canonical: np.ndarray, upper_lid: np.ndarray, eye_faces: np.ndarray) -> np.ndarray:
    """Triangles touching the upper lid from above: the lid that a closing eye stretches down."""
    touches = np.isin(faces, upper_lid).any(axis=1) & ~eye_faces
    centre_y = canonical[upper_lid, 1].mean()
    above = canonical[faces].mean(axis=1)[:, 1] < centre_y
    return touches & above


def _lid_skin(faces: np.ndarray, canonical: np.ndarray, contour: np.ndarray, brow: np.ndarray) -> np.ndarray:
    """Triangles of the skin between an eye and its brow (above the lashes, below the brow hair)."""
    centres = canonical[faces].mean(axis=1)
    lid_top = canonical[contour, 1].min()
    brow_y = canonical[brow, 1].mean()
    x0, x1 = canonical[contour, 0].min(), canonical[contour, 0].max()
    return ((centres[:, 1] < lid_top) & (centres[:, 1] > brow_y + 0.35 * (lid_top - brow_y))
            & (centres[:, 0] > x0) & (centres[:, 0] < x1))


def parts_shape(topology: MeshTopology, neutral: np.ndarray) -> np.ndarray:
    """The head-space shape the parts are derived from: the topology's template (the same for every person), or
    else the person's ``neutral`` mesh made exactly symmetric through the mirror map."""
    if topology.template is not None:
        return topology.template.astype(np.float64)
    neutral = np.asarray(neutral, np.float64)
    return 0.5 * (neutral + neutral[topology.symmetry] * np.array([-1.0, 1.0, 1.0]))


def build_parts(topology: MeshTopology, neutral: np.ndarray | None = None) -> MeshParts:
    """MeshParts of a face-sheet mesh from its topology (see :data:`GROUPS`); ``neutral`` (V, 3) is the person's
    neutral mesh, used only where the topology has no template."""
    topology.require(*GROUPS, "symmetry", user="meshwarp")
    if topology.template is None and neutral is None:
        raise ValueError("build_parts: the topology has no template; pass the neutral mesh")
    canonical, faces, semantic = parts_shape(topology, neutral), topology.faces, topology.groups
    lips_inner = np.asarray(semantic["lips_inner"], np.int64)
    face_oval = np.asarray(semantic["face_oval"], np.int64)
    eyes = (np.asarray(semantic["right_eye_contour"], np.int64), np.asarray(semantic["left_eye_contour"], np.int64))
    mouth_faces = _inside_contour(faces, lips_inner)
    owner = np.full(len(faces), -1, np.int64)
    upper_lids, above = [], []
    for k, eye in enumerate(eyes):
        inside = _inside_contour(faces, eye)
        owner[inside] = k
        upper, _ = _split_contour(eye, canonical)
        upper_lids.append(upper)
    eye_faces = owner >= 0
    for upper in upper_lids:
        above.append(_faces_above(faces, canonical, upper, eye_faces))
    brows = (np.asarray(semantic["right_brow"], np.int64), np.asarray(semantic["left_brow"], np.int64))
    skin = tuple(_lid_skin(faces, canonical, eye, brow) for eye, brow in zip(eyes, brows))
    nose = np.isin(faces, np.asarray(semantic.get("nose_region", semantic["nose"]), np.int64)).any(axis=1)
    centre_x = canonical[faces].mean(axis=1)[:, 0]
    tol = 1e-3 * float(np.ptp(canonical[:, 0]))
    side = np.where(centre_x > tol, 1, np.where(centre_x < -tol, -1, 0)).astype(np.int8)
    return MeshParts(faces=np.asarray(faces, np.int64), symmetry=topology.symmetry, mouth_faces=mouth_faces,
                     eye_faces=eye_faces, eye_face_owner=owner, lips_inner=lips_inner, face_oval=face_oval,
                     eyes=eyes, upper_lid=(upper_lids[0], upper_lids[1]), above_eye_faces=(above[0], above[1]),
                     lid_skin_faces=(skin[0], skin[1]),
                     mouth_uv=_mouth_uv(canonical, lips_inner), side=side, nose_faces=nose)


def contour_opening(points2d: np.ndarray, contour: np.ndarray) -> float:
    """Mean height of a closed contour in pixels: its area divided by its width (0 when closed)."""
    p = points2d[contour]
    area = 0.5 * abs(float(np.dot(p[:, 0], np.roll(p[:, 1], -1)) - np.dot(p[:, 1], np.roll(p[:, 0], -1))))
    width = float(np.ptp(p[:, 0])) + 1e-6
    return area / width
