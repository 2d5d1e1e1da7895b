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
from every mesh and need no search. The cost is O(points * K) whatever the mesh size (MediaPipe's 898 or
FLAME's ~10k triangles); the grid is built once per training (O(G^3 * F), chunked) and stored in the checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

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


def build_candidates(reference_meshes: torch.Tensor, faces: torch.Tensor, grid_min: torch.Tensor,
                     grid_max: torch.Tensor, resolution: int, k: int, chunk_pairs: int = 1 << 24) -> torch.Tensor:
    """(G^3, k) int64: per voxel, the ``k`` triangles nearest to the voxel centre over all ``reference_meshes``
    (M, V, 3) (the minimum distance over meshes decides)."""
    device = reference_meshes.device
    k = min(k, faces.shape[0])
    axes = [grid_min[i] + (torch.arange(resolution, device=device, dtype=torch.float32) + 0.5)
            * (grid_max[i] - grid_min[i]) / resolution for i in range(3)]
    zz, yy, xx = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    centres = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)  # x fastest, matching voxel_index()
    tri = reference_meshes[:, faces]  # (M, F, 3, 3)
    per_chunk = max(1, chunk_pairs // (faces.shape[0] * reference_meshes.shape[0]))
    out = []
    for start in range(0, centres.shape[0], per_chunk):
        p = centres[start:start + per_chunk][:, None, None, :]  # (C, 1, 1, 3)
        q, _ = closest_point_on_triangle(p, tri[None, :, :, 0], tri[None, :, :, 1], tri[None, :, :, 2])
        d2 = ((p - q) ** 2).sum(-1).amin(dim=1)  # (C, F)
        out.append(torch.topk(d2, k, dim=1, largest=False).indices)
    return torch.cat(out, dim=0)


def voxel_index(x: torch.Tensor, grid_min: torch.Tensor, grid_max: torch.Tensor, resolution: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat voxel index (x fastest) of points (N, 3), and whether each point lies inside the grid."""
    rel = (x - grid_min) / (grid_max - grid_min)
    inside = ((rel >= 0) & (rel < 1)).all(dim=-1)
    cell = (rel * resolution).floor().long().clamp(0, resolution - 1)
    return cell[:, 0] + resolution * (cell[:, 1] + resolution * cell[:, 2]), inside


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

    def _deform(self, x_r: torch.Tensor, frame: torch.Tensor, meshes: torch.Tensor, chunk: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        x_c = x_r.clone()
        closeness = torch.zeros(x_r.shape[0], device=x_r.device, dtype=torch.float32)
        cell, inside = voxel_index(x_r, self.grid_min, self.grid_max, self.resolution)
        todo = inside.nonzero().squeeze(1)
        for start in range(0, todo.numel(), chunk):
            idx = todo[start:start + chunk]
            x_c[idx], closeness[idx] = self._deform_near(x_r[idx], frame[idx], meshes, cell[idx])
        return x_c, closeness

    def _deform_near(self, p: torch.Tensor, frame: torch.Tensor, meshes: torch.Tensor, cell: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        cand = self.candidates[cell]  # (n, K)
        tri_idx = self.faces[cand]  # (n, K, 3)
        tri = meshes[frame[:, None, None], tri_idx]  # (n, K, 3, 3)
        q, bary = closest_point_on_triangle(p[:, None], tri[:, :, 0], tri[:, :, 1], tri[:, :, 2])
        d2 = ((p[:, None] - q) ** 2).sum(-1)
        best = d2.argmin(dim=1)
        rows = torch.arange(p.shape[0], device=p.device)
        face = cand[rows, best]
        q, bary, tri = q[rows, best], bary[rows, best], tri[rows, best]
        dist = d2[rows, best].sqrt()
        frame_u = triangle_frames(tri[:, 0], tri[:, 1], tri[:, 2])  # (n, 3, 3)
        local = (frame_u @ (p - q)[:, :, None])[:, :, 0]  # offset in the frame triangle's axes
        canon_tri = self.canonical[self.faces[face]]  # (n, 3, 3)
        q_c = (bary[:, :, None] * canon_tri).sum(1)
        x_tri = q_c + (self.canonical_frames[face].transpose(1, 2) @ local[:, :, None])[:, :, 0]
        closeness = 1.0 - smoothstep(self.near, self.far, dist)
        return p + closeness[:, None] * (x_tri - p), closeness


def reference_meshes(unposed: np.ndarray, canonical: np.ndarray, count: int = 3) -> np.ndarray:
    """The ``count`` unposed frame meshes that differ most from the canonical one (largest vertex displacement),
    which the candidate lists must also serve."""
    if len(unposed) == 0 or count == 0:
        return np.zeros((0,) + canonical.shape, np.float32)
    disp = np.linalg.norm(unposed - canonical[None], axis=-1).max(axis=1)
    order = np.argsort(-disp, kind="stable")[:count]
    return unposed[np.sort(order)]
