"""Triton tile rasteriser: forward and backward compositing kernels behind one ``torch.autograd.Function``.

Layout. The projection and the binning stay in PyTorch (:mod:`.projection`, per Gaussian, cheap); the binning
produces, for every (camera, 16x16 tile), a depth-sorted range of Gaussian ids. One program handles one tile
of one camera (grid = (tiles per image, cameras), so a batch of cameras is one launch) with one lane per pixel
(256 lanes) and walks the tile's list ``CHUNK`` Gaussians at a time: it evaluates a (pixels, CHUNK) block of
alphas, gets the transmittance in front of each Gaussian from a cumulative product along the chunk, masks
what the stopping rule excludes (a suffix, because transmittance only decreases) and reduces the weighted
features over the chunk. The loop ends at the end of the list or when every pixel of the tile has stopped.

Forward writes the composited features (colour and depth channels), the final transmittance and, per pixel,
one past the list position of the last Gaussian it composited. The backward walks the same list front to
back again up to that position, recomputing the same alphas and transmittances (so the set of Gaussians
that contribute is exactly the forward's), and gets the colour behind each Gaussian, which dL/dalpha needs,
as the saved final colour minus the running prefix. 3DGS walks back to front instead, dividing the final
transmittance by (1 - alpha) at each step; walking front to back needs no such division chain and reuses
the forward's arithmetic. Per chunk, gradients are summed over the tile's pixels before one ``atomic_add``
per Gaussian and quantity.

Runs under ``TRITON_INTERPRET=1`` on the CPU too (how the tests check it without a GPU). Float32 only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import projection
from .projection import TILE, Projection, TileLists

# Compiled kernels may read module globals only when they are constexpr.
ALPHA_MAX = tl.constexpr(projection.ALPHA_MAX)
ALPHA_MIN = tl.constexpr(projection.ALPHA_MIN)
TRANSMITTANCE_MIN = tl.constexpr(projection.TRANSMITTANCE_MIN)



@dataclass
class KernelConfig:
    """One program composites ``rows`` rows of a 16-pixel-wide tile (16 * rows pixel lanes) and walks the tile's
    list ``chunk`` Gaussians at a time. Per-pixel values are replicated across the lanes that share a pixel
    row of the (pixels, chunk) blocks, so register use grows with rows * chunk / warps; the defaults were
    chosen from ptxas's register counts for sm_90 (no spills) until measured on the GPU."""

    rows: int = 8
    chunk: int = 16
    warps: int = 4


# Module attributes so that a benchmark can sweep them.
FORWARD = KernelConfig(rows=8, chunk=16, warps=4)
BACKWARD = KernelConfig(rows=4, chunk=16, warps=4)


