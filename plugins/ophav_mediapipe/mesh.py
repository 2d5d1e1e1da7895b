"""MediaPipe's canonical face mesh in ophav head space, its named vertex groups and the rigid-point weights
used for the pose fit. Pure numpy: the data file ships with the package (see ``data/README.md``)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ophav_core.stages import MeshTopology

MESH_FILE = Path(__file__).resolve().parent / "data" / "canonical_face_mesh.npz"
MESH_TYPE = "mediapipe468"
NUM_VERTICES = 468

# Forehead, nose bridge and temples barely move with expression; they anchor the pose in addition to
# MediaPipe's own Procrustes landmarks.
_EXTRA_RIGID = (10, 151, 9, 8, 168, 6, 197, 195, 109, 338, 67, 297, 108, 337, 69, 299, 104, 333, 21, 251)


@lru_cache(maxsize=1)
def _arrays() -> dict[str, np.ndarray]:
    with np.load(MESH_FILE, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def load_canonical_mesh() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vertices (468, 3) float32 head space in cm, faces (898, 3) int32, uv (468, 2) float32). Copies, so
    callers may modify them."""
    a = _arrays()
    return a["vertices"].copy(), a["faces"].copy(), a["uv"].copy()


# Single landmarks of MediaPipe's mesh that consumers find by name (the segmenter's face frame, the neutral-face
# choice): vertex indices of the canonical mesh.
_LANDMARKS = {"forehead": 10, "chin": 152, "left_cheek": 454, "right_cheek": 234, "upper_lip_inner": 13,
              "lower_lip_inner": 14}


def _semantic() -> dict[str, np.ndarray]:
    prefix = "semantic::"
    groups = {k[len(prefix):]: v.astype(np.int64) for k, v in _arrays().items() if k.startswith(prefix)}
    groups.update({k: np.array([v], np.int64) for k, v in _LANDMARKS.items()})
    return groups


SEMANTIC: dict[str, np.ndarray] = _semantic()
"""Named vertex groups (subject's left = image right): ``left_eye``, ``right_eye``, ``nose``, ``mouth_left``,
``mouth_right`` (what :meth:`Tracking.landmarks5` needs), ``jaw`` (ordered), ``face_oval``, ``lips_outer``,
``lips_inner``, ``left_eye_contour``, ``right_eye_contour`` (ordered closed contours), ``left_brow``,
``right_brow``, ``brows``, ``nose_region``, and the single vertices ``forehead``, ``chin``, ``left_cheek``,
``right_cheek``, ``upper_lip_inner``, ``lower_lip_inner``."""


def symmetry_map(vertices: np.ndarray) -> np.ndarray:
    """(V,) index of each vertex's mirror image (head x negated), by nearest neighbour on a symmetric mesh."""
    mirrored = vertices * np.array([-1.0, 1.0, 1.0], vertices.dtype)
    dist = ((mirrored[:, None, :] - vertices[None, :, :]) ** 2).sum(-1)
    return np.argmin(dist, axis=1).astype(np.int64)


@lru_cache(maxsize=1)
def _topology() -> MeshTopology:
    vertices, faces, uv = load_canonical_mesh()
    # The canonical mesh is exactly symmetric about head x = 0, so the nearest mirror is the mirror vertex.
    return MeshTopology(faces=faces, name=MESH_TYPE, uv=uv, groups=dict(SEMANTIC), symmetry=symmetry_map(vertices),
                        template=vertices)


def topology() -> MeshTopology:
    """The topology every ``mediapipe`` tracking carries: MediaPipe's triangles and UVs, :data:`SEMANTIC`, the
    left/right mirror map and the canonical mesh as the template."""
    cached = _topology()
    return MeshTopology(faces=cached.faces.copy(), name=cached.name, uv=cached.uv.copy(),
                        groups={k: v.copy() for k, v in cached.groups.items()}, symmetry=cached.symmetry.copy(),
                        template=cached.template.copy())


@lru_cache(maxsize=1)
def rigid_weights() -> np.ndarray:
    """(468,) float64 weights for the rigid pose fit, summing to 1.

    MediaPipe's own Procrustes weights, except the two jaw points it includes (136, 365: they drop when the mouth
    opens, which would read as a pitch change), plus forehead and nose-bridge points."""
    a = _arrays()
    vertices = a["vertices"]
    w = a["procrustes_weights"].astype(np.float64).copy()
    w[vertices[:, 1] > 4.0] = 0.0  # below the mouth: the jaw moves
    extra = np.zeros_like(w)
    extra[list(_EXTRA_RIGID)] = 0.02
    w = w + extra
    return w / w.sum()


def rigid_indices() -> np.ndarray:
    """Indices of the vertices with a rigid weight (the point set for PnP)."""
    return np.nonzero(rigid_weights())[0]


def face_width(vertices: np.ndarray) -> float:
    """Width of a face mesh (..., 468, 3) along head x, in its own units (cm for the canonical mesh)."""
    return float(np.ptp(np.asarray(vertices)[..., 0], axis=-1).mean())
