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

import torch
import triton
import triton.language as tl

from . import projection
from .projection import TILE, Projection, TileLists

# Compiled kernels may read module globals only when they are constexpr.
ALPHA_MAX = tl.constexpr(projection.ALPHA_MAX)
ALPHA_MIN = tl.constexpr(projection.ALPHA_MIN)
TRANSMITTANCE_MIN = tl.constexpr(projection.TRANSMITTANCE_MIN)

# Gaussians per step of a tile's list, and warps per tile program (256 pixel lanes). Module attributes so a
# benchmark can sweep them.
CHUNK = 16
NUM_WARPS = 8


@triton.jit
def _pixel_setup(tile, tiles_x, width, height, TILE: tl.constexpr):
    pix = tl.arange(0, TILE * TILE)
    px = (tile % tiles_x) * TILE + pix % TILE
    py = (tile // tiles_x) * TILE + pix // TILE
    inside = (px < width) & (py < height)
    return px, py, inside, px.to(tl.float32) + 0.5, py.to(tl.float32) + 0.5


@triton.jit
def _chunk_alpha(idx, end, ids_ptr, means2d_ptr, conics_ptr, opacities_ptr, num_gaussians, cx, cy):
    """Gaussian ids of a chunk and, per (pixel, Gaussian), the offsets, exp(power), unclamped and clamped alpha."""
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
    gauss = tl.exp(power)
    raw = opacity[None, :] * gauss
    alpha = tl.minimum(raw, ALPHA_MAX)
    usable = (power <= 0.0) & (alpha >= ALPHA_MIN) & in_list[None, :]
    return in_list, gid, dx, dy, ca, cb, cc, gauss, raw, alpha, usable


@triton.jit
def _column(matrix, channel, c):
    """Column c of a (pixels, channels) block."""
    return tl.sum(tl.where(channel[None, :] == c, matrix, 0.0), axis=1)


@triton.jit
def _forward_kernel(means2d_ptr, conics_ptr, opacities_ptr, features_ptr, ranges_ptr, ids_ptr,
                    out_features_ptr, out_trans_ptr, out_last_ptr, num_gaussians, width, height, tiles_x,
                    tiles_per_image, C: tl.constexpr, CP: tl.constexpr, TILE: tl.constexpr, CHUNK: tl.constexpr):
    tile = tl.program_id(0)
    cam = tl.program_id(1)
    start = tl.load(ranges_ptr + cam * tiles_per_image + tile)
    end = tl.load(ranges_ptr + cam * tiles_per_image + tile + 1)
    px, py, inside, cx, cy = _pixel_setup(tile, tiles_x, width, height, TILE)
    channel = tl.arange(0, CP)
    lane = tl.arange(0, CHUNK)
    trans = tl.full((TILE * TILE,), 1.0, tl.float32)
    done = inside == 0  # pixels past the image edge never composite
    last = tl.zeros((TILE * TILE,), tl.int32)
    acc = tl.zeros((TILE * TILE, CP), tl.float32)
    alive = tl.sum(inside.to(tl.int32))
    i0 = start
    while (i0 < end) & (alive > 0):
        idx = i0 + lane
        in_list, gid, dx, dy, ca, cb, cc, gauss, raw, alpha, usable = _chunk_alpha(
            idx, end, ids_ptr, means2d_ptr, conics_ptr, opacities_ptr, num_gaussians, cx, cy)
        usable = usable & (done == 0)[:, None]
        alpha = tl.where(usable, alpha, 0.0)
        after = trans[:, None] * tl.cumprod(1.0 - alpha, axis=1)
        kept = usable & (after >= TRANSMITTANCE_MIN)
        weight = tl.where(kept, alpha * (after / (1.0 - alpha)), 0.0)
        for c in tl.static_range(C):
            feature = tl.load(features_ptr + gid * C + c, mask=in_list, other=0.0)
            acc += tl.where(channel[None, :] == c, tl.sum(weight * feature[None, :], axis=1)[:, None], 0.0)
        trans = tl.min(tl.where(kept, after, trans[:, None]), axis=1)
        done = done | (tl.max((usable & (kept == 0)).to(tl.int32), axis=1) > 0)
        last = tl.maximum(last, tl.max(tl.where(kept, idx[None, :] + 1, 0), axis=1))
        alive = tl.sum((done == 0).to(tl.int32))
        i0 += CHUNK
    pixel = (cam * height + py) * width + px
    tl.store(out_features_ptr + pixel[:, None] * C + channel[None, :], acc,
             mask=inside[:, None] & (channel[None, :] < C))
    tl.store(out_trans_ptr + pixel, trans, mask=inside)
    tl.store(out_last_ptr + pixel, last, mask=inside)


@triton.jit
def _backward_kernel(means2d_ptr, conics_ptr, opacities_ptr, features_ptr, ranges_ptr, ids_ptr,
                     out_features_ptr, out_trans_ptr, out_last_ptr, grad_features_ptr, grad_trans_ptr,
                     grad_means2d_ptr, grad_conics_ptr, grad_opacities_ptr, grad_gauss_features_ptr,
                     num_gaussians, width, height, tiles_x, tiles_per_image,
                     C: tl.constexpr, CP: tl.constexpr, TILE: tl.constexpr, CHUNK: tl.constexpr):
    tile = tl.program_id(0)
    cam = tl.program_id(1)
    start = tl.load(ranges_ptr + cam * tiles_per_image + tile)
    end = tl.load(ranges_ptr + cam * tiles_per_image + tile + 1)
    px, py, inside, cx, cy = _pixel_setup(tile, tiles_x, width, height, TILE)
    channel = tl.arange(0, CP)
    lane = tl.arange(0, CHUNK)
    pixel = (cam * height + py) * width + px
    block = pixel[:, None] * C + channel[None, :]
    block_mask = inside[:, None] & (channel[None, :] < C)
    grad_out = tl.load(grad_features_ptr + block, mask=block_mask, other=0.0)
    final = tl.load(out_features_ptr + block, mask=block_mask, other=0.0)
    final_trans = tl.load(out_trans_ptr + pixel, mask=inside, other=1.0)
    grad_trans = tl.load(grad_trans_ptr + pixel, mask=inside, other=0.0)
    last = tl.load(out_last_ptr + pixel, mask=inside, other=0)
    # dL/dalpha of a Gaussian through the final transmittance: -grad_T * T_final / (1 - alpha).
    trans_term = grad_trans * final_trans
    stop = tl.minimum(tl.max(last), end)
    trans = tl.full((TILE * TILE,), 1.0, tl.float32)
    prefix = tl.zeros((TILE * TILE, CP), tl.float32)
    i0 = start
    while i0 < stop:
        idx = i0 + lane
        in_list, gid, dx, dy, ca, cb, cc, gauss, raw, alpha, usable = _chunk_alpha(
            idx, end, ids_ptr, means2d_ptr, conics_ptr, opacities_ptr, num_gaussians, cx, cy)
        kept = usable & (idx[None, :] < last[:, None])
        alpha = tl.where(kept, alpha, 0.0)
        after = trans[:, None] * tl.cumprod(1.0 - alpha, axis=1)
        one_minus = 1.0 - alpha
        before = after / one_minus
        weight = alpha * before
        grad_alpha = -trans_term[:, None] / one_minus
        for c in tl.static_range(C):
            feature = tl.load(features_ptr + gid * C + c, mask=in_list, other=0.0)
            weighted = weight * feature[None, :]
            grad_c = _column(grad_out, channel, c)
            behind = (_column(final, channel, c) - _column(prefix, channel, c))[:, None] - tl.cumsum(weighted, axis=1)
            grad_alpha += grad_c[:, None] * (before * feature[None, :] - behind / one_minus)
            tl.atomic_add(grad_gauss_features_ptr + gid * C + c, tl.sum(weight * grad_c[:, None], axis=0),
                          mask=in_list)
            prefix += tl.where(channel[None, :] == c, tl.sum(weighted, axis=1)[:, None], 0.0)
        # alpha = min(raw, 0.99): no gradient where the clamp is active (as autograd's clamp).
        grad_raw = tl.where(kept & (raw <= ALPHA_MAX), grad_alpha, 0.0)
        grad_power = grad_raw * raw
        tl.atomic_add(grad_opacities_ptr + gid % num_gaussians, tl.sum(grad_raw * gauss, axis=0), mask=in_list)
        tl.atomic_add(grad_means2d_ptr + gid * 2,
                      tl.sum(-grad_power * (ca[None, :] * dx + cb[None, :] * dy), axis=0), mask=in_list)
        tl.atomic_add(grad_means2d_ptr + gid * 2 + 1,
                      tl.sum(-grad_power * (cb[None, :] * dx + cc[None, :] * dy), axis=0), mask=in_list)
        tl.atomic_add(grad_conics_ptr + gid * 3, tl.sum(-0.5 * grad_power * dx * dx, axis=0), mask=in_list)
        tl.atomic_add(grad_conics_ptr + gid * 3 + 1, tl.sum(-grad_power * dx * dy, axis=0), mask=in_list)
        tl.atomic_add(grad_conics_ptr + gid * 3 + 2, tl.sum(-0.5 * grad_power * dy * dy, axis=0), mask=in_list)
        trans = tl.min(tl.where(kept, after, trans[:, None]), axis=1)
        i0 += CHUNK


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


class _RasterizeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, opacities, features, ranges, ids, width, height, tiles_x):
        batch, num = means2d.shape[:2]
        channels = features.shape[-1]
        device = means2d.device
        args = (_f32(means2d), _f32(conics), _f32(opacities), _f32(features), ranges.contiguous(),
                ids if ids.numel() else torch.zeros(1, dtype=torch.int32, device=device))
        out_features = torch.empty(batch, height, width, channels, device=device, dtype=torch.float32)
        out_trans = torch.empty(batch, height, width, device=device, dtype=torch.float32)
        out_last = torch.empty(batch, height, width, device=device, dtype=torch.int32)
        tiles_per_image = (ranges.numel() - 1) // batch
        consts = dict(C=channels, CP=triton.next_power_of_2(channels), TILE=TILE, CHUNK=CHUNK)
        _forward_kernel[(tiles_per_image, batch)](*args, out_features, out_trans, out_last, num, width, height,
                                                  tiles_x, tiles_per_image, num_warps=NUM_WARPS, **consts)
        ctx.save_for_backward(*args, out_features, out_trans, out_last)
        ctx.meta = (batch, num, width, height, tiles_x, tiles_per_image, consts, CHUNK, NUM_WARPS)
        ctx.dtypes = (means2d.dtype, conics.dtype, opacities.dtype, features.dtype)
        return out_features.to(features.dtype), out_trans.to(features.dtype)

    @staticmethod
    def backward(ctx, grad_features, grad_trans):
        saved = ctx.saved_tensors
        means2d = saved[0]
        batch, num, width, height, tiles_x, tiles_per_image, consts, _, warps = ctx.meta
        device = means2d.device
        channels = consts["C"]
        if grad_features is None:
            grad_features = torch.zeros(batch, height, width, channels, device=device)
        if grad_trans is None:
            grad_trans = torch.zeros(batch, height, width, device=device)
        grad_means2d = torch.zeros(batch, num, 2, device=device)
        grad_conics = torch.zeros(batch, num, 3, device=device)
        grad_opacities = torch.zeros(num, device=device)
        grad_gauss_features = torch.zeros(batch, num, channels, device=device)
        _backward_kernel[(tiles_per_image, batch)](
            *saved, _f32(grad_features), _f32(grad_trans), grad_means2d, grad_conics, grad_opacities,
            grad_gauss_features, num, width, height, tiles_x, tiles_per_image, num_warps=warps, **consts)
        dm, dc, do, df = ctx.dtypes
        return (grad_means2d.to(dm), grad_conics.to(dc), grad_opacities.to(do), grad_gauss_features.to(df),
                None, None, None, None, None)


def rasterize_triton(proj: Projection, tiles: TileLists, opacities: torch.Tensor, features: torch.Tensor,
                     width: int, height: int):
    """Same contract as :func:`.reference.rasterize_reference`: (B, H, W, C) features, (B, H, W) transmittance."""
    return _RasterizeTriton.apply(proj.means2d, proj.conics, opacities, features, tiles.ranges,
                                  tiles.gaussian_ids, width, height, tiles.tiles_x)
