"""INSTA deformation: a point seen in frame i -> the canonical (neutral) head space.

Everything works in the frame's *unposed* space first: ``x_r = R_i^T (x_cam - t_i)`` removes the rigid head
pose exactly. What is left is the expression, carried by the tracked mesh: the frame's unposed mesh
``U_i = R_i^T (vertices_i - t_i)`` against the neutral ``canonical_vertices`` (same topology).

For a point near the mesh, take its nearest triangle of ``U_i``, the closest point ``q`` on it (barycentric
``b``) and the offset ``x_r - q`` in the triangle's local frame (tangent, bitangent, normal); the canonical
point is the same barycentric point on the canonical triangle plus the same local offset in the canonical
triangle's frame (so the distance from the surface, mostly along the normal, is kept). Far from the mesh
(hair, back of the head for a face-only mesh) the point moves rigidly: the mapping blends to ``x_r`` between
``near`` and ``far`` distances. With zero expression the mapping is the rigid one exactly.

Nearest-triangle search: a voxel grid over the mesh's bounding box (grown by ``far``) lists, per voxel, the
``K`` triangles nearest to its centre, taken over the canonical mesh and the most deformed training meshes;
a point then tests only its voxel's ``K`` candidates exactly. Points outside that box are farther than ``far``
from every mesh and move rigidly. The cost is O(points * K) whatever the mesh size (MediaPipe's 898 or FLAME's
~10k triangles). The grid is built once per training (bounding-sphere bounds via ``cdist`` for all voxel/triangle
pairs, exact distances for a short list) and stored in the checkpoint. It is exact when a voxel's list holds
every triangle within (nearest distance + voxel diagonal) of its centre; otherwise a neighbour of the true
nearest triangle is used (a 10k-triangle head, G=32, K=16: 95% exact; excess distance mean 0.003%, max 0.7% of
the head size).

Backends: ``torch`` (this module, the reference; (N, K)-shaped tensors) and ``triton`` (the fused kernel of
:mod:`ophav_insta.deform_triton`: same logic per point in registers, ~100x fewer memory passes), chosen by
:func:`resolve_deform_backend` (``auto``: triton on CUDA when importable).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

EPS = 1e-12


# ---------------------------------------------------------------------------------------------- geometry


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


def closest_point_on_triangle(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Closest point to ``p`` on triangles ``abc`` (all (..., 3), broadcast) and its barycentric coordinates
    (..., 3). Ericson's region tests (Real-Time Collision Detection, 5.1.5) without branches: each region's
    answer is written in reverse test order so the first matching test wins."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = _dot(ab, ap), _dot(ac, ap)
    bp = p - b
    d3, d4 = _dot(ab, bp), _dot(ac, bp)
    cp = p - c
    d5, d6 = _dot(ab, cp), _dot(ac, cp)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2

    def safe(den: torch.Tensor) -> torch.Tensor:
        return torch.where(den.abs() > EPS, den, torch.full_like(den, EPS))

    # Barycentric (v, w) of b and c; the interior answer first, then each region overrides.
    inv = 1.0 / safe(va + vb + vc)
    v, w = vb * inv, vc * inv
    zero, one = torch.zeros_like(d1), torch.ones_like(d1)
    t_bc = (d4 - d3) / safe((d4 - d3) + (d5 - d6))
    in_bc = (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0)
    v, w = torch.where(in_bc, 1 - t_bc, v), torch.where(in_bc, t_bc, w)
    t_ac = d2 / safe(d2 - d6)
    in_ac = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
    v, w = torch.where(in_ac, zero, v), torch.where(in_ac, t_ac, w)
    in_c = (d6 >= 0) & (d5 <= d6)
    v, w = torch.where(in_c, zero, v), torch.where(in_c, one, w)
    t_ab = d1 / safe(d1 - d3)
    in_ab = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
    v, w = torch.where(in_ab, t_ab, v), torch.where(in_ab, zero, w)
    in_b = (d3 >= 0) & (d4 <= d3)
    v, w = torch.where(in_b, one, v), torch.where(in_b, zero, w)
    in_a = (d1 <= 0) & (d2 <= 0)
    v, w = torch.where(in_a, zero, v), torch.where(in_a, zero, w)
    q = a + v[..., None] * ab + w[..., None] * ac
    bary = torch.stack([1.0 - v - w, v, w], dim=-1)
    return q, bary


def triangle_frames(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) orthonormal frames with rows tangent (a->b), bitangent, normal (right-handed)."""
    e1 = b - a
    n = torch.linalg.cross(e1, c - a, dim=-1)
    t = e1 / e1.norm(dim=-1, keepdim=True).clamp_min(EPS)
    n = n / n.norm(dim=-1, keepdim=True).clamp_min(EPS)
    bt = torch.linalg.cross(n, t, dim=-1)
    return torch.stack([t, bt, n], dim=-2)


