"""Fused Triton kernel of the INSTA deformation (reference: :meth:`ophav_insta.deform.MeshDeformer._deform_near`).

The PyTorch path tests each point's ``K`` candidate triangles on (N, K, ...) tensors: dozens of elementwise
kernels with (N, K, 3, 3) temporaries. Here one program handles ``BLOCK`` points and keeps everything in
registers: voxel lookup -> loop over the voxel's ``K`` candidates (closest point on each triangle, Ericson's
region tests in the same order and float32 as the reference, keeping the first minimum as ``argmin`` does) ->
frames of the best frame-mesh triangle and of its canonical twin -> canonical point and closeness. The meshes
(a few thousand vertices) and the candidate table stay in the L2 cache, so a point costs about ``K * 12``
cached loads and a few hundred flops. No gradient: the deformation runs under ``no_grad``.

Runs under ``TRITON_INTERPRET=1`` on the CPU too (how the tests compare it with the reference without a GPU).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK = 128  # points per program on a GPU (one per thread with 4 warps)
INTERPRETER_BLOCK = 1024  # the CPU interpreter's cost is per operation, not per element: fewer, larger programs
EPS: tl.constexpr = tl.constexpr(1e-12)  # the reference's guard against zero denominators and zero-length edges


@triton.jit
def _safe(den):
    return tl.where(tl.abs(den) > EPS, den, EPS)


@triton.jit
def _closest_vw(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz):
    """Barycentric (v, w) of the closest point to p on triangle abc: the reference's branchless region logic
    (interior first, then each Voronoi region overrides in reverse test order so the first matching wins)."""
    abx, aby, abz = bx - ax, by - ay, bz - az
    acx, acy, acz = cx - ax, cy - ay, cz - az
    apx, apy, apz = px - ax, py - ay, pz - az
    d1 = abx * apx + aby * apy + abz * apz
    d2 = acx * apx + acy * apy + acz * apz
    bpx, bpy, bpz = px - bx, py - by, pz - bz
    d3 = abx * bpx + aby * bpy + abz * bpz
    d4 = acx * bpx + acy * bpy + acz * bpz
    cpx, cpy, cpz = px - cx, py - cy, pz - cz
    d5 = abx * cpx + aby * cpy + abz * cpz
    d6 = acx * cpx + acy * cpy + acz * cpz
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    inv = 1.0 / _safe(va + vb + vc)
    v = vb * inv
    w = vc * inv
    t_bc = (d4 - d3) / _safe((d4 - d3) + (d5 - d6))
    in_bc = (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0)
    v = tl.where(in_bc, 1.0 - t_bc, v)
    w = tl.where(in_bc, t_bc, w)
    t_ac = d2 / _safe(d2 - d6)
    in_ac = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
    v = tl.where(in_ac, 0.0, v)
    w = tl.where(in_ac, t_ac, w)
    in_c = (d6 >= 0) & (d5 <= d6)
    v = tl.where(in_c, 0.0, v)
    w = tl.where(in_c, 1.0, w)
    t_ab = d1 / _safe(d1 - d3)
    in_ab = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
    v = tl.where(in_ab, t_ab, v)
    w = tl.where(in_ab, 0.0, w)
    in_b = (d3 >= 0) & (d4 <= d3)
    v = tl.where(in_b, 1.0, v)
    w = tl.where(in_b, 0.0, w)
    in_a = (d1 <= 0) & (d2 <= 0)
    v = tl.where(in_a, 0.0, v)
    w = tl.where(in_a, 0.0, w)
    return v, w, abx, aby, abz, acx, acy, acz


@triton.jit
def _vertex(ptr, row, mask):
    """x, y, z of vertex rows ``row`` (int64) of a (rows, 3) float32 array."""
    return (tl.load(ptr + row * 3 + 0, mask=mask, other=0.0), tl.load(ptr + row * 3 + 1, mask=mask, other=0.0),
            tl.load(ptr + row * 3 + 2, mask=mask, other=0.0))


@triton.jit
def _cell(p, lo, extent, G):
    """Voxel coordinate along one axis (clamped as the reference does) and whether p is inside the grid."""
    rel = (p - lo) / extent
    cell = tl.minimum(tl.maximum(tl.floor(rel * G), 0.0), G - 1.0).to(tl.int32)
    return cell, (rel >= 0) & (rel < 1)


@triton.jit
def _deform_kernel(p_ptr, frame_ptr, meshes_ptr, faces_ptr, cand_ptr, canon_ptr, cframes_ptr, grid_ptr,
                   out_ptr, close_ptr, face_ptr, dist_ptr, num_points, num_vertices, G, near, span,
                   K: tl.constexpr, WRITE_FACE: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = n < num_points
    px = tl.load(p_ptr + n * 3 + 0, mask=mask, other=0.0)
    py = tl.load(p_ptr + n * 3 + 1, mask=mask, other=0.0)
    pz = tl.load(p_ptr + n * 3 + 2, mask=mask, other=0.0)
    mesh_row = tl.load(frame_ptr + n, mask=mask, other=0).to(tl.int64) * num_vertices
    gx, ix = _cell(px, tl.load(grid_ptr + 0), tl.load(grid_ptr + 3), G)
    gy, iy = _cell(py, tl.load(grid_ptr + 1), tl.load(grid_ptr + 4), G)
    gz, iz = _cell(pz, tl.load(grid_ptr + 2), tl.load(grid_ptr + 5), G)
    inside = ix & iy & iz
    cand_row = (gx + G * (gy + G * gz)).to(tl.int64) * K

    best_d2 = tl.full((BLOCK,), float("inf"), tl.float32)
    best_face = tl.zeros((BLOCK,), tl.int32)
    best_v = tl.zeros((BLOCK,), tl.float32)
    best_w = tl.zeros((BLOCK,), tl.float32)
    for k in range(K):
        face = tl.load(cand_ptr + cand_row + k, mask=mask, other=0)
        f3 = face.to(tl.int64) * 3
        ax, ay, az = _vertex(meshes_ptr, mesh_row + tl.load(faces_ptr + f3 + 0, mask=mask, other=0), mask)
        bx, by, bz = _vertex(meshes_ptr, mesh_row + tl.load(faces_ptr + f3 + 1, mask=mask, other=0), mask)
        cx, cy, cz = _vertex(meshes_ptr, mesh_row + tl.load(faces_ptr + f3 + 2, mask=mask, other=0), mask)
        v, w, abx, aby, abz, acx, acy, acz = _closest_vw(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz)
        dx = px - (ax + v * abx + w * acx)
        dy = py - (ay + v * aby + w * acy)
        dz = pz - (az + v * abz + w * acz)
        d2 = dx * dx + dy * dy + dz * dz
        better = d2 < best_d2  # strict: the first of equal distances wins, as torch.argmin
        best_d2 = tl.where(better, d2, best_d2)
        best_face = tl.where(better, face, best_face)
        best_v = tl.where(better, v, best_v)
        best_w = tl.where(better, w, best_w)

    # The best triangle again (9 cached loads are cheaper than carrying 9 more registers through the loop).
    f3 = best_face.to(tl.int64) * 3
    i0 = tl.load(faces_ptr + f3 + 0, mask=mask, other=0)
    i1 = tl.load(faces_ptr + f3 + 1, mask=mask, other=0)
    i2 = tl.load(faces_ptr + f3 + 2, mask=mask, other=0)
    ax, ay, az = _vertex(meshes_ptr, mesh_row + i0, mask)
    bx, by, bz = _vertex(meshes_ptr, mesh_row + i1, mask)
    cx, cy, cz = _vertex(meshes_ptr, mesh_row + i2, mask)
    e1x, e1y, e1z = bx - ax, by - ay, bz - az
    e2x, e2y, e2z = cx - ax, cy - ay, cz - az
    dx = px - (ax + best_v * e1x + best_w * e2x)
    dy = py - (ay + best_v * e1y + best_w * e2y)
    dz = pz - (az + best_v * e1z + best_w * e2z)
    # Frame of the frame-mesh triangle: tangent along a->b, normal = (b-a) x (c-a), bitangent = n x t.
    nx = e1y * e2z - e1z * e2y
    ny = e1z * e2x - e1x * e2z
    nz = e1x * e2y - e1y * e2x
    t_len = tl.maximum(tl.sqrt(e1x * e1x + e1y * e1y + e1z * e1z), EPS)
    n_len = tl.maximum(tl.sqrt(nx * nx + ny * ny + nz * nz), EPS)
    tx, ty, tz = e1x / t_len, e1y / t_len, e1z / t_len
    nx, ny, nz = nx / n_len, ny / n_len, nz / n_len
    bx_, by_, bz_ = ny * tz - nz * ty, nz * tx - nx * tz, nx * ty - ny * tx
    # The offset from the surface in that frame's axes.
    l0 = tx * dx + ty * dy + tz * dz
    l1 = bx_ * dx + by_ * dy + bz_ * dz
    l2 = nx * dx + ny * dy + nz * dz
    # The same barycentric point on the canonical triangle plus the same offset in its (precomputed) frame.
    b0 = 1.0 - best_v - best_w
    Ax, Ay, Az = _vertex(canon_ptr, i0.to(tl.int64), mask)
    Bx, By, Bz = _vertex(canon_ptr, i1.to(tl.int64), mask)
    Cx, Cy, Cz = _vertex(canon_ptr, i2.to(tl.int64), mask)
    r0x, r0y, r0z = _vertex(cframes_ptr, f3 + 0, mask)  # (F, 3, 3) rows: tangent, bitangent, normal
    r1x, r1y, r1z = _vertex(cframes_ptr, f3 + 1, mask)
    r2x, r2y, r2z = _vertex(cframes_ptr, f3 + 2, mask)
    xt = (b0 * Ax + best_v * Bx + best_w * Cx) + (r0x * l0 + r1x * l1 + r2x * l2)
    yt = (b0 * Ay + best_v * By + best_w * Cy) + (r0y * l0 + r1y * l1 + r2y * l2)
    zt = (b0 * Az + best_v * Bz + best_w * Cz) + (r0z * l0 + r1z * l1 + r2z * l2)

    distance = tl.sqrt(best_d2)
    s = tl.minimum(tl.maximum((distance - near) / span, 0.0), 1.0)
    closeness = tl.where(inside, 1.0 - s * s * (3.0 - 2.0 * s), 0.0)
    tl.store(out_ptr + n * 3 + 0, px + closeness * (xt - px), mask=mask)
    tl.store(out_ptr + n * 3 + 1, py + closeness * (yt - py), mask=mask)
    tl.store(out_ptr + n * 3 + 2, pz + closeness * (zt - pz), mask=mask)
    tl.store(close_ptr + n, closeness, mask=mask)
    if WRITE_FACE:
        tl.store(face_ptr + n, best_face, mask=mask)
        tl.store(dist_ptr + n, distance, mask=mask)


def deform_points(p: torch.Tensor, frame: torch.Tensor, meshes: torch.Tensor, faces: torch.Tensor,
                  candidates: torch.Tensor, canonical: torch.Tensor, canonical_frames: torch.Tensor,
                  grid: torch.Tensor, resolution: int, near: float, far: float, with_face: bool = False
                  ) -> tuple[torch.Tensor, ...]:
    """Canonical points (N, 3) and closeness (N,) of unposed points ``p`` (N, 3) float32 seen in frames
    ``frame`` (N,) of ``meshes`` (B, V, 3); with ``with_face`` also the chosen triangle (N,) int32 and the
    distance to it (N,).

    faces (F, 3) int32, candidates (G^3, K) int32, canonical (V, 3), canonical_frames (F, 3, 3) float32, all
    contiguous; ``grid`` (6,) float32 = grid_min, grid_max - grid_min (device tensors: no host sync)."""
    num = p.shape[0]
    out = torch.empty_like(p)
    closeness = torch.empty(num, device=p.device, dtype=torch.float32)
    face = torch.empty(num if with_face else 1, device=p.device, dtype=torch.int32)
    distance = torch.empty(num if with_face else 1, device=p.device, dtype=torch.float32)
    block = INTERPRETER_BLOCK if os.environ.get("TRITON_INTERPRET") == "1" else BLOCK
    if num:
        _deform_kernel[(triton.cdiv(num, block),)](
            p, frame, meshes, faces, candidates, canonical, canonical_frames, grid, out, closeness, face, distance,
            num, meshes.shape[1], resolution, float(near), max(float(far) - float(near), 1e-12),
            K=candidates.shape[1], WRITE_FACE=with_face, BLOCK=block)
    return (out, closeness, face, distance) if with_face else (out, closeness)
