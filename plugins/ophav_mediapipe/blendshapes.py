"""Hand-built named expressions on MediaPipe's canonical face mesh.

Each named expression is a vertex offset field (468, 3) in ophav head space (x towards image right, y down,
z away from the camera), in centimetres for the canonical mesh (face width 15.5 cm), at intensity 1. They are
built from the mesh's semantic groups: a few "handle" vertices get an explicit motion, "anchor" vertices stay
put, and every other vertex follows by inverse-distance interpolation with a Gaussian fall-off, so the fields
are smooth and local. No data and no model is involved, so they are the same for every person (scaled to the
person's face width by the tracker).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ophav_mediapipe.mesh import SEMANTIC, load_canonical_mesh

NAMES = ("smile", "mouth_open", "blink", "brows_up")

# MediaPipe rings around the lips (outer contour first): the lower half of each, below the mouth corners.
_LOWER_LIP_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
_UPPER_LIP_INNER = (191, 80, 81, 82, 13, 312, 311, 310, 415)
_UPPER_LIP_OUTER = (185, 40, 39, 37, 0, 267, 269, 270, 409)
_LOWER_LIP_OUTER = (146, 91, 181, 84, 17, 314, 405, 321, 375)
# Cheek points that rise with a smile (zygomatic region), subject's right then left.
_CHEEKS = ((205, 50, 187, 123, 116), (425, 280, 411, 352, 345))
# Upper face points that never move with the jaw.
_UPPER_FACE = (1, 4, 5, 195, 197, 6, 168, 98, 327, 64, 294, 129, 358, 234, 454, 93, 323, 127, 356)
# Mouth-open pivot in head space, cm. The real jaw rotates about the ear joint while the joint slides forward;
# a single pivot placed lower and further back than the joint gives the net motion seen from the front: the chin
# moves mostly down (about 2.7 cm at intensity 1) and a little back.
_JAW_HINGE = np.array([0.0, 1.5, 7.0])
_JAW_ANGLE_DEG = 11.0


def _idw(vertices: np.ndarray, handles: np.ndarray, motion: np.ndarray, radius: float, power: float = 2.0) -> np.ndarray:
    """Offsets of every vertex interpolated from ``motion`` (k, 3) at ``handles`` (k,): inverse-distance
    weighting (exact at the handles), faded out with distance from the nearest handle (Gaussian, ``radius``)."""
    d = np.linalg.norm(vertices[:, None, :] - vertices[handles][None, :, :], axis=-1)
    w = 1.0 / np.maximum(d, 1e-6) ** power
    exact = d < 1e-6
    w = np.where(exact.any(axis=1, keepdims=True), exact.astype(np.float64), w)
    interpolated = (w @ motion) / w.sum(axis=1, keepdims=True)
    fade = np.exp(-(d.min(axis=1) / radius) ** 2)
    return interpolated * fade[:, None]


def _split_lids(contour: np.ndarray, vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(upper lid, lower lid) vertex arcs of a closed eye contour, each including neither corner."""
    x = vertices[contour, 0]
    a, b = int(np.argmin(x)), int(np.argmax(x))
    lo, hi = min(a, b), max(a, b)
    arc1, arc2 = contour[lo + 1:hi], np.concatenate([contour[hi + 1:], contour[:lo]])
    if vertices[arc1, 1].mean() < vertices[arc2, 1].mean():  # y down: smaller y is higher
        return arc1, arc2
    return arc2, arc1


def _blink(vertices: np.ndarray) -> np.ndarray:
    handles, motion = [], []
    for side in ("left_eye_contour", "right_eye_contour"):
        contour = SEMANTIC[side]
        upper, lower = _split_lids(contour, vertices)
        order = np.argsort(vertices[lower, 0])
        lx = vertices[lower[order], 0]
        # Where the lids meet: 20% of the way up from the lower lid, at the same x.
        for v in upper:
            below = np.array([np.interp(vertices[v, 0], lx, vertices[lower[order], k]) for k in (1, 2)])
            meet_y = below[0] + 0.2 * (vertices[v, 1] - below[0])
            meet_z = below[1] + 0.2 * (vertices[v, 2] - below[1])
            handles.append(v)
            motion.append([0.0, meet_y - vertices[v, 1], meet_z - vertices[v, 2]])
        for v in lower:
            handles.append(v)
            motion.append([0.0, -0.1, 0.0])  # the lower lid rises a millimetre
        corners = np.setdiff1d(contour, np.concatenate([upper, lower]))
        handles += list(corners)
        motion += [[0.0, 0.0, 0.0]] * len(corners)
    for v in SEMANTIC["brows"]:
        handles.append(v)
        motion.append([0.0, 0.0, 0.0])
    return _idw(vertices, np.asarray(handles), np.asarray(motion, np.float64), radius=0.6)


