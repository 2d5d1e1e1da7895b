"""One Triton launch that places every Gaussian on a mesh and evaluates its SH colour, for rendering only.

:func:`ophav_gaussians.anchors.place` and :func:`~ophav_gaussians.anchors.sh_colours` are ~130 small PyTorch ops
(triangle frames, the branch-free matrix-to-quaternion, gathers, the SH basis). Their work is a few hundred
flops per Gaussian, so at batch 1 the launches, not the arithmetic, are what a driven avatar waits for; fused,
they are one launch. No backward: training keeps the PyTorch ops (autograd); this path runs when nothing needs a
gradient. The arithmetic is the PyTorch functions', in the same order where it matters (the quaternion candidate
picked by the same first-largest rule), and the tests check the two against each other under
``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ophav_gaussians.anchors import EPS, SH_C0, SH_C1, SH_C2, SH_C3

BLOCK = 128
# Compiled kernels may read module globals only when they are constexpr.
SH_C0_ = tl.constexpr(SH_C0)
SH_C1_ = tl.constexpr(SH_C1)
SH_C2_0, SH_C2_1, SH_C2_2, SH_C2_3, SH_C2_4 = (tl.constexpr(c) for c in SH_C2)
SH_C3_0, SH_C3_1, SH_C3_2, SH_C3_3, SH_C3_4, SH_C3_5, SH_C3_6 = (tl.constexpr(c) for c in SH_C3)


@triton.jit
def _normalise(x, y, z, eps: tl.constexpr):
    inv = 1.0 / tl.maximum(tl.sqrt(x * x + y * y + z * z), eps)
    return x * inv, y * inv, z * inv


@triton.jit
def _place_shade_kernel(vertices_ptr, faces_ptr, parent_ptr, bary_ptr, anchor_ptr, offset_ptr, rotation_ptr,
                        log_scale_ptr, sh_ptr, centres_ptr, means_ptr, quats_ptr, scales_ptr, colours_ptr,
                        num, sh_stride, shell_unit, DEGREE: tl.constexpr, EPS_: tl.constexpr, BLOCK_: tl.constexpr):
    """BLOCK Gaussians seen from camera ``program_id(1)``; camera 0's programs also write the geometry."""
    cam = tl.program_id(1)
    n = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
    m = n < num
    parent = tl.load(parent_ptr + n, mask=m, other=-1)
    on_mesh = parent >= 0
    tri = tl.maximum(parent, 0)
    i0 = tl.load(faces_ptr + tri * 3, mask=m, other=0)
    i1 = tl.load(faces_ptr + tri * 3 + 1, mask=m, other=0)
    i2 = tl.load(faces_ptr + tri * 3 + 2, mask=m, other=0)
    p0x, p0y, p0z = (tl.load(vertices_ptr + i0 * 3, mask=m, other=0.0), tl.load(vertices_ptr + i0 * 3 + 1, mask=m,
                     other=0.0), tl.load(vertices_ptr + i0 * 3 + 2, mask=m, other=0.0))
    p1x, p1y, p1z = (tl.load(vertices_ptr + i1 * 3, mask=m, other=1.0), tl.load(vertices_ptr + i1 * 3 + 1, mask=m,
                     other=0.0), tl.load(vertices_ptr + i1 * 3 + 2, mask=m, other=0.0))
    p2x, p2y, p2z = (tl.load(vertices_ptr + i2 * 3, mask=m, other=0.0), tl.load(vertices_ptr + i2 * 3 + 1, mask=m,
                     other=1.0), tl.load(vertices_ptr + i2 * 3 + 2, mask=m, other=0.0))
    # The triangle's frame: columns a0 (first edge), a1 (normal), a2 = a0 x a1; its size (base and height).
    e1x, e1y, e1z = p1x - p0x, p1y - p0y, p1z - p0z
    e2x, e2y, e2z = p2x - p0x, p2y - p0y, p2z - p0z
    a0x, a0y, a0z = _normalise(e1x, e1y, e1z, EPS_)
    a1x, a1y, a1z = _normalise(a0y * e2z - a0z * e2y, a0z * e2x - a0x * e2z, a0x * e2y - a0y * e2x, EPS_)
    a2x, a2y, a2z = a0y * a1z - a0z * a1y, a0z * a1x - a0x * a1z, a0x * a1y - a0y * a1x
    size = 0.5 * (tl.sqrt(e1x * e1x + e1y * e1y + e1z * e1z) + tl.abs(a2x * e2x + a2y * e2y + a2z * e2z))
    # The frame as a quaternion (matrix_to_quat): the largest of the four denominators, first on ties.
    c0 = 1.0 + a0x + a1y + a2z
    c1 = 1.0 + a0x - a1y - a2z
    c2 = 1.0 - a0x + a1y - a2z
    c3 = 1.0 - a0x - a1y + a2z
    # m[r][c] is column c's component r: m00=a0x m01=a1x m02=a2x, m10=a0y m11=a1y m12=a2y, m20=a0z m21=a1z m22=a2z
    pick1 = (c1 > c0) & (c1 >= c2) & (c1 >= c3)
    pick2 = (c2 > c0) & (c2 > c1) & (c2 >= c3)
    pick3 = (c3 > c0) & (c3 > c1) & (c3 > c2)
    r0 = tl.sqrt(tl.maximum(c0, 1e-12))
    r1 = tl.sqrt(tl.maximum(c1, 1e-12))
    r2 = tl.sqrt(tl.maximum(c2, 1e-12))
    r3 = tl.sqrt(tl.maximum(c3, 1e-12))
    fw, fx, fy, fz = r0 * r0, a1z - a2y, a2x - a0z, a0y - a1x
    div = 2.0 * r0
    fw = tl.where(pick1, a1z - a2y, fw)
    fx = tl.where(pick1, r1 * r1, fx)
    fy = tl.where(pick1, a0y + a1x, fy)
    fz = tl.where(pick1, a2x + a0z, fz)
    div = tl.where(pick1, 2.0 * r1, div)
    fw = tl.where(pick2, a2x - a0z, fw)
    fx = tl.where(pick2, a0y + a1x, fx)
    fy = tl.where(pick2, r2 * r2, fy)
    fz = tl.where(pick2, a1z + a2y, fz)
    div = tl.where(pick2, 2.0 * r2, div)
    fw = tl.where(pick3, a0y - a1x, fw)
    fx = tl.where(pick3, a2x + a0z, fx)
    fy = tl.where(pick3, a1z + a2y, fy)
    fz = tl.where(pick3, r3 * r3, fz)
    div = tl.where(pick3, 2.0 * r3, div)
    fw, fx, fy, fz = fw / div, fx / div, fy / div, fz / div
    inv = 1.0 / tl.maximum(tl.sqrt(fw * fw + fx * fx + fy * fy + fz * fz), EPS_)
    sign = tl.where(fw < 0, -inv, inv)
    fw, fx, fy, fz = fw * sign, fx * sign, fy * sign, fz * sign
    # A shell Gaussian: the head's axes, the shell's unit, its anchor.
    a0x, a0y, a0z = tl.where(on_mesh, a0x, 1.0), tl.where(on_mesh, a0y, 0.0), tl.where(on_mesh, a0z, 0.0)
    a1x, a1y, a1z = tl.where(on_mesh, a1x, 0.0), tl.where(on_mesh, a1y, 1.0), tl.where(on_mesh, a1z, 0.0)
    a2x, a2y, a2z = tl.where(on_mesh, a2x, 0.0), tl.where(on_mesh, a2y, 0.0), tl.where(on_mesh, a2z, 1.0)
    size = tl.where(on_mesh, size, shell_unit)
    fw, fx = tl.where(on_mesh, fw, 1.0), tl.where(on_mesh, fx, 0.0)
    fy, fz = tl.where(on_mesh, fy, 0.0), tl.where(on_mesh, fz, 0.0)
    b0 = tl.load(bary_ptr + n * 3, mask=m, other=0.0)
    b1 = tl.load(bary_ptr + n * 3 + 1, mask=m, other=0.0)
    b2 = tl.load(bary_ptr + n * 3 + 2, mask=m, other=0.0)
    ox = tl.where(on_mesh, b0 * p0x + b1 * p1x + b2 * p2x, tl.load(anchor_ptr + n * 3, mask=m, other=0.0))
    oy = tl.where(on_mesh, b0 * p0y + b1 * p1y + b2 * p2y, tl.load(anchor_ptr + n * 3 + 1, mask=m, other=0.0))
    oz = tl.where(on_mesh, b0 * p0z + b1 * p1z + b2 * p2z, tl.load(anchor_ptr + n * 3 + 2, mask=m, other=0.0))
    d0 = tl.load(offset_ptr + n * 3, mask=m, other=0.0)
    d1 = tl.load(offset_ptr + n * 3 + 1, mask=m, other=0.0)
    d2 = tl.load(offset_ptr + n * 3 + 2, mask=m, other=0.0)
    mx = ox + size * (a0x * d0 + a1x * d1 + a2x * d2)
    my = oy + size * (a0y * d0 + a1y * d1 + a2y * d2)
    mz = oz + size * (a0z * d0 + a1z * d1 + a2z * d2)
    if cam == 0:
        rw = tl.load(rotation_ptr + n * 4, mask=m, other=1.0)
        rx = tl.load(rotation_ptr + n * 4 + 1, mask=m, other=0.0)
        ry = tl.load(rotation_ptr + n * 4 + 2, mask=m, other=0.0)
        rz = tl.load(rotation_ptr + n * 4 + 3, mask=m, other=0.0)
        tl.store(means_ptr + n * 3, mx, mask=m)
        tl.store(means_ptr + n * 3 + 1, my, mask=m)
        tl.store(means_ptr + n * 3 + 2, mz, mask=m)
        tl.store(quats_ptr + n * 4, fw * rw - fx * rx - fy * ry - fz * rz, mask=m)
        tl.store(quats_ptr + n * 4 + 1, fw * rx + fx * rw + fy * rz - fz * ry, mask=m)
        tl.store(quats_ptr + n * 4 + 2, fw * ry - fx * rz + fy * rw + fz * rx, mask=m)
        tl.store(quats_ptr + n * 4 + 3, fw * rz + fx * ry - fy * rx + fz * rw, mask=m)
        for k in tl.static_range(3):
            s = tl.exp(tl.load(log_scale_ptr + n * 3 + k, mask=m, other=0.0))
            tl.store(scales_ptr + n * 3 + k, size * s, mask=m)
    # Colour: SH of the direction from the camera centre, up to DEGREE, plus 0.5, at least 0.
    sh = sh_ptr + n * sh_stride
    out = colours_ptr + (cam * num + n) * 3
    if DEGREE == 0:
        for c in tl.static_range(3):
            value = SH_C0_ * tl.load(sh + c, mask=m, other=0.0) + 0.5
            tl.store(out + c, tl.maximum(value, 0.0), mask=m)
    else:
        cx, cy, cz = tl.load(centres_ptr + cam * 3), tl.load(centres_ptr + cam * 3 + 1), tl.load(
            centres_ptr + cam * 3 + 2)
        x, y, z = _normalise(mx - cx, my - cy, mz - cz, EPS_)
        xx, yy, zz = x * x, y * y, z * z
        for c in tl.static_range(3):
            value = SH_C0_ * tl.load(sh + c, mask=m, other=0.0)
            value += -SH_C1_ * y * tl.load(sh + 3 + c, mask=m, other=0.0)
            value += SH_C1_ * z * tl.load(sh + 6 + c, mask=m, other=0.0)
            value += -SH_C1_ * x * tl.load(sh + 9 + c, mask=m, other=0.0)
            if DEGREE >= 2:
                value += SH_C2_0 * x * y * tl.load(sh + 12 + c, mask=m, other=0.0)
                value += SH_C2_1 * y * z * tl.load(sh + 15 + c, mask=m, other=0.0)
                value += SH_C2_2 * (2.0 * zz - xx - yy) * tl.load(sh + 18 + c, mask=m, other=0.0)
                value += SH_C2_3 * x * z * tl.load(sh + 21 + c, mask=m, other=0.0)
                value += SH_C2_4 * (xx - yy) * tl.load(sh + 24 + c, mask=m, other=0.0)
            if DEGREE >= 3:
                value += SH_C3_0 * y * (3.0 * xx - yy) * tl.load(sh + 27 + c, mask=m, other=0.0)
                value += SH_C3_1 * x * y * z * tl.load(sh + 30 + c, mask=m, other=0.0)
                value += SH_C3_2 * y * (4.0 * zz - xx - yy) * tl.load(sh + 33 + c, mask=m, other=0.0)
                value += SH_C3_3 * z * (2.0 * zz - 3.0 * xx - 3.0 * yy) * tl.load(sh + 36 + c, mask=m, other=0.0)
                value += SH_C3_4 * x * (4.0 * zz - xx - yy) * tl.load(sh + 39 + c, mask=m, other=0.0)
                value += SH_C3_5 * z * (xx - yy) * tl.load(sh + 42 + c, mask=m, other=0.0)
                value += SH_C3_6 * x * (xx - 3.0 * yy) * tl.load(sh + 45 + c, mask=m, other=0.0)
            tl.store(out + c, tl.maximum(value + 0.5, 0.0), mask=m)



