"""A synthetic model in FLAME's exact public layout, for tests and benchmarks (FLAME itself cannot be shipped).

Topology: a head of 78 rings x 60 columns plus a crown vertex (open at the neck, 60 boundary vertices) and two
eyeballs of 13 x 13 + 2 vertices: 5023 vertices and 9976 triangles, FLAME's counts. Geometry: an ellipsoidal
skull and neck whose front is MediaPipe's canonical face (given by the caller, in ophav head space, cm), placed
with a known scale and offset, so deriving the landmark embedding has something real to find. Identity
components are random smooth fields (random Fourier features, decaying variance), expression components are
random smooth bumps on the face (mouth, eyes, brows weighted), pose correctives are small and local to each
joint's skinning region. Joints: the neck base (global), the top of the neck (neck), between the jaw hinges
(jaw), the eyeball centres (eyes). Everything is exactly left/right symmetric (the mirror map is known).

:func:`write_pickle` writes it as FLAME 2020 does: a Python dict pickled with chumpy ``Ch`` objects (stand-in
classes registered as ``chumpy.ch`` while pickling, so the file names the real chumpy globals) and a
``scipy.sparse.csc_matrix`` ``J_regressor``.
"""
from __future__ import annotations

import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np

RINGS, COLUMNS = 78, 60
EYE_RINGS, EYE_COLUMNS = 13, 13
FACE_SCALE = 1.04            # the canonical face is placed 4 % larger...
FACE_OFFSET = np.array([0.0, 0.012, 0.004])  # ...and shifted (metres, FLAME axes), for the embedding to find


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _head_faces() -> np.ndarray:
    faces = []
    pole = RINGS * COLUMNS
    for j in range(COLUMNS):  # crown fan
        faces.append((pole, j, (j + 1) % COLUMNS))
    for i in range(RINGS - 1):
        for j in range(COLUMNS):
            a, b = i * COLUMNS + j, i * COLUMNS + (j + 1) % COLUMNS
            c, d = a + COLUMNS, b + COLUMNS
            faces.append((a, c, b))
            faces.append((b, c, d))
    return np.array(faces, np.int64)


def _sphere(center: np.ndarray, radius: float, start: int) -> tuple[np.ndarray, np.ndarray]:
    verts = [center + [0, radius, 0]]
    for i in range(EYE_RINGS):
        th = np.pi * (i + 1) / (EYE_RINGS + 1)
        for j in range(EYE_COLUMNS):
            ph = 2 * np.pi * j / EYE_COLUMNS
            verts.append(center + radius * np.array([np.sin(th) * np.sin(ph), np.cos(th), np.sin(th) * np.cos(ph)]))
    verts.append(center - [0, radius, 0])
    faces = []
    ring = lambda i, j: 1 + i * EYE_COLUMNS + j % EYE_COLUMNS  # noqa: E731
    for j in range(EYE_COLUMNS):
        faces.append((0, ring(0, j), ring(0, j + 1)))
    for i in range(EYE_RINGS - 1):
        for j in range(EYE_COLUMNS):
            faces.append((ring(i, j), ring(i + 1, j), ring(i, j + 1)))
            faces.append((ring(i, j + 1), ring(i + 1, j), ring(i + 1, j + 1)))
    bottom = 1 + EYE_RINGS * EYE_COLUMNS
    for j in range(EYE_COLUMNS):
        faces.append((bottom, ring(EYE_RINGS - 1, j + 1), ring(EYE_RINGS - 1, j)))
    return np.array(verts), np.array(faces, np.int64) + start


def mirror_map() -> np.ndarray:
    """(5023,) the exact left/right mirror of each synthetic vertex."""
    m = np.arange(RINGS * COLUMNS + 1)
    i, j = np.divmod(np.arange(RINGS * COLUMNS), COLUMNS)
    m[: RINGS * COLUMNS] = i * COLUMNS + (COLUMNS - j) % COLUMNS
    eye = EYE_RINGS * EYE_COLUMNS + 2
    e = np.arange(eye)
    r, c = np.divmod(e[1:-1] - 1, EYE_COLUMNS)
    e_m = e.copy()
    e_m[1:-1] = 1 + r * EYE_COLUMNS + (EYE_COLUMNS - c) % EYE_COLUMNS
    base = len(m)
    return np.concatenate([m, base + eye + e_m, base + e_m])