def _rotation_x(angle_deg: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def _mouth_open(vertices: np.ndarray) -> np.ndarray:
    """The jaw rotates down about the hinge; the lower lip, chin and jaw line follow it fully, the upper lip and
    the upper face stay, and the cheeks in between stretch."""
    lower = np.unique(np.concatenate([_LOWER_LIP_INNER[1:-1], _LOWER_LIP_OUTER, SEMANTIC["jaw"]]))
    # Jaw points level with the ears barely move with the hinge; keep only those below the mouth corners.
    corners_y = vertices[SEMANTIC["mouth_left"][0], 1]
    lower = lower[vertices[lower, 1] > corners_y - 0.2]
    above_nose_tip = np.nonzero(vertices[:, 1] < vertices[SEMANTIC["nose"][0], 1])[0]
    anchors = np.unique(np.concatenate([_UPPER_LIP_INNER, _UPPER_LIP_OUTER, _UPPER_FACE, above_nose_tip]))
    handles = np.concatenate([lower, anchors])
    weight_of_handle = np.concatenate([np.ones(len(lower)), np.zeros(len(anchors))])[:, None]
    weight = _idw(vertices, handles, np.repeat(weight_of_handle, 3, axis=1), radius=3.0)[:, 0]
    rotated = (vertices - _JAW_HINGE) @ _rotation_x(_JAW_ANGLE_DEG).T + _JAW_HINGE
    # Pick the rotation sense that moves the chin down (+y).
    chin = SEMANTIC["jaw"][len(SEMANTIC["jaw"]) // 2]
    if rotated[chin, 1] < vertices[chin, 1]:
        rotated = (vertices - _JAW_HINGE) @ _rotation_x(-_JAW_ANGLE_DEG).T + _JAW_HINGE
    return (rotated - vertices) * np.clip(weight, 0.0, 1.0)[:, None]


def _smile(vertices: np.ndarray) -> np.ndarray:
    handles, motion = [], []
    for corner, sign in ((SEMANTIC["mouth_left"][0], 1.0), (SEMANTIC["mouth_right"][0], -1.0)):
        handles.append(corner)
        motion.append([0.7 * sign, -0.85, 0.5])  # out, up, back (the corners pull towards the ears)
    inner_corners = ((308, 1.0), (78, -1.0))
    for corner, sign in inner_corners:
        handles.append(corner)
        motion.append([0.65 * sign, -0.8, 0.45])
    for group, sign in zip(_CHEEKS, (-1.0, 1.0)):
        for v in group:
            handles.append(v)
            motion.append([0.12 * sign, -0.45, -0.15])  # cheeks bunch up and forward
    # The lip centres stay (the mouth widens around them); the upper face stays.
    eye_level = vertices[np.concatenate([SEMANTIC["left_eye"], SEMANTIC["right_eye"]]), 1].mean()
    for v in (0, 13, 14, 17) + _UPPER_FACE[:8] + tuple(np.nonzero(vertices[:, 1] < eye_level)[0]):
        handles.append(v)
        motion.append([0.0, 0.0, 0.0])
    return _idw(vertices, np.asarray(handles), np.asarray(motion, np.float64), radius=1.6)


def _brows_up(vertices: np.ndarray) -> np.ndarray:
    brows = SEMANTIC["brows"]
    forehead = np.nonzero(vertices[:, 1] < vertices[brows, 1].min() - 1.5)[0]
    eyes = np.concatenate([SEMANTIC["left_eye_contour"], SEMANTIC["right_eye_contour"]])
    below_nose = np.nonzero(vertices[:, 1] > vertices[SEMANTIC["nose"][0], 1])[0]
    eyes = np.concatenate([eyes, below_nose])
    handles = np.concatenate([brows, forehead, eyes])
    motion = np.zeros((len(handles), 3))
    motion[: len(brows), 1] = -0.8
    # The forehead skin moves less the higher it is (it folds).
    rise = vertices[forehead, 1] - vertices[forehead, 1].min()
    motion[len(brows):len(brows) + len(forehead), 1] = -0.3 * rise / max(rise.max(), 1e-6)
    return _idw(vertices, handles, motion, radius=1.5)


@lru_cache(maxsize=1)
def _named_cached() -> dict[str, np.ndarray]:
    vertices = load_canonical_mesh()[0].astype(np.float64)
    builders = {"smile": _smile, "mouth_open": _mouth_open, "blink": _blink, "brows_up": _brows_up}
    return {name: builders[name](vertices).astype(np.float32) for name in NAMES}


def named_offsets() -> dict[str, np.ndarray]:
    """``{"smile", "mouth_open", "blink", "brows_up"} -> (468, 3)`` float32 offsets at intensity 1, ophav head
    space, centimetres on MediaPipe's canonical mesh (scale by face width for another face)."""
    return {k: v.copy() for k, v in _named_cached().items()}