def unposed_vertices(vertices_cam: np.ndarray, rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """(N, V, 3) float32 ``R^T (v - t)``: the tracked meshes with the rigid head pose removed."""
    local = vertices_cam.astype(np.float32) - translation[:, None, :].astype(np.float32)
    return np.einsum("nji,nvj->nvi", rotation.astype(np.float32), local).astype(np.float32)


def smoothstep(edge0: float, edge1: float, x: torch.Tensor) -> torch.Tensor:
    t = ((x - edge0) / max(edge1 - edge0, EPS)).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


# ---------------------------------------------------------------------------------------------- candidates


def voxel_centres(grid_min: torch.Tensor, grid_max: torch.Tensor, resolution: int) -> torch.Tensor:
    """(G^3, 3) voxel centres, x fastest (the order of :func:`voxel_index`)."""
    axes = [grid_min[i] + (torch.arange(resolution, device=grid_min.device, dtype=torch.float32) + 0.5)
            * (grid_max[i] - grid_min[i]) / resolution for i in range(3)]
    zz, yy, xx = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    return torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)


def _nearest_of(points: torch.Tensor, tri: torch.Tensor, subset: torch.Tensor | None, k: int,
                chunk_pairs: int) -> torch.Tensor:
    """For points (C, 3): indices of the ``k`` triangles nearest to each (minimum over the meshes of ``tri``
    (M, F, 3, 3)), searched among all triangles or, per point, among ``subset`` (C, S) triangle indices."""
    count = tri.shape[1] if subset is None else subset.shape[1]
    per_chunk = max(1, chunk_pairs // (count * tri.shape[0]))
    out = []
    for start in range(0, points.shape[0], per_chunk):
        p = points[start:start + per_chunk][:, None, None, :]  # (C, 1, 1, 3)
        if subset is None:
            t = tri[None]  # (1, M, F, 3, 3)
        else:
            t = tri[:, subset[start:start + per_chunk]].transpose(0, 1)  # (C, M, S, 3, 3)
        q, _ = closest_point_on_triangle(p, t[..., 0, :], t[..., 1, :], t[..., 2, :])
        d2 = ((p - q) ** 2).sum(-1).amin(dim=1)  # (C, count)
        best = torch.topk(d2, k, dim=1, largest=False).indices
        out.append(best if subset is None else torch.gather(subset[start:start + per_chunk], 1, best))
    return torch.cat(out, dim=0)


def build_candidates(reference_meshes: torch.Tensor, faces: torch.Tensor, grid_min: torch.Tensor,
                     grid_max: torch.Tensor, resolution: int, k: int, keep: int = 64,
                     chunk_pairs: int | None = None) -> torch.Tensor:
    """(G^3, k) int64: per voxel, the ``k`` triangles nearest to the voxel centre over all ``reference_meshes``
    (M, V, 3) (the minimum distance over meshes decides).

    Exact point-triangle distances for all G^3 * F pairs would be slow for a 10k-triangle mesh, so a cheap
    lower bound (distance to the triangle's bounding sphere, via ``cdist``) first keeps ``keep`` triangles per
    voxel; only those get the exact test. A triangle can only be missed if ``keep`` others have a smaller lower
    bound than its exact distance, which near the surface means a much finer mesh than the voxels."""
    if chunk_pairs is None:  # (voxel, triangle, mesh) triples per step: at most ~1 GB of temporaries on a GPU
        chunk_pairs = 1 << (23 if reference_meshes.device.type == "cuda" else 20)
    num_faces = faces.shape[0]
    k, keep = min(k, num_faces), min(max(keep, k), num_faces)
    tri = reference_meshes[:, faces]  # (M, F, 3, 3)
    centroid = tri.mean(dim=2)  # (M, F, 3)
    radius = (tri - centroid[:, :, None]).norm(dim=-1).amax(dim=-1)  # (M, F)
    centres = voxel_centres(grid_min, grid_max, resolution)
    per_chunk = max(1, chunk_pairs // (num_faces * tri.shape[0]))
    subsets = []
    for start in range(0, centres.shape[0], per_chunk):
        c = centres[start:start + per_chunk]
        lower = torch.stack([torch.cdist(c, centroid[m]) - radius[m] for m in range(tri.shape[0])]).amin(dim=0)
        subsets.append(torch.topk(lower, keep, dim=1, largest=False).indices)
    return _nearest_of(centres, tri, torch.cat(subsets), k, chunk_pairs)


def voxel_index(x: torch.Tensor, grid_min: torch.Tensor, grid_max: torch.Tensor, resolution: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat voxel index (x fastest) of points (N, 3), and whether each point lies inside the grid."""
    rel = (x - grid_min) / (grid_max - grid_min)
    inside = ((rel >= 0) & (rel < 1)).all(dim=-1)
    cell = (rel * resolution).floor().long().clamp(0, resolution - 1)
    return cell[:, 0] + resolution * (cell[:, 1] + resolution * cell[:, 2]), inside


def mesh_clearance(points: torch.Tensor, vertices: torch.Tensor, faces: torch.Tensor,
                   vertex_slack: torch.Tensor | None = None, chunk: int = 4096) -> torch.Tensor:
    """(N,) a lower bound of each point's distance to the mesh: over the triangles, the distance to the
    centroid less the triangle's radius (no triangle point is nearer than that). ``vertex_slack`` (V,): how far
    each vertex may move (the bound then holds for every mesh whose vertices moved at most that much)."""
    tri = vertices[faces]
    centroid = tri.mean(dim=1)
    radius = (tri - centroid[:, None]).norm(dim=-1).amax(dim=-1)
    if vertex_slack is not None:  # a triangle's points move at most as far as its vertices
        radius = radius + vertex_slack[faces].amax(dim=-1)
    if points.shape[0] == 0:
        return points.new_zeros(0)
    return torch.cat([(torch.cdist(c, centroid) - radius).amin(dim=1) for c in points.split(chunk)])


# ---------------------------------------------------------------------------------------------- deformer


@dataclass
class MeshDeformer:
    """Maps unposed frame-space points to canonical space (see the module docstring).

    faces (F, 3) int64; canonical (V, 3); canonical_frames (F, 3, 3); grid_min/grid_max (3,) the candidate
    grid box in head space; candidates (G^3, K) int64; near/far: blend distances (head-space units)."""

    faces: torch.Tensor
    canonical: torch.Tensor
    canonical_frames: torch.Tensor
    grid_min: torch.Tensor
    grid_max: torch.Tensor
    resolution: int
    candidates: torch.Tensor
    near: float
    far: float
    compiled: Any = None  # torch.compile'd _deform_near, when enabled
    backend: str = "torch"  # "torch" (reference) or "triton" (fused kernel, deform_triton.py)
    _kernel_inputs: dict[str, Any] | None = None  # int32 / contiguous copies the Triton kernel reads
    _voxel_clearance: torch.Tensor | None = None  # (G^3,) see voxel_clearance()

    def enable_compile(self) -> None:
        """Fuse the many small elementwise kernels of the nearest-triangle test (dynamic point counts); only
        the torch backend needs it (the Triton kernel is one fused kernel already)."""
        if self.backend == "torch":
            self.compiled = torch.compile(self._deform_near, dynamic=True)

    def set_backend(self, name: str) -> str:
        """Select ``auto`` | ``torch`` | ``triton`` (see :func:`resolve_deform_backend`); returns the choice."""
        self.backend = resolve_deform_backend(name, self.canonical.device)
        return self.backend

    def kernel_inputs(self) -> dict[str, Any]:
        """What the Triton kernel reads, built once: int32 faces and candidates, the grid box as a device tensor
        (grid_min, extent: the reference's float32 values, passed without reading them on the host)."""
        if self._kernel_inputs is None or self._kernel_inputs["faces"].device != self.faces.device:
            self._kernel_inputs = {
                "faces": self.faces.to(torch.int32).contiguous(),
                "candidates": self.candidates.to(torch.int32).contiguous(),
                "canonical": self.canonical.float().contiguous(),
                "canonical_frames": self.canonical_frames.float().contiguous(),
                "grid": torch.cat([self.grid_min, self.grid_max - self.grid_min]).float().contiguous(),
            }
        return self._kernel_inputs

    def deform_triton(self, x_r: torch.Tensor, frame: torch.Tensor, meshes: torch.Tensor, with_face: bool = False
                      ) -> tuple[torch.Tensor, ...]:
        """The fused kernel on float32 points (same results as :meth:`_deform_near` up to float rounding);
        ``with_face`` adds the chosen triangle and its distance (for tests)."""
        from ophav_insta.deform_triton import deform_points

        k = self.kernel_inputs()
        return deform_points(x_r.float().contiguous(), frame.contiguous(), meshes.float().contiguous(), k["faces"],
                             k["candidates"], k["canonical"], k["canonical_frames"], k["grid"], self.resolution,
                             self.near, self.far, with_face)

    @classmethod
    def build(cls, canonical: np.ndarray, faces: np.ndarray, reference_meshes: np.ndarray, resolution: int, k: int,
              near: float, far: float, device: str | torch.device) -> "MeshDeformer":
        """``reference_meshes`` (M, V, 3): unposed meshes the candidate lists must serve (the canonical one is
        added); the grid box covers them all, grown by ``far``."""
        canon = torch.as_tensor(canonical, dtype=torch.float32, device=device)
        face_t = torch.as_tensor(faces, dtype=torch.int64, device=device)
        refs = torch.cat([canon[None], torch.as_tensor(reference_meshes, dtype=torch.float32, device=device)], dim=0)
        flat = refs.reshape(-1, 3)
        grid_min, grid_max = flat.amin(0) - far, flat.amax(0) + far
        candidates = build_candidates(refs, face_t, grid_min, grid_max, resolution, k)
        return cls.from_tensors(canon, face_t, grid_min, grid_max, candidates, near, far)

    @classmethod
    def from_tensors(cls, canonical: torch.Tensor, faces: torch.Tensor, grid_min: torch.Tensor, grid_max: torch.Tensor,
                     candidates: torch.Tensor, near: float, far: float) -> "MeshDeformer":
        tri = canonical[faces]
        frames = triangle_frames(tri[:, 0], tri[:, 1], tri[:, 2])
        resolution = round(candidates.shape[0] ** (1 / 3))
        if resolution ** 3 != candidates.shape[0]:
            raise ValueError(f"candidate table has {candidates.shape[0]} rows, not a cube")
        return cls(faces, canonical, frames, grid_min, grid_max, resolution, candidates, float(near), float(far))

    def state(self) -> dict[str, torch.Tensor]:
        return {"grid_min": self.grid_min.cpu(), "grid_max": self.grid_max.cpu(),
                "candidates": self.candidates.to(torch.int32).cpu()}

    @torch.no_grad()
    def deform(self, x_r: torch.Tensor, frame: torch.Tensor, meshes: torch.Tensor, chunk: int = 1 << 18
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_r (N, 3) unposed points, frame (N,) index into ``meshes`` (B, V, 3) unposed frame meshes.

        Returns canonical points (N, 3) and ``closeness`` (N,): 1 on the mesh, 0 beyond ``far`` (rigid)."""
        with torch.autocast(device_type=x_r.device.type, enabled=False):
            return self._deform(x_r.float(), frame, meshes.float(), chunk)

    def voxel_clearance(self) -> torch.Tensor:
        """(G^3,) per candidate-grid voxel, a lower bound of the distance from any point in it to the canonical
        mesh (:func:`mesh_clearance` of its centre less its half diagonal), built once."""
        if self._voxel_clearance is None or self._voxel_clearance.device != self.canonical.device:
            centres = voxel_centres(self.grid_min, self.grid_max, self.resolution)
            half_diagonal = 0.5 * float(((self.grid_max - self.grid_min) / self.resolution).norm())
            bound = mesh_clearance(centres, self.canonical, self.faces)
            self._voxel_clearance = (bound - half_diagonal).clamp_min(0.0)
        return self._voxel_clearance

    def rigid_points(self, x_r: torch.Tensor, frame: torch.Tensor, meshes: torch.Tensor) -> torch.Tensor:
        """(N,) bool: points certainly farther than ``far`` from their frame's mesh, or outside the candidate
        grid, which :meth:`deform` leaves where they are (closeness 0). A frame mesh lies within its largest
        vertex displacement from the canonical one, so the canonical clearance less that displacement bounds
        the distance to it (and to the nearest candidate, which is no nearer)."""
        cell, inside = voxel_index(x_r, self.grid_min, self.grid_max, self.resolution)
        moved = (meshes - self.canonical).norm(dim=-1).amax(dim=-1)  # (B,)
        return ~inside | (self.voxel_clearance()[cell] - moved[frame] > self.far)

    def _deform(self, x_r: torch.Tensor, frame: torch.Tensor, meshes: torch.Tensor, chunk: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # On a GPU every point goes through the candidate test (points outside the grid get closeness 0):
        # compacting the inside points would need a host sync per batch, which costs more there than the spare
        # math. On the CPU there is no sync to lose, and most samples of a head (hair, the box around it) lie
        # beyond ``far`` of the face mesh: only the others are tested (the same result; a preview render spends
        # 2.7x less time deforming, benchmarks/RESULTS.md).
        if self.backend == "triton":  # registers only: no temporaries, so no chunking either
            return self.deform_triton(x_r, frame, meshes)
        if x_r.device.type == "cpu" and self.compiled is None:
            near = (~self.rigid_points(x_r, frame, meshes)).nonzero().squeeze(1)
            canonical = x_r.clone()
            closeness = torch.zeros(x_r.shape[0], device=x_r.device, dtype=x_r.dtype)
            if near.numel():
                moved, weight = self._deform_chunks(x_r[near], frame[near], meshes, chunk)
                canonical[near], closeness[near] = moved, weight
            return canonical, closeness
        return self._deform_chunks(x_r, frame, meshes, chunk)

    def _deform_chunks(self, x_r: torch.Tensor, frame: torch.Tensor, meshes: torch.Tensor, chunk: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        kernel = self.compiled or self._deform_near
        if x_r.shape[0] <= chunk:
            return kernel(x_r, frame, meshes)
        parts = [kernel(x_r[i:i + chunk], frame[i:i + chunk], meshes) for i in range(0, x_r.shape[0], chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def nearest(self, p: torch.Tensor, frame: torch.Tensor, meshes: torch.Tensor) -> "Nearest":
        """Nearest candidate triangle of each point (N, 3) in its frame's unposed mesh."""
        cell, inside = voxel_index(p, self.grid_min, self.grid_max, self.resolution)
        cand = self.candidates[cell]  # (n, K)
        tri = meshes[frame[:, None, None], self.faces[cand]]  # (n, K, 3 vertices, 3)
        q, bary = closest_point_on_triangle(p[:, None], tri[:, :, 0], tri[:, :, 1], tri[:, :, 2])
        d2 = ((p[:, None] - q) ** 2).sum(-1)
        best = d2.argmin(dim=1)
        rows = torch.arange(p.shape[0], device=p.device)
        return Nearest(cand[rows, best], q[rows, best], bary[rows, best], tri[rows, best], d2[rows, best].sqrt(), inside)

    def _deform_near(self, p: torch.Tensor, frame: torch.Tensor, meshes: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        near = self.nearest(p, frame, meshes)
        frame_u = triangle_frames(near.triangle[:, 0], near.triangle[:, 1], near.triangle[:, 2])  # (n, 3, 3)
        local = rotate(frame_u, p - near.point)  # the offset in the frame triangle's axes
        canon_tri = self.canonical[self.faces[near.face]]  # (n, 3, 3)
        q_c = (near.bary[:, :, None] * canon_tri).sum(1)
        x_tri = q_c + rotate(self.canonical_frames[near.face].transpose(1, 2), local)
        closeness = (1.0 - smoothstep(self.near, self.far, near.distance)) * near.inside
        return p + closeness[:, None] * (x_tri - p), closeness


def resolve_deform_backend(name: str, device: torch.device | str) -> str:
    """``auto`` -> ``triton`` on CUDA when triton is importable, else ``torch``. ``triton`` explicitly needs
    CUDA (or ``TRITON_INTERPRET=1``, for tests on the CPU)."""
    import importlib.util
    import os

    cuda = torch.device(device).type == "cuda"
    available = importlib.util.find_spec("triton") is not None
    if name == "auto":
        return "triton" if cuda and available else "torch"
    if name == "triton":
        if not available:
            raise RuntimeError("deformation backend 'triton' needs the triton package")
        if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("deformation backend 'triton' needs CUDA (or TRITON_INTERPRET=1 for testing)")
        return name
    if name != "torch":
        raise ValueError(f"unknown deformation backend {name!r}")
    return name


@dataclass
class Nearest:
    face: torch.Tensor  # (N,) triangle index
    point: torch.Tensor  # (N, 3) closest point on it
    bary: torch.Tensor  # (N, 3) its barycentric coordinates
    triangle: torch.Tensor  # (N, 3, 3) the triangle's vertices
    distance: torch.Tensor  # (N,)
    inside: torch.Tensor  # (N,) bool: inside the candidate grid (else the search is meaningless)


def rotate(matrices: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``matrices @ vectors`` for (..., 3, 3) and (..., 3), elementwise: exact float32 (no TF32) and cheap for
    many tiny matrices."""
    return (matrices * vectors[..., None, :]).sum(-1)


def reference_meshes(unposed: np.ndarray, canonical: np.ndarray, count: int = 3) -> np.ndarray:
    """The ``count`` unposed frame meshes that differ most from the canonical one (largest vertex displacement),
    which the candidate lists must also serve."""
    if len(unposed) == 0 or count == 0:
        return np.zeros((0,) + canonical.shape, np.float32)
    disp = np.linalg.norm(unposed - canonical[None], axis=-1).max(axis=1)
    order = np.argsort(-disp, kind="stable")[:count]
    return unposed[np.sort(order)]