def build(face_vertices_cm: np.ndarray, face_oval: np.ndarray, left_eye: np.ndarray, right_eye: np.ndarray,
          mouth: np.ndarray, seed: int = 0, num_expression: int = 100) -> dict[str, np.ndarray]:
    """The synthetic model as the dict of a FLAME pickle (plain arrays; J_regressor dense). Inputs: MediaPipe's
    canonical face (468, 3) in ophav head space (cm) and vertex indices of its face oval, eye contours (subject's
    left/right) and lips."""
    rng = np.random.default_rng(seed)
    face = (np.asarray(face_vertices_cm, np.float64) * np.array([1.0, -1.0, -1.0]) / 100.0) * FACE_SCALE
    nose = face[np.argmax(face[:, 2])]
    face = face - [0.0, nose[1], nose[2]] + FACE_OFFSET + [0.0, 0.0, 0.11]  # nose tip ahead of the skull centre
    oval = face[face_oval]
    center = np.array([0.0, oval[:, 1].mean() + 0.01, oval[:, 2].mean() - 0.055])
    rel = oval - center
    # Ellipsoid through the face oval (semi-axes ax, ay with az fixed), least squares in 1/a^2.
    az = 0.105
    A = np.stack([rel[:, 0] ** 2, rel[:, 1] ** 2], 1)
    inv = np.linalg.lstsq(A, 1.0 - rel[:, 2] ** 2 / az ** 2, rcond=None)[0]
    ax, ay = (1.0 / np.sqrt(np.clip(inv, 1 / 0.2 ** 2, 1 / 0.05 ** 2)))
    # Head rings: crown to throat on the ellipsoid, then the neck.
    skull_rings, theta_max = 62, 2.35
    verts = np.zeros((RINGS, COLUMNS, 3))
    phi = 2 * np.pi * np.arange(COLUMNS) / COLUMNS
    for i in range(skull_rings):
        th = theta_max * (i + 1) / skull_rings
        d = np.stack([np.sin(th) * np.sin(phi), np.full_like(phi, np.cos(th)), np.sin(th) * np.cos(phi)], 1)
        r = 1.0 / np.sqrt((d[:, 0] / ax) ** 2 + (d[:, 1] / ay) ** 2 + (d[:, 2] / az) ** 2)
        verts[i] = center + r[:, None] * d
    last = verts[skull_rings - 1]
    neck_radius, neck_bottom = 0.055, last[:, 1].min() - 0.09
    for k, i in enumerate(range(skull_rings, RINGS)):
        s = (k + 1) / (RINGS - skull_rings)
        target = np.stack([neck_radius * np.sin(phi), np.full_like(phi, neck_bottom),
                           center[2] - 0.01 + neck_radius * np.cos(phi)], 1)
        blend = _smoothstep(np.array(min(1.0, 2 * s)))
        ring = (1 - blend) * last + blend * target
        ring[:, 1] = last[:, 1] + s * (neck_bottom - last[:, 1])
        verts[i] = ring
    head = verts.reshape(-1, 3)
    crown = center + [0.0, ay, 0.0]
    # The face: per head vertex, the canonical face's radius along its direction (interpolated from the nearest
    # face vertices in angle), blended in with the distance from the face oval.
    dirs = head - center
    rad = np.linalg.norm(dirs, axis=1)
    unit = dirs / rad[:, None]
    fdirs = face - center
    frad = np.linalg.norm(fdirs, axis=1)
    funit = fdirs / frad[:, None]
    ang = np.arccos(np.clip(unit @ funit.T, -1, 1))  # (Vh, 468)
    near = np.argsort(ang, axis=1)[:, :4]
    w = 1.0 / (np.take_along_axis(ang, near, 1) + 1e-4)
    face_r = (frad[near] * w).sum(1) / w.sum(1)
    is_oval = np.zeros(len(face), bool)
    is_oval[face_oval] = True
    to_oval = ang[:, face_oval].min(1)
    inside = ~is_oval[near[:, 0]] & (unit[:, 2] > 0)
    blend = np.where(inside, _smoothstep(to_oval / 0.12), 0.0)
    head = center + unit * (rad + blend * (face_r - rad))[:, None]
    head = np.concatenate([head, crown[None]])
    # Exact symmetry: average each vertex with its mirror's reflection.
    m = mirror_map()[: len(head)]
    head = 0.5 * (head + head[m] * [-1, 1, 1])
    # Eyeballs behind the eye contours (subject's left first, as FLAME's vertex order has it).
    eye_c = face[left_eye].mean(0) - [0, 0, 0.011]
    eye_c[0] = abs(eye_c[0])
    left_v, left_f = _sphere(eye_c, 0.0115, len(head))
    right_v, right_f = _sphere(eye_c * [-1, 1, 1], 0.0115, len(head) + len(left_v))
    right_v = left_v[mirror_map()[len(head) + len(left_v):] - len(head)] * [-1, 1, 1]
    v = np.concatenate([head, left_v, right_v])
    f = np.concatenate([_head_faces(), left_f, right_f])
    V = len(v)
    assert V == 5023 and len(f) == 9976, (V, len(f))
    head_n = len(head)
    # Joints.
    J = np.zeros((5, V))
    J[0, RINGS * COLUMNS - COLUMNS: RINGS * COLUMNS] = 1.0 / COLUMNS                        # neck base ring
    J[1, (skull_rings + 4) * COLUMNS: (skull_rings + 5) * COLUMNS] = 1.0 / COLUMNS          # top of the neck
    mouth_y = face[mouth][:, 1].mean()
    hinge = np.array([ax * 0.92, mouth_y + 0.01, center[2] + 0.005])
    for sign in (1, -1):
        idx = np.argsort(np.linalg.norm(v[:head_n] - hinge * [sign, 1, 1], axis=1))[:4]
        J[2, idx] += 1.0 / 8
    J[3, head_n: head_n + len(left_v)] = 1.0 / len(left_v)
    J[4, head_n + len(left_v):] = 1.0 / len(right_v)
    # Skinning weights.
    weights = np.zeros((V, 5))
    ring_of = np.minimum(np.arange(head_n) // COLUMNS, RINGS)
    ring_of[-1] = 0
    w_root = _smoothstep((ring_of - (skull_rings + 3)) / 10.0)
    front = _smoothstep((v[:head_n, 2] - (center[2] + 0.02)) / 0.03)
    below = _smoothstep((mouth_y - 0.002 - v[:head_n, 1]) / 0.012)
    chin_y = face[:, 1].min()
    above_throat = _smoothstep((v[:head_n, 1] - (chin_y - 0.025)) / 0.015)
    w_jaw = front * below * above_throat * (1 - w_root)
    weights[:head_n, 0] = w_root
    weights[:head_n, 2] = w_jaw
    weights[:head_n, 1] = 1 - w_root - w_jaw
    weights[head_n: head_n + len(left_v), 3] = 1.0
    weights[head_n + len(left_v):, 4] = 1.0
    # Identity: random smooth fields, decaying variance.
    def fields(count: int, scale: float, freq: float, decay: float) -> np.ndarray:
        out = np.zeros((V, 3, count))
        for k in range(count):
            omega = rng.normal(0, freq, (6, 3))
            phase = rng.uniform(0, 2 * np.pi, 6)
            amp = rng.normal(0, 1, (6, 3))
            basis = np.sin(v @ omega.T + phase)  # (V, 6)
            field = basis @ amp
            field *= scale * (k + 1) ** -decay / (np.sqrt((field ** 2).mean()) + 1e-12)
            out[:, :, k] = field
        return out

    shapedirs = fields(300, 0.004, 12.0, 0.5)
    # Expression: smooth bumps on the face, centred on random face points (lower face twice as likely).
    exprdirs = np.zeros((V, 3, num_expression))
    prob = np.where(face[:, 1] < face[mouth][:, 1].mean() + 0.02, 2.0, 1.0)
    prob /= prob.sum()
    for k in range(num_expression):
        c = face[rng.choice(len(face), p=prob)]
        width = rng.uniform(0.012, 0.03)
        bump = np.exp(-((v - c) ** 2).sum(1) / (2 * width ** 2))
        direction = rng.normal(0, 1, 3)
        direction /= np.linalg.norm(direction)
        exprdirs[:, :, k] = 0.004 * (k + 1) ** -0.3 * bump[:, None] * direction
    posedirs = np.zeros((V, 3, 36))
    for j in range(1, 5):
        local = weights[:, j] * (1 - weights[:, j]) * 4 if j < 3 else np.zeros(V)
        for q in range(9):
            posedirs[:, :, (j - 1) * 9 + q] = 0.002 * local[:, None] * rng.normal(0, 1, 3)
    kintree = np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.uint32)
    return {"v_template": v, "f": f.astype(np.uint32), "shapedirs": np.concatenate([shapedirs, exprdirs], 2),
            "posedirs": posedirs, "J_regressor": J, "kintree_table": kintree, "weights": weights,
            "J": J @ v, "bs_style": "lbs", "bs_type": "lrotmin"}