@triton.jit
def _pixel_setup(block, tiles_x, width, height, TILE: tl.constexpr, ROWS: tl.constexpr):
    """Tile of program ``block`` (one of TILE // ROWS row bands of a tile) and its pixels."""
    tile = block // (TILE // ROWS)
    band = block % (TILE // ROWS)
    pix = tl.arange(0, TILE * ROWS)
    px = (tile % tiles_x) * TILE + pix % TILE
    py = (tile // tiles_x) * TILE + band * ROWS + pix // TILE
    inside = (px < width) & (py < height)
    return tile, px, py, inside, px.to(tl.float32) + 0.5, py.to(tl.float32) + 0.5


@triton.jit
def _chunk_alpha(idx, end, ids_ptr, means2d_ptr, conics_ptr, opacities_ptr, num_gaussians, cx, cy):
    """A chunk's Gaussian ids, conics and opacities and, per (pixel, Gaussian), the offsets, the unclamped and
    clamped alpha and whether the Gaussian counts at all (alpha >= 1/255)."""
    in_list = idx < end
    gid = tl.load(ids_ptr + idx, mask=in_list, other=0)
    mx = tl.load(means2d_ptr + gid * 2, mask=in_list, other=0.0)
    my = tl.load(means2d_ptr + gid * 2 + 1, mask=in_list, other=0.0)
    ca = tl.load(conics_ptr + gid * 3, mask=in_list, other=0.0)
    cb = tl.load(conics_ptr + gid * 3 + 1, mask=in_list, other=0.0)
    cc = tl.load(conics_ptr + gid * 3 + 2, mask=in_list, other=0.0)
    opacity = tl.load(opacities_ptr + gid % num_gaussians, mask=in_list, other=0.0)
    dx = mx[None, :] - cx[:, None]
    dy = my[None, :] - cy[:, None]
    power = -0.5 * (ca[None, :] * dx * dx + cc[None, :] * dy * dy) - cb[None, :] * dx * dy
    raw = opacity[None, :] * tl.exp(power)
    alpha = tl.minimum(raw, ALPHA_MAX)
    usable = (power <= 0.0) & (alpha >= ALPHA_MIN) & in_list[None, :]
    return in_list, gid, dx, dy, ca, cb, cc, opacity, raw, alpha, usable


@triton.jit
def _chunk_features(features_ptr, gid, in_list):
    """The chunk's four feature channels (colour, then camera depth)."""
    f0 = tl.load(features_ptr + gid * 4, mask=in_list, other=0.0)
    f1 = tl.load(features_ptr + gid * 4 + 1, mask=in_list, other=0.0)
    f2 = tl.load(features_ptr + gid * 4 + 2, mask=in_list, other=0.0)
    f3 = tl.load(features_ptr + gid * 4 + 3, mask=in_list, other=0.0)
    return f0, f1, f2, f3


@triton.jit
def _forward_kernel(means2d_ptr, conics_ptr, opacities_ptr, features_ptr, ranges_ptr, ids_ptr,
                    out_features_ptr, out_trans_ptr, out_last_ptr, num_gaussians, width, height, tiles_x,
                    tiles_per_image, TILE: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr):
    cam = tl.program_id(1)
    tile, px, py, inside, cx, cy = _pixel_setup(tl.program_id(0), tiles_x, width, height, TILE, ROWS)
    start = tl.load(ranges_ptr + cam * tiles_per_image + tile)
    end = tl.load(ranges_ptr + cam * tiles_per_image + tile + 1)
    lane = tl.arange(0, CHUNK)
    trans = tl.full((TILE * ROWS,), 1.0, tl.float32)
    done = inside == 0  # pixels past the image edge never composite
    last = tl.zeros((TILE * ROWS,), tl.int32)
    acc0 = tl.zeros((TILE * ROWS,), tl.float32)
    acc1 = tl.zeros((TILE * ROWS,), tl.float32)
    acc2 = tl.zeros((TILE * ROWS,), tl.float32)
    acc3 = tl.zeros((TILE * ROWS,), tl.float32)
    alive = tl.sum(inside.to(tl.int32))
    i0 = start
    while (i0 < end) & (alive > 0):
        idx = i0 + lane
        in_list, gid, dx, dy, ca, cb, cc, opacity, raw, alpha, usable = _chunk_alpha(
            idx, end, ids_ptr, means2d_ptr, conics_ptr, opacities_ptr, num_gaussians, cx, cy)
        usable = usable & (done == 0)[:, None]
        alpha = tl.where(usable, alpha, 0.0)
        after = trans[:, None] * tl.cumprod(1.0 - alpha, axis=1)
        kept = usable & (after >= TRANSMITTANCE_MIN)
        weight = tl.where(kept, alpha * (after / (1.0 - alpha)), 0.0)
        f0, f1, f2, f3 = _chunk_features(features_ptr, gid, in_list)
        acc0 += tl.sum(weight * f0[None, :], axis=1)
        acc1 += tl.sum(weight * f1[None, :], axis=1)
        acc2 += tl.sum(weight * f2[None, :], axis=1)
        acc3 += tl.sum(weight * f3[None, :], axis=1)
        trans = tl.min(tl.where(kept, after, trans[:, None]), axis=1)
        done = done | (tl.max((usable & (kept == 0)).to(tl.int32), axis=1) > 0)
        last = tl.maximum(last, tl.max(tl.where(kept, idx[None, :] + 1, 0), axis=1))
        alive = tl.sum((done == 0).to(tl.int32))
        i0 += CHUNK
    pixel = (cam * height + py) * width + px
    tl.store(out_features_ptr + pixel * 4, acc0, mask=inside)
    tl.store(out_features_ptr + pixel * 4 + 1, acc1, mask=inside)
    tl.store(out_features_ptr + pixel * 4 + 2, acc2, mask=inside)
    tl.store(out_features_ptr + pixel * 4 + 3, acc3, mask=inside)
    tl.store(out_trans_ptr + pixel, trans, mask=inside)
    tl.store(out_last_ptr + pixel, last, mask=inside)


@triton.jit
def _backward_kernel(means2d_ptr, conics_ptr, opacities_ptr, features_ptr, ranges_ptr, ids_ptr,
                     out_features_ptr, out_trans_ptr, out_last_ptr, grad_features_ptr, grad_trans_ptr,
                     grad_means2d_ptr, grad_conics_ptr, grad_opacities_ptr, grad_gauss_features_ptr,
                     num_gaussians, width, height, tiles_x, tiles_per_image, TILE: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr):
    cam = tl.program_id(1)
    tile, px, py, inside, cx, cy = _pixel_setup(tl.program_id(0), tiles_x, width, height, TILE, ROWS)
    start = tl.load(ranges_ptr + cam * tiles_per_image + tile)
    end = tl.load(ranges_ptr + cam * tiles_per_image + tile + 1)
    lane = tl.arange(0, CHUNK)
    pixel = (cam * height + py) * width + px
    g0 = tl.load(grad_features_ptr + pixel * 4, mask=inside, other=0.0)
    g1 = tl.load(grad_features_ptr + pixel * 4 + 1, mask=inside, other=0.0)
    g2 = tl.load(grad_features_ptr + pixel * 4 + 2, mask=inside, other=0.0)
    g3 = tl.load(grad_features_ptr + pixel * 4 + 3, mask=inside, other=0.0)
    # Only the projection of the features on the pixel's output gradient matters for dL/dalpha:
    # sum_c g_c * (T_i f_ic - (colour behind i)_c / (1 - alpha_i)), so one scalar per (pixel, Gaussian).
    final_projected = (g0 * tl.load(out_features_ptr + pixel * 4, mask=inside, other=0.0)
                       + g1 * tl.load(out_features_ptr + pixel * 4 + 1, mask=inside, other=0.0)
                       + g2 * tl.load(out_features_ptr + pixel * 4 + 2, mask=inside, other=0.0)
                       + g3 * tl.load(out_features_ptr + pixel * 4 + 3, mask=inside, other=0.0))
    final_trans = tl.load(out_trans_ptr + pixel, mask=inside, other=1.0)
    grad_trans = tl.load(grad_trans_ptr + pixel, mask=inside, other=0.0)
    last = tl.load(out_last_ptr + pixel, mask=inside, other=0)
    # The final transmittance's share of dL/dalpha_i is -grad_T * T_final / (1 - alpha_i); it enters below
    # beside the colour behind, both divided by (1 - alpha_i).
    behind_all = final_projected + grad_trans * final_trans
    stop = tl.minimum(tl.max(last), end)
    trans = tl.full((TILE * ROWS,), 1.0, tl.float32)
    done_projected = tl.zeros((TILE * ROWS,), tl.float32)  # sum of w_j (g . f_j) over the chunks before
    i0 = start
    while i0 < stop:
        idx = i0 + lane
        in_list, gid, dx, dy, ca, cb, cc, opacity, raw, alpha, usable = _chunk_alpha(
            idx, end, ids_ptr, means2d_ptr, conics_ptr, opacities_ptr, num_gaussians, cx, cy)
        kept = usable & (idx[None, :] < last[:, None])
        alpha = tl.where(kept, alpha, 0.0)
        one_minus = 1.0 - alpha
        after = trans[:, None] * tl.cumprod(one_minus, axis=1)
        before = after / one_minus
        weight = alpha * before
        f0, f1, f2, f3 = _chunk_features(features_ptr, gid, in_list)
        projected = g0[:, None] * f0[None, :] + g1[:, None] * f1[None, :] + g2[:, None] * f2[None, :] \
            + g3[:, None] * f3[None, :]
        weighted = weight * projected
        behind = (behind_all - done_projected)[:, None] - tl.cumsum(weighted, axis=1)
        grad_alpha = before * projected - behind / one_minus
        done_projected += tl.sum(weighted, axis=1)
        # alpha = min(raw, 0.99): no gradient where the clamp is active (as autograd's clamp). With
        # raw = opacity * exp(power): dL/dpower = dL/draw * raw, dL/dopacity = sum(dL/dpower) / opacity
        # (visible Gaussians have opacity > 1/255), and the mean and conic gradients are combinations of five
        # pixel sums, which keeps fewer (pixel, Gaussian) blocks alive than summing each gradient directly.
        grad_power = tl.where(kept & (raw <= ALPHA_MAX), grad_alpha * raw, 0.0)
        gp_dx = grad_power * dx
        gp_dy = grad_power * dy
        sum_gp = tl.sum(grad_power, axis=0)
        sum_dx = tl.sum(gp_dx, axis=0)
        sum_dy = tl.sum(gp_dy, axis=0)
        sum_dxdx = tl.sum(gp_dx * dx, axis=0)
        sum_dxdy = tl.sum(gp_dx * dy, axis=0)
        sum_dydy = tl.sum(gp_dy * dy, axis=0)
        tl.atomic_add(grad_gauss_features_ptr + gid * 4, tl.sum(weight * g0[:, None], axis=0), mask=in_list)
        tl.atomic_add(grad_gauss_features_ptr + gid * 4 + 1, tl.sum(weight * g1[:, None], axis=0), mask=in_list)
        tl.atomic_add(grad_gauss_features_ptr + gid * 4 + 2, tl.sum(weight * g2[:, None], axis=0), mask=in_list)
        tl.atomic_add(grad_gauss_features_ptr + gid * 4 + 3, tl.sum(weight * g3[:, None], axis=0), mask=in_list)
        tl.atomic_add(grad_opacities_ptr + gid % num_gaussians, sum_gp / tl.where(in_list, opacity, 1.0),
                      mask=in_list)
        tl.atomic_add(grad_means2d_ptr + gid * 2, -(ca * sum_dx + cb * sum_dy), mask=in_list)
        tl.atomic_add(grad_means2d_ptr + gid * 2 + 1, -(cb * sum_dx + cc * sum_dy), mask=in_list)
        tl.atomic_add(grad_conics_ptr + gid * 3, -0.5 * sum_dxdx, mask=in_list)
        tl.atomic_add(grad_conics_ptr + gid * 3 + 1, -sum_dxdy, mask=in_list)
        tl.atomic_add(grad_conics_ptr + gid * 3 + 2, -0.5 * sum_dydy, mask=in_list)
        trans = tl.min(tl.where(kept, after, trans[:, None]), axis=1)
        i0 += CHUNK


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


class _RasterizeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, opacities, features, ranges, ids, width, height, tiles_x):
        batch, num = means2d.shape[:2]
        if features.shape[-1] != 4:
            raise ValueError(f"the triton kernels composite 4 channels (RGB + depth), got {features.shape[-1]}")
        device = means2d.device
        args = (_f32(means2d), _f32(conics), _f32(opacities), _f32(features), ranges.contiguous(),
                ids if ids.numel() else torch.zeros(1, dtype=torch.int32, device=device))
        out_features = torch.empty(batch, height, width, 4, device=device, dtype=torch.float32)
        out_trans = torch.empty(batch, height, width, device=device, dtype=torch.float32)
        out_last = torch.empty(batch, height, width, device=device, dtype=torch.int32)
        tiles_per_image = (ranges.numel() - 1) // batch
        config = FORWARD
        grid = (tiles_per_image * (TILE // config.rows), batch)
        _forward_kernel[grid](*args, out_features, out_trans, out_last, num, width, height, tiles_x,
                              tiles_per_image, TILE=TILE, ROWS=config.rows, CHUNK=config.chunk,
                              num_warps=config.warps)
        ctx.save_for_backward(*args, out_features, out_trans, out_last)
        ctx.meta = (batch, num, width, height, tiles_x, tiles_per_image)
        ctx.dtypes = (means2d.dtype, conics.dtype, opacities.dtype, features.dtype)
        return out_features.to(features.dtype), out_trans.to(features.dtype)

    @staticmethod
    def backward(ctx, grad_features, grad_trans):
        saved = ctx.saved_tensors
        batch, num, width, height, tiles_x, tiles_per_image = ctx.meta
        device = saved[0].device
        if grad_features is None:
            grad_features = torch.zeros(batch, height, width, 4, device=device)
        if grad_trans is None:
            grad_trans = torch.zeros(batch, height, width, device=device)
        grad_means2d = torch.zeros(batch, num, 2, device=device)
        grad_conics = torch.zeros(batch, num, 3, device=device)
        grad_opacities = torch.zeros(num, device=device)
        grad_gauss_features = torch.zeros(batch, num, 4, device=device)
        config = BACKWARD
        grid = (tiles_per_image * (TILE // config.rows), batch)
        _backward_kernel[grid](*saved, _f32(grad_features), _f32(grad_trans), grad_means2d, grad_conics,
                               grad_opacities, grad_gauss_features, num, width, height, tiles_x, tiles_per_image,
                               TILE=TILE, ROWS=config.rows, CHUNK=config.chunk, num_warps=config.warps)
        dm, dc, do, df = ctx.dtypes
        return (grad_means2d.to(dm), grad_conics.to(dc), grad_opacities.to(do), grad_gauss_features.to(df),
                None, None, None, None, None)


def rasterize_triton(proj: Projection, tiles: TileLists, opacities: torch.Tensor, features: torch.Tensor,
                     width: int, height: int):
    """Same contract as :func:`.reference.rasterize_reference`: (B, H, W, C) features, (B, H, W) transmittance."""
    return _RasterizeTriton.apply(proj.means2d, proj.conics, opacities, features, tiles.ranges,
                                  tiles.gaussian_ids, width, height, tiles.tiles_x)


# ---------------------------------------------------------------------------------------------- projection


@triton.jit
def _project_kernel(means_ptr, quats_ptr, scales_ptr, opacities_ptr, viewmats_ptr, Ks_ptr, means2d_ptr,
                    conics_ptr, depths_ptr, radii_ptr, box_ptr, visible_ptr, num, width, height, tiles_x, tiles_y,
                    near, far, LOW_PASS: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr):
    """:func:`.projection.project_gaussians` for BLOCK Gaussians of one camera, fused (forward only)."""
    cam = tl.program_id(1)
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = n < num
    v = viewmats_ptr + cam * 16
    r00, r01, r02, t0 = tl.load(v), tl.load(v + 1), tl.load(v + 2), tl.load(v + 3)
    r10, r11, r12, t1 = tl.load(v + 4), tl.load(v + 5), tl.load(v + 6), tl.load(v + 7)
    r20, r21, r22, t2 = tl.load(v + 8), tl.load(v + 9), tl.load(v + 10), tl.load(v + 11)
    fx, cx = tl.load(Ks_ptr + cam * 9), tl.load(Ks_ptr + cam * 9 + 2)
    fy, cy = tl.load(Ks_ptr + cam * 9 + 4), tl.load(Ks_ptr + cam * 9 + 5)
    wx = tl.load(means_ptr + n * 3, mask=m, other=0.0)
    wy = tl.load(means_ptr + n * 3 + 1, mask=m, other=0.0)
    wz = tl.load(means_ptr + n * 3 + 2, mask=m, other=0.0)
    x = r00 * wx + r01 * wy + r02 * wz + t0
    y = r10 * wx + r11 * wy + r12 * wz + t1
    z = r20 * wx + r21 * wy + r22 * wz + t2
    in_range = (z > near) & (z < far)
    zs = tl.where(in_range, z, 1.0)
    mx = fx * x / zs + cx
    my = fy * y / zs + cy
    margin_x = 0.3 * 0.5 * width / fx
    margin_y = 0.3 * 0.5 * height / fy
    tx = zs * tl.maximum(tl.minimum(x / zs, (width - cx) / fx + margin_x), -cx / fx - margin_x)
    ty = zs * tl.maximum(tl.minimum(y / zs, (height - cy) / fy + margin_y), -cy / fy - margin_y)
    j00 = fx / zs
    j02 = -fx * tx / (zs * zs)
    j11 = fy / zs
    j12 = -fy * ty / (zs * zs)
    # Rows of J W (2 x 3).
    a0, a1, a2 = j00 * r00 + j02 * r20, j00 * r01 + j02 * r21, j00 * r02 + j02 * r22
    b0, b1, b2 = j11 * r10 + j12 * r20, j11 * r11 + j12 * r21, j11 * r12 + j12 * r22
    qw = tl.load(quats_ptr + n * 4, mask=m, other=1.0)
    qx = tl.load(quats_ptr + n * 4 + 1, mask=m, other=0.0)
    qy = tl.load(quats_ptr + n * 4 + 2, mask=m, other=0.0)
    qz = tl.load(quats_ptr + n * 4 + 3, mask=m, other=0.0)
    inv = 1.0 / tl.sqrt(qw * qw + qx * qx + qy * qy + qz * qz)
    qw, qx, qy, qz = qw * inv, qx * inv, qy * inv, qz * inv
    s0 = tl.load(scales_ptr + n * 3, mask=m, other=1.0)
    s1 = tl.load(scales_ptr + n * 3 + 1, mask=m, other=1.0)
    s2 = tl.load(scales_ptr + n * 3 + 2, mask=m, other=1.0)
    # R diag(s), column by column.
    m00, m10, m20 = (1 - 2 * (qy * qy + qz * qz)) * s0, 2 * (qx * qy + qw * qz) * s0, 2 * (qx * qz - qw * qy) * s0
    m01, m11, m21 = 2 * (qx * qy - qw * qz) * s1, (1 - 2 * (qx * qx + qz * qz)) * s1, 2 * (qy * qz + qw * qx) * s1
    m02, m12, m22 = 2 * (qx * qz + qw * qy) * s2, 2 * (qy * qz - qw * qx) * s2, (1 - 2 * (qx * qx + qy * qy)) * s2
    u0, u1, u2 = a0 * m00 + a1 * m10 + a2 * m20, a0 * m01 + a1 * m11 + a2 * m21, a0 * m02 + a1 * m12 + a2 * m22
    w0, w1, w2 = b0 * m00 + b1 * m10 + b2 * m20, b0 * m01 + b1 * m11 + b2 * m21, b0 * m02 + b1 * m12 + b2 * m22
    cov_a = u0 * u0 + u1 * u1 + u2 * u2 + LOW_PASS
    cov_b = u0 * w0 + u1 * w1 + u2 * w2
    cov_c = w0 * w0 + w1 * w1 + w2 * w2 + LOW_PASS
    det = cov_a * cov_c - cov_b * cov_b
    det_safe = tl.where(det > 0, det, 1.0)
    opacity = tl.load(opacities_ptr + n, mask=m, other=0.0)
    extent = tl.sqrt(2.0 * tl.log(tl.maximum(opacity / ALPHA_MIN, 1.0)))
    half_x = extent * tl.sqrt(cov_a)
    half_y = extent * tl.sqrt(cov_c)
    mid = 0.5 * (cov_a + cov_c)
    lambda_max = mid + tl.sqrt(tl.maximum(mid * mid - det, 0.1))
    radius = tl.ceil(extent * tl.sqrt(lambda_max))
    x0 = tl.minimum(tl.maximum(tl.floor((mx - half_x) / TILE), 0.0), tiles_x - 1.0)
    x1 = tl.minimum(tl.maximum(tl.floor((mx + half_x) / TILE), -1.0), tiles_x - 1.0)
    y0 = tl.minimum(tl.maximum(tl.floor((my - half_y) / TILE), 0.0), tiles_y - 1.0)
    y1 = tl.minimum(tl.maximum(tl.floor((my + half_y) / TILE), -1.0), tiles_y - 1.0)
    on_screen = (mx + half_x >= 0) & (mx - half_x <= width) & (my + half_y >= 0) & (my - half_y <= height)
    visible = in_range & (det > 0) & (opacity > ALPHA_MIN) & on_screen & (x0 <= x1) & (y0 <= y1) & m
    out = cam * num + n
    tl.store(means2d_ptr + out * 2, mx, mask=m)
    tl.store(means2d_ptr + out * 2 + 1, my, mask=m)
    tl.store(conics_ptr + out * 3, cov_c / det_safe, mask=m)
    tl.store(conics_ptr + out * 3 + 1, -cov_b / det_safe, mask=m)
    tl.store(conics_ptr + out * 3 + 2, cov_a / det_safe, mask=m)
    tl.store(depths_ptr + out, z, mask=m)
    tl.store(radii_ptr + out, tl.where(visible, radius, 0.0).to(tl.int32), mask=m)
    tl.store(box_ptr + out * 4, tl.where(visible, x0, 0.0).to(tl.int64), mask=m)
    tl.store(box_ptr + out * 4 + 1, tl.where(visible, x1, -1.0).to(tl.int64), mask=m)
    tl.store(box_ptr + out * 4 + 2, tl.where(visible, y0, 0.0).to(tl.int64), mask=m)
    tl.store(box_ptr + out * 4 + 3, tl.where(visible, y1, -1.0).to(tl.int64), mask=m)
    tl.store(visible_ptr + out, visible.to(tl.int8), mask=m)


PROJECT_BLOCK = 256


def project_gaussians_triton(means, quats, scales, opacities, viewmats, Ks, width: int, height: int,
                             near: float = 0.01, far: float = 100.0) -> Projection:
    """:func:`.projection.project_gaussians` in one fused kernel launch, without gradients: for rendering only
    (the torch projection is ~200 small ops, which at batch 1 cost more launch time than the compositing)."""
    with torch.no_grad():
        return _project_launch(means, quats, scales, opacities, viewmats, Ks, width, height, near, far)


def _project_launch(means, quats, scales, opacities, viewmats, Ks, width, height, near, far) -> Projection:
    batch, num = viewmats.shape[0], means.shape[0]
    device = means.device
    means2d = torch.empty(batch, num, 2, device=device)
    conics = torch.empty(batch, num, 3, device=device)
    depths = torch.empty(batch, num, device=device)
    radii = torch.empty(batch, num, device=device, dtype=torch.int32)
    box = torch.empty(batch, num, 4, device=device, dtype=torch.int64)
    visible = torch.empty(batch, num, device=device, dtype=torch.int8)
    tiles_x, tiles_y = triton.cdiv(width, TILE), triton.cdiv(height, TILE)
    if num:
        grid = (triton.cdiv(num, PROJECT_BLOCK), batch)
        _project_kernel[grid](_f32(means), _f32(quats), _f32(scales), _f32(opacities), _f32(viewmats), _f32(Ks),
                              means2d, conics, depths, radii, box, visible, num, width, height, tiles_x, tiles_y,
                              float(near), float(far), LOW_PASS=projection.LOW_PASS, TILE=TILE, BLOCK=PROJECT_BLOCK)
    return Projection(means2d, conics, depths, radii, box, visible.bool())


@triton.jit
def _project_backward_kernel(means_ptr, quats_ptr, scales_ptr, viewmats_ptr, Ks_ptr, grad_means2d_ptr,
                             grad_conics_ptr, grad_depths_ptr, grad_means_ptr, grad_quats_ptr, grad_scales_ptr,
                             num, width, height, near, far, LOW_PASS: tl.constexpr, BLOCK: tl.constexpr):
    """Gradients of :func:`_project_kernel`'s means2d, conics and depths w.r.t. means, quats and scales (the
    chain rule of the torch projection written out, as 3DGS's preprocess/computeCov2D backward); summed over
    cameras with atomic adds."""
    cam = tl.program_id(1)
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = n < num
    v = viewmats_ptr + cam * 16
    r00, r01, r02, t0 = tl.load(v), tl.load(v + 1), tl.load(v + 2), tl.load(v + 3)
    r10, r11, r12, t1 = tl.load(v + 4), tl.load(v + 5), tl.load(v + 6), tl.load(v + 7)
    r20, r21, r22, t2 = tl.load(v + 8), tl.load(v + 9), tl.load(v + 10), tl.load(v + 11)
    fx, cx = tl.load(Ks_ptr + cam * 9), tl.load(Ks_ptr + cam * 9 + 2)
    fy, cy = tl.load(Ks_ptr + cam * 9 + 4), tl.load(Ks_ptr + cam * 9 + 5)
    wx = tl.load(means_ptr + n * 3, mask=m, other=0.0)
    wy = tl.load(means_ptr + n * 3 + 1, mask=m, other=0.0)
    wz = tl.load(means_ptr + n * 3 + 2, mask=m, other=0.0)
    x = r00 * wx + r01 * wy + r02 * wz + t0
    y = r10 * wx + r11 * wy + r12 * wz + t1
    z = r20 * wx + r21 * wy + r22 * wz + t2
    in_range = (z > near) & (z < far)
    zs = tl.where(in_range, z, 1.0)
    margin_x = 0.3 * 0.5 * width / fx
    margin_y = 0.3 * 0.5 * height / fy
    rx = x / zs
    ry = y / zs
    rxc = tl.maximum(tl.minimum(rx, (width - cx) / fx + margin_x), -cx / fx - margin_x)
    ryc = tl.maximum(tl.minimum(ry, (height - cy) / fy + margin_y), -cy / fy - margin_y)
    tx = zs * rxc
    ty = zs * ryc
    j00 = fx / zs
    j02 = -fx * tx / (zs * zs)
    j11 = fy / zs
    j12 = -fy * ty / (zs * zs)
    a0, a1, a2 = j00 * r00 + j02 * r20, j00 * r01 + j02 * r21, j00 * r02 + j02 * r22
    b0, b1, b2 = j11 * r10 + j12 * r20, j11 * r11 + j12 * r21, j11 * r12 + j12 * r22
    qw0 = tl.load(quats_ptr + n * 4, mask=m, other=1.0)
    qx0 = tl.load(quats_ptr + n * 4 + 1, mask=m, other=0.0)
    qy0 = tl.load(quats_ptr + n * 4 + 2, mask=m, other=0.0)
    qz0 = tl.load(quats_ptr + n * 4 + 3, mask=m, other=0.0)
    inv = 1.0 / tl.sqrt(qw0 * qw0 + qx0 * qx0 + qy0 * qy0 + qz0 * qz0)
    qw, qx, qy, qz = qw0 * inv, qx0 * inv, qy0 * inv, qz0 * inv
    s0 = tl.load(scales_ptr + n * 3, mask=m, other=1.0)
    s1 = tl.load(scales_ptr + n * 3 + 1, mask=m, other=1.0)
    s2 = tl.load(scales_ptr + n * 3 + 2, mask=m, other=1.0)
    q00, q01, q02 = 1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - qw * qz), 2 * (qx * qz + qw * qy)
    q10, q11, q12 = 2 * (qx * qy + qw * qz), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - qw * qx)
    q20, q21, q22 = 2 * (qx * qz - qw * qy), 2 * (qy * qz + qw * qx), 1 - 2 * (qx * qx + qy * qy)
    m00, m01, m02 = q00 * s0, q01 * s1, q02 * s2
    m10, m11, m12 = q10 * s0, q11 * s1, q12 * s2
    m20, m21, m22 = q20 * s0, q21 * s1, q22 * s2
    u0, u1, u2 = a0 * m00 + a1 * m10 + a2 * m20, a0 * m01 + a1 * m11 + a2 * m21, a0 * m02 + a1 * m12 + a2 * m22
    w0, w1, w2 = b0 * m00 + b1 * m10 + b2 * m20, b0 * m01 + b1 * m11 + b2 * m21, b0 * m02 + b1 * m12 + b2 * m22
    cov_a = u0 * u0 + u1 * u1 + u2 * u2 + LOW_PASS
    cov_b = u0 * w0 + u1 * w1 + u2 * w2
    cov_c = w0 * w0 + w1 * w1 + w2 * w2 + LOW_PASS
    det = cov_a * cov_c - cov_b * cov_b
    det_safe = tl.where(det > 0, det, 1.0)
    out = cam * num + n
    gmx = tl.load(grad_means2d_ptr + out * 2, mask=m, other=0.0)
    gmy = tl.load(grad_means2d_ptr + out * 2 + 1, mask=m, other=0.0)
    gk0 = tl.load(grad_conics_ptr + out * 3, mask=m, other=0.0)
    gk1 = tl.load(grad_conics_ptr + out * 3 + 1, mask=m, other=0.0)
    gk2 = tl.load(grad_conics_ptr + out * 3 + 2, mask=m, other=0.0)
    gz_out = tl.load(grad_depths_ptr + out, mask=m, other=0.0)
    # conic = (c, -b, a) / det (the where() on det passes no gradient to det where it was replaced).
    inv_det = 1.0 / det_safe
    k = tl.where(det > 0, -(gk0 * cov_c - gk1 * cov_b + gk2 * cov_a) * inv_det * inv_det, 0.0)
    g_a = gk2 * inv_det + k * cov_c
    g_b = -gk1 * inv_det - 2.0 * k * cov_b
    g_c = gk0 * inv_det + k * cov_a
    gu0, gu1, gu2 = 2 * g_a * u0 + g_b * w0, 2 * g_a * u1 + g_b * w1, 2 * g_a * u2 + g_b * w2
    gw0, gw1, gw2 = g_b * u0 + 2 * g_c * w0, g_b * u1 + 2 * g_c * w1, g_b * u2 + 2 * g_c * w2
    # T = A M: dM_lk = du_k a_l + dw_k b_l; dA rows: da_l = sum_k du_k M_lk, db_l = sum_k dw_k M_lk.
    gm00, gm01, gm02 = gu0 * a0 + gw0 * b0, gu1 * a0 + gw1 * b0, gu2 * a0 + gw2 * b0
    gm10, gm11, gm12 = gu0 * a1 + gw0 * b1, gu1 * a1 + gw1 * b1, gu2 * a1 + gw2 * b1
    gm20, gm21, gm22 = gu0 * a2 + gw0 * b2, gu1 * a2 + gw1 * b2, gu2 * a2 + gw2 * b2
    ga0, ga1, ga2 = gu0 * m00 + gu1 * m01 + gu2 * m02, gu0 * m10 + gu1 * m11 + gu2 * m12, gu0 * m20 + gu1 * m21 + gu2 * m22
    gb0, gb1, gb2 = gw0 * m00 + gw1 * m01 + gw2 * m02, gw0 * m10 + gw1 * m11 + gw2 * m12, gw0 * m20 + gw1 * m21 + gw2 * m22
    # M = Rq diag(s).
    tl.atomic_add(grad_scales_ptr + n * 3, gm00 * q00 + gm10 * q10 + gm20 * q20, mask=m)
    tl.atomic_add(grad_scales_ptr + n * 3 + 1, gm01 * q01 + gm11 * q11 + gm21 * q21, mask=m)
    tl.atomic_add(grad_scales_ptr + n * 3 + 2, gm02 * q02 + gm12 * q12 + gm22 * q22, mask=m)
    g00, g01, g02 = gm00 * s0, gm01 * s1, gm02 * s2
    g10, g11, g12 = gm10 * s0, gm11 * s1, gm12 * s2
    g20, g21, g22 = gm20 * s0, gm21 * s1, gm22 * s2
    dqw = 2 * (-qz * g01 + qy * g02 + qz * g10 - qx * g12 - qy * g20 + qx * g21)
    dqx = 2 * (qy * g01 + qz * g02 + qy * g10 - 2 * qx * g11 - qw * g12 + qz * g20 + qw * g21 - 2 * qx * g22)
    dqy = 2 * (-2 * qy * g00 + qx * g01 + qw * g02 + qx * g10 + qz * g12 - qw * g20 + qz * g21 - 2 * qy * g22)
    dqz = 2 * (-2 * qz * g00 - qw * g01 + qx * g02 + qw * g10 - 2 * qz * g11 + qy * g12 + qx * g20 + qy * g21)
    dot = qw * dqw + qx * dqx + qy * dqy + qz * dqz  # through the normalisation q / |q|
    tl.atomic_add(grad_quats_ptr + n * 4, (dqw - qw * dot) * inv, mask=m)
    tl.atomic_add(grad_quats_ptr + n * 4 + 1, (dqx - qx * dot) * inv, mask=m)
    tl.atomic_add(grad_quats_ptr + n * 4 + 2, (dqy - qy * dot) * inv, mask=m)
    tl.atomic_add(grad_quats_ptr + n * 4 + 3, (dqz - qz * dot) * inv, mask=m)
    # A rows: a = j00 R_0 + j02 R_2, b = j11 R_1 + j12 R_2.
    g_j00 = ga0 * r00 + ga1 * r01 + ga2 * r02
    g_j02 = ga0 * r20 + ga1 * r21 + ga2 * r22
    g_j11 = gb0 * r10 + gb1 * r11 + gb2 * r12
    g_j12 = gb0 * r20 + gb1 * r21 + gb2 * r22
    inv_z = 1.0 / zs
    g_zs = -g_j00 * fx * inv_z * inv_z - g_j11 * fy * inv_z * inv_z \
        + 2.0 * (g_j02 * fx * tx + g_j12 * fy * ty) * inv_z * inv_z * inv_z
    g_tx = -g_j02 * fx * inv_z * inv_z
    g_ty = -g_j12 * fy * inv_z * inv_z
    # tx = zs * clamp(x / zs): the clamp passes gradient only inside its range.
    g_rx = tl.where((rx == rxc), g_tx * zs, 0.0)
    g_ry = tl.where((ry == ryc), g_ty * zs, 0.0)
    g_zs += g_tx * rxc + g_ty * ryc
    # means2d = f * (x, y) / zs + c
    g_x = gmx * fx * inv_z + g_rx * inv_z
    g_y = gmy * fy * inv_z + g_ry * inv_z
    g_zs += -(gmx * fx * x + gmy * fy * y) * inv_z * inv_z - (g_rx * x + g_ry * y) * inv_z * inv_z
    g_z = tl.where(in_range, g_zs, 0.0) + gz_out
    tl.atomic_add(grad_means_ptr + n * 3, r00 * g_x + r10 * g_y + r20 * g_z, mask=m)
    tl.atomic_add(grad_means_ptr + n * 3 + 1, r01 * g_x + r11 * g_y + r21 * g_z, mask=m)
    tl.atomic_add(grad_means_ptr + n * 3 + 2, r02 * g_x + r12 * g_y + r22 * g_z, mask=m)


class _ProjectTriton(torch.autograd.Function):
    """The fused projection with its fused backward: gradients of means2d, conics and depths reach means, quats
    and scales (opacities only set the footprint, which is not differentiable)."""

    @staticmethod
    def forward(ctx, means, quats, scales, opacities, viewmats, Ks, width, height, near, far):
        proj = _project_launch(means, quats, scales, opacities, viewmats, Ks, width, height, near, far)
        ctx.save_for_backward(_f32(means), _f32(quats), _f32(scales), _f32(viewmats), _f32(Ks))
        ctx.meta = (width, height, near, far, means.dtype, quats.dtype, scales.dtype)
        ctx.mark_non_differentiable(proj.radii, proj.tile_box, proj.visible)
        return proj.means2d, proj.conics, proj.depths, proj.radii, proj.tile_box, proj.visible

    @staticmethod
    def backward(ctx, grad_means2d, grad_conics, grad_depths, *_):
        means, quats, scales, viewmats, Ks = ctx.saved_tensors
        width, height, near, far, dm, dq, ds = ctx.meta
        batch, num = viewmats.shape[0], means.shape[0]
        zeros = lambda *shape: torch.zeros(*shape, device=means.device)  # noqa: E731
        grad_means2d = zeros(batch, num, 2) if grad_means2d is None else _f32(grad_means2d)
        grad_conics = zeros(batch, num, 3) if grad_conics is None else _f32(grad_conics)
        grad_depths = zeros(batch, num) if grad_depths is None else _f32(grad_depths)
        grad_means, grad_quats, grad_scales = zeros(num, 3), zeros(num, 4), zeros(num, 3)
        if num:
            grid = (triton.cdiv(num, PROJECT_BLOCK), batch)
            _project_backward_kernel[grid](means, quats, scales, viewmats, Ks, grad_means2d, grad_conics, grad_depths,
                                           grad_means, grad_quats, grad_scales, num, width, height, float(near),
                                           float(far), LOW_PASS=projection.LOW_PASS, BLOCK=PROJECT_BLOCK)
        return grad_means.to(dm), grad_quats.to(dq), grad_scales.to(ds), None, None, None, None, None, None, None


def project_gaussians_triton_autograd(means, quats, scales, opacities, viewmats, Ks, width: int, height: int,
                                      near: float = 0.01, far: float = 100.0) -> Projection:
    """The fused projection, differentiable w.r.t. means, quats and scales (for training)."""
    means2d, conics, depths, radii, box, visible = _ProjectTriton.apply(
        means, quats, scales, opacities, viewmats, Ks, width, height, near, far)
    return Projection(means2d, conics, depths, radii, box, visible)