def place_and_shade(vertices: torch.Tensor, faces: torch.Tensor, parent: torch.Tensor, bary: torch.Tensor,
                    anchor: torch.Tensor, offset: torch.Tensor, rotation: torch.Tensor, log_scale: torch.Tensor,
                    sh: torch.Tensor, shell_unit: float, camera_centres: torch.Tensor, degree: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(means (N, 3), quats (N, 4), scales (N, 3), colours (B, N, 3)): what ``place`` and ``sh_colours`` return
    for the mesh ``vertices`` (V, 3) seen from ``camera_centres`` (B, 3), in one launch, without gradients."""
    if sh.shape[1] < (degree + 1) ** 2:
        raise ValueError(f"SH degree {degree} needs {(degree + 1) ** 2} coefficients, the Gaussians have "
                         f"{sh.shape[1]}")
    f32 = lambda t: t.detach().to(torch.float32).contiguous()  # noqa: E731
    num, batch = int(parent.shape[0]), int(camera_centres.shape[0])
    device = vertices.device
    means = torch.empty(num, 3, device=device)
    quats = torch.empty(num, 4, device=device)
    scales = torch.empty(num, 3, device=device)
    colours = torch.empty(batch, num, 3, device=device)
    if num and batch:
        sh = f32(sh)
        grid = (triton.cdiv(num, BLOCK), batch)
        _place_shade_kernel[grid](f32(vertices), faces.detach().to(torch.int64).contiguous(),
                                  parent.detach().to(torch.int64).contiguous(), f32(bary), f32(anchor), f32(offset),
                                  f32(rotation), f32(log_scale), sh, f32(camera_centres), means, quats, scales,
                                  colours, num, sh.shape[1] * 3, float(shell_unit), DEGREE=int(degree), EPS_=EPS,
                                  BLOCK_=BLOCK)
    return means, quats, scales, colours
