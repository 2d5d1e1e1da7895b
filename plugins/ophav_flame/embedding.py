"""MediaPipe's 468 face-mesh landmarks as points on the FLAME surface (triangle + barycentric coordinates),
derived from the user's own FLAME model, so no second non-redistributable file is needed.

Both MediaPipe's canonical face mesh and FLAME's template are metric average faces, in the same axes once FLAME
is converted to ophav head space (:func:`ophav_flame.model.to_head`). The derivation:

1. start from scale 1 and the two nose tips (the front-most vertex of each) put together;
2. ICP with a similarity transform (Umeyama; scale, rotation, translation): each MediaPipe vertex to its
   closest point on FLAME's head surface (the largest connected component: the eyeballs are left out),
   trimmed to the best 90 % of matches, 40 iterations;
3. each MediaPipe vertex's closest FLAME triangle and barycentric coordinates are the embedding; the distance is
   the residual, reported in mm (on the template).

The result is cached beside the model file (``<model>.mediapipe_embedding.npz``, or in ``~/.cache/ophav/flame``
when the store is read-only), keyed by the model file's size and mtime and the canonical mesh's hash. A MICA
``mediapipe_landmark_embedding.npz`` (``lmk_face_idx``, ``lmk_b_coords``, ``landmark_indices``) can be used
instead (:func:`load_mica`).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ophav_flame.model import FlameModel, connected_components, to_head


@dataclass
class Embedding:
    """landmarks: (L,) MediaPipe vertex indices; triangles: (L,) FLAME triangle of each; bary: (L, 3) barycentric
    weights. scale, rotation, translation: the similarity taking MediaPipe's canonical mesh (cm) to FLAME's head
    space (cm): ``p_flame ~ scale * rotation @ p_mp + translation``. residual_mm: per landmark distance to the
    FLAME surface after alignment (NaN for a MICA file)."""

    landmarks: np.ndarray
    triangles: np.ndarray
    bary: np.ndarray
    scale: float = 1.0
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))
    residual_mm: np.ndarray | None = None
    source: str = "derived"

    def summary(self) -> str:
        r = self.residual_mm
        if r is None or not np.isfinite(r).all():
            return f"{len(self.landmarks)} landmarks from {self.source}"
        return (f"{len(self.landmarks)} landmarks derived from the model: residual on the template mean "
                f"{r.mean():.2f} mm, median {np.median(r):.2f} mm, 95th percentile {np.percentile(r, 95):.2f} mm, "
                f"max {r.max():.2f} mm; MediaPipe->FLAME scale {self.scale:.3f}")

    def vertex_of(self, faces: np.ndarray) -> np.ndarray:
        """(L,) the FLAME vertex nearest each landmark (its triangle's vertex of largest weight)."""
        return faces[self.triangles, np.argmax(self.bary, axis=1)]

    def save(self, path: Path) -> None:
        arrays = {"landmarks": self.landmarks, "triangles": self.triangles, "bary": self.bary,
                  "scale": np.float64(self.scale), "rotation": self.rotation, "translation": self.translation,
                  "residual_mm": self.residual_mm if self.residual_mm is not None else np.full(len(self.landmarks), np.nan),
                  "source": np.str_(self.source)}
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Embedding":
        with np.load(path, allow_pickle=False) as d:
            return cls(d["landmarks"].astype(np.int64), d["triangles"].astype(np.int64), d["bary"].astype(np.float64),
                       float(d["scale"]), d["rotation"], d["translation"], d["residual_mm"], str(d["source"]))


def closest_on_triangles(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closest points of points ``p`` (..., 3) on triangles ``a, b, c`` (..., 3): (points, barycentric (..., 3)).
    (Ericson, Real-Time Collision Detection, 5.1.5, vectorised.)"""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = (ab * ap).sum(-1), (ac * ap).sum(-1)
    bp = p - b
    d3, d4 = (ab * bp).sum(-1), (ac * bp).sum(-1)
    cp = p - c
    d5, d6 = (ab * cp).sum(-1), (ac * cp).sum(-1)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    denom = va + vb + vc
    with np.errstate(divide="ignore", invalid="ignore"):
        v = vb / denom
        w = vc / denom
    bary = np.stack([1 - v - w, v, w], -1)
    eps = 0.0

    def put(mask, weights):
        nonlocal bary
        bary = np.where(mask[..., None], weights, bary)

    # Edge regions (checked from the least to the most specific, later ones win).
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ab = np.clip(d1 / (d1 - d3), 0, 1)
        t_ac = np.clip(d2 / (d2 - d6), 0, 1)
        t_bc = np.clip((d4 - d3) / ((d4 - d3) + (d5 - d6)), 0, 1)
    zero = np.zeros_like(d1)
    put((vc <= eps) & (d1 >= 0) & (d3 <= 0), np.stack([1 - t_ab, t_ab, zero], -1))
    put((vb <= eps) & (d2 >= 0) & (d6 <= 0), np.stack([1 - t_ac, zero, t_ac], -1))
    put((va <= eps) & (d4 - d3 >= 0) & (d5 - d6 >= 0), np.stack([zero, 1 - t_bc, t_bc], -1))
    one = np.ones_like(d1)
    put((d1 <= 0) & (d2 <= 0), np.stack([one, zero, zero], -1))
    put((d3 >= 0) & (d4 <= d3), np.stack([zero, one, zero], -1))
    put((d6 >= 0) & (d5 <= d6), np.stack([zero, zero, one], -1))
    bary = np.nan_to_num(bary, nan=1.0 / 3)
    points = bary[..., 0:1] * a + bary[..., 1:2] * b + bary[..., 2:3] * c
    return points, bary


class Surface:
    """Closest-point queries on a triangle mesh; candidate triangles: the ``k`` whose centroids are nearest."""

    def __init__(self, vertices: np.ndarray, faces: np.ndarray, k: int = 24):
        from scipy.spatial import cKDTree

        self.vertices, self.faces, self.k = vertices, faces, min(k, len(faces))
        self.tree = cKDTree(vertices[faces].mean(axis=1))

    def closest(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(closest points (P, 3), triangle (P,), barycentric (P, 3), distance (P,))."""
        _, tri = self.tree.query(points, k=self.k)
        tri = tri.reshape(len(points), -1)
        corners = self.vertices[self.faces[tri]]  # (P, k, 3, 3)
        q, bary = closest_on_triangles(points[:, None, :], corners[..., 0, :], corners[..., 1, :], corners[..., 2, :])
        dist = np.linalg.norm(q - points[:, None, :], axis=-1)
        best = np.argmin(dist, axis=1)
        r = np.arange(len(points))
        return q[r, best], tri[r, best], bary[r, best], dist[r, best]


def _similarity(src: np.ndarray, dst: np.ndarray, weights: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Weighted Umeyama: (s, R, t) minimising sum w |s R src + t - dst|^2."""
    w = weights / weights.sum()
    mu_s, mu_d = w @ src, w @ dst
    xs, xd = src - mu_s, dst - mu_d
    cov = (xd * w[:, None]).T @ xs
    U, S, Vt = np.linalg.svd(cov)
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
    R = U @ D @ Vt
    var = (w * (xs ** 2).sum(1)).sum()
    s = float(np.trace(np.diag(S) @ D) / var)
    return s, R, mu_d - s * R @ mu_s


def head_component(model: FlameModel) -> np.ndarray:
    """Boolean (F,) mask of the triangles of the largest connected component (the head without eyeballs)."""
    labels = connected_components(model.faces, len(model.v_template))
    face_label = labels[model.faces[:, 0]]
    values, counts = np.unique(face_label, return_counts=True)
    return face_label == values[np.argmax(counts)]


def derive(model: FlameModel, canonical_cm: np.ndarray, iterations: int = 40, trim: float = 0.9) -> Embedding:
    """The embedding of MediaPipe's canonical mesh (468, 3) cm, ophav head space, on ``model`` (see the module
    docstring)."""
    template = to_head(model.v_template)
    faces = model.faces[head_component(model)]
    surface = Surface(template, faces)
    src = np.asarray(canonical_cm, np.float64)
    head_vertices = np.unique(faces)
    nose_flame = template[head_vertices[np.argmin(template[head_vertices, 2])]]
    nose_mp = src[np.argmin(src[:, 2])]
    s, R, t = 1.0, np.eye(3), nose_flame - nose_mp
    for _ in range(iterations):
        moved = s * src @ R.T + t
        target, _, _, dist = surface.closest(moved)
        keep = dist <= np.quantile(dist, trim)
        s_new, R_new, t_new = _similarity(src[keep], target[keep], np.ones(int(keep.sum())))
        change = abs(s_new - s) + np.abs(R_new - R).max() + np.abs(t_new - t).max() / 10
        s, R, t = s_new, R_new, t_new
        if change < 1e-7:
            break
    moved = s * src @ R.T + t
    _, tri, bary, dist = surface.closest(moved)
    # The triangle indices refer to the head sub-list; map them back to the model's triangle numbering.
    full_index = np.nonzero(head_component(model))[0]
    return Embedding(np.arange(len(src)), full_index[tri], bary, s, R, t, dist * 10.0, "derived")


def load_mica(path: str | os.PathLike, model: FlameModel) -> Embedding:
    """MICA's ``mediapipe_landmark_embedding.npz``: ``lmk_face_idx`` (L,), ``lmk_b_coords`` (L, 3),
    ``landmark_indices`` (L,) MediaPipe indices (read without pickle)."""
    with np.load(path, allow_pickle=False) as d:
        tri = d["lmk_face_idx"].astype(np.int64).reshape(-1)
        bary = d["lmk_b_coords"].astype(np.float64).reshape(-1, 3)
        idx = d["landmark_indices"].astype(np.int64).reshape(-1)
    if not (len(tri) == len(bary) == len(idx)) or tri.max() >= len(model.faces) or idx.max() >= 478:
        raise ValueError(f"{path} is not a MediaPipe landmark embedding for this FLAME model")
    return Embedding(idx, tri, bary, source=str(path))


def _key(model_path: Path | None, canonical: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(canonical, np.float32).tobytes())
    if model_path is not None and model_path.is_file():
        st = model_path.stat()
        digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def cached(model: FlameModel, model_path: Path | None, canonical_cm: np.ndarray) -> Embedding:
    """:func:`derive`, cached beside the model (or in ``~/.cache/ophav/flame``)."""
    key = _key(model_path, canonical_cm)
    candidates = []
    if model_path is not None:
        candidates.append(model_path.with_name(f"{model_path.name}.mediapipe_embedding.{key}.npz"))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ophav" / "flame"
    candidates.append(cache / f"mediapipe_embedding.{key}.npz")
    for path in candidates:
        if path.is_file():
            try:
                return Embedding.load(path)
            except (OSError, KeyError, ValueError):
                pass
    embedding = derive(model, canonical_cm)
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            embedding.save(path)
            break
        except OSError:
            continue
    return embedding


def symmetry(template_head: np.ndarray, tolerance_cm: float = 0.2) -> np.ndarray:
    """(V,) mirror vertex of each vertex (head x negated): mutual nearest neighbours within ``tolerance_cm``,
    other vertices their own mirror (so the map is an involution)."""
    from scipy.spatial import cKDTree

    mirrored = template_head * np.array([-1.0, 1.0, 1.0])
    dist, near = cKDTree(template_head).query(mirrored)
    idx = np.arange(len(template_head))
    ok = (near[near] == idx) & (dist <= tolerance_cm)
    return np.where(ok, near, idx).astype(np.int64)
