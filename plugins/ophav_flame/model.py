"""The FLAME model as plain numpy arrays: loading (restricted unpickler), structural verification, and the
conversion between FLAME's coordinates and ophav head space.

FLAME (Li et al. 2017, https://flame.is.tue.mpg.de): 5023 vertices, 9976 triangles, 5 joints (global, neck, jaw,
left eye, right eye), ``shapedirs`` (5023, 3, 400) = 300 identity + 100 expression components in FLAME 2020 and
2023, ``posedirs`` (5023, 3, 36) pose correctives over the rotation matrices (minus identity) of joints 1-4,
``J_regressor`` (5, 5023), ``kintree_table`` (2, 5), LBS ``weights`` (5023, 5). Metres; x = the subject's left,
y up, z out of the face.

ophav head space (the tracking contract, as MediaPipe's tracker uses it): x towards image right (the subject's
left), y down, z away from the camera, centimetres. :func:`to_head` is ``(x, -y, -z) * 100``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NUM_VERTICES = 5023
NUM_FACES = 9976
NUM_JOINTS = 5
NUM_SHAPE = 300
# FLAME's kinematic tree: global <- neck <- (jaw, left eye, right eye).
PARENTS = (-1, 0, 1, 1, 1)
HEAD_FROM_FLAME = np.diag([100.0, -100.0, -100.0])  # metres, y up, z out -> cm, y down, z into the screen

REQUIRED = {
    "v_template": (NUM_VERTICES, 3),
    "f": (NUM_FACES, 3),
    "shapedirs": (NUM_VERTICES, 3, None),
    "posedirs": (NUM_VERTICES, 3, 36),
    "J_regressor": (NUM_JOINTS, NUM_VERTICES),
    "kintree_table": (2, NUM_JOINTS),
    "weights": (NUM_VERTICES, NUM_JOINTS),
}


class FlameModelError(ValueError):
    """A file that is not a FLAME model (wrong keys or shapes)."""


@dataclass
class FlameModel:
    v_template: np.ndarray   # (V, 3) float64, metres
    faces: np.ndarray        # (F, 3) int64
    shapedirs: np.ndarray    # (V, 3, S) identity components
    exprdirs: np.ndarray     # (V, 3, E) expression components
    posedirs: np.ndarray     # (V, 3, 36)
    J_regressor: np.ndarray  # (5, V) dense
    parents: tuple[int, ...]
    weights: np.ndarray      # (V, 5)
    source: str = ""

    @property
    def num_shape(self) -> int:
        return int(self.shapedirs.shape[2])

    @property
    def num_expression(self) -> int:
        return int(self.exprdirs.shape[2])


def _shape_ok(actual: tuple, expected: tuple) -> bool:
    return len(actual) == len(expected) and all(e is None or a == e for a, e in zip(actual, expected))


def from_arrays(arrays: dict, source: str = "") -> FlameModel:
    """A :class:`FlameModel` from the dict of a FLAME pickle (or an npz with the same keys); raises
    :class:`FlameModelError` naming every missing key and wrong shape."""
    problems = []
    for key, shape in REQUIRED.items():
        if key not in arrays:
            problems.append(f"no {key!r}")
            continue
        actual = tuple(np.shape(arrays[key]))
        if not _shape_ok(actual, shape):
            want = "x".join("*" if s is None else str(s) for s in shape)
            problems.append(f"{key} is {'x'.join(map(str, actual))}, expected {want}")
    if not problems:
        columns = np.shape(arrays["shapedirs"])[2]
        if columns <= NUM_SHAPE:
            problems.append(f"shapedirs has {columns} components, expected {NUM_SHAPE} identity + expression ones")
        kintree = np.asarray(arrays["kintree_table"]).astype(np.int64)
        parents = tuple(int(p) if i else -1 for i, p in enumerate(kintree[0]))
        if parents != PARENTS or tuple(kintree[1]) != tuple(range(NUM_JOINTS)):
            problems.append(f"kintree_table {kintree.tolist()} is not FLAME's (parents {list(PARENTS)})")
        faces = np.asarray(arrays["f"])
        if faces.size and (faces.min() < 0 or faces.max() >= NUM_VERTICES):
            problems.append("f has vertex indices out of range")
    if problems:
        raise FlameModelError(f"{source or 'the file'} is not a FLAME model: " + "; ".join(problems))
    shapedirs = np.asarray(arrays["shapedirs"], np.float64)
    return FlameModel(
        v_template=np.asarray(arrays["v_template"], np.float64), faces=np.asarray(arrays["f"]).astype(np.int64),
        shapedirs=np.ascontiguousarray(shapedirs[:, :, :NUM_SHAPE]),
        exprdirs=np.ascontiguousarray(shapedirs[:, :, NUM_SHAPE:]),
        posedirs=np.asarray(arrays["posedirs"], np.float64), J_regressor=np.asarray(arrays["J_regressor"], np.float64),
        parents=PARENTS, weights=np.asarray(arrays["weights"], np.float64), source=source)


def load_model(path: str | os.PathLike) -> FlameModel:
    """Read a FLAME ``.pkl`` (restricted unpickler, see :mod:`ophav_flame.unpickle`) or an ``.npz`` with the
    same keys (no pickle) and verify its structure."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    else:
        from ophav_flame.unpickle import load_pickle

        arrays = load_pickle(path)
    return from_arrays(arrays, source=str(path))


def verify_model(path: str | os.PathLike) -> None:
    """The weight store's structural check (``WeightFile.verify``): raises on a file that is not FLAME."""
    load_model(path)


def to_head(points: np.ndarray) -> np.ndarray:
    """FLAME coordinates (metres, y up, z out) -> ophav head space (cm, y down, z in); works for offsets too."""
    return np.asarray(points) @ HEAD_FROM_FLAME.T


def connected_components(faces: np.ndarray, num_vertices: int) -> np.ndarray:
    """(V,) component label of each vertex (union-find over the triangles' edges); unreferenced vertices get
    their own labels."""
    parent = np.arange(num_vertices)

    def find(i: np.ndarray) -> np.ndarray:
        while True:
            nxt = parent[i]
            if np.array_equal(nxt, i):
                return i
            parent[i] = parent[nxt]
            i = parent[i]

    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    for _ in range(64):
        a, b = find(edges[:, 0]), find(edges[:, 1])
        differ = a != b
        if not differ.any():
            break
        lo, hi = np.minimum(a[differ], b[differ]), np.maximum(a[differ], b[differ])
        np.minimum.at(parent, hi, lo)
    return find(np.arange(num_vertices))