def _fake_chumpy() -> tuple[types.ModuleType, type]:
    module = types.ModuleType("chumpy.ch")

    class Ch:  # noqa: D401 - the stand-in pickles as chumpy.ch.Ch with chumpy's state layout
        def __init__(self, x: np.ndarray):
            self.__dict__.update({"x": np.asarray(x, np.float64), "_dirty_vars": set(), "_itr": None,
                                  "_depends_on_deps": {}, "_make_dense": False, "_make_sparse": False})

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    module.Ch = Ch
    return module, Ch


def write_pickle(model: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Write ``model`` (from :func:`build`) in FLAME 2020's layout: chumpy ``Ch`` for v_template, shapedirs,
    posedirs, weights and J; a scipy.sparse csc_matrix J_regressor; uint32 arrays for f and kintree_table."""
    import scipy.sparse as sp

    module, Ch = _fake_chumpy()
    package = types.ModuleType("chumpy")
    package.ch = module
    saved = {k: sys.modules.get(k) for k in ("chumpy", "chumpy.ch")}
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = package, module
    try:
        out = dict(model)
        for key in ("v_template", "shapedirs", "posedirs", "weights", "J"):
            out[key] = Ch(model[key])
        out["J_regressor"] = sp.csc_matrix(model["J_regressor"])
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            pickle.dump(out, handle, protocol=2)
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
    return path


def build_from_topology(topology, seed: int = 0) -> dict[str, np.ndarray]:
    """:func:`build` from MediaPipe's :class:`~ophav_core.stages.MeshTopology` (its template is the canonical
    face; tests pass ``ophav_mediapipe.mesh.topology()``, the tracker never needs this)."""
    g = topology.groups
    return build(topology.template, g["face_oval"], g["left_eye"], g["right_eye"], g["lips_outer"], seed=seed)
