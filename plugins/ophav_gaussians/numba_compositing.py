"""The CPU compositing of :mod:`ophav_gaussians.sparse` as compiled loops (Numba), forward and backward.

The pair compositing in PyTorch spends a training step on ~50 whole-array operations over every
(Gaussian, pixel) pair (about 430k per 128x128 view at the preview profile), sorting them, and their autograd.
Here the same pairs are walked by compiled loops: a counting sort puts each pixel's Gaussians in depth order
(the Gaussians are visited front to back, so each pixel's list comes out sorted), the forward composites each
pixel front to back, and the backward walks each pixel's list back to front, recovering the transmittance by
division (3DGS's backward). The rules are :mod:`ophav_gaussians.sparse`'s: ``alpha = min(0.99, opacity
exp(power))`` computed in float32, skipped below 1/255 or where ``power > 0``, and a pixel stops at the first
Gaussian that would take its transmittance below 1e-4. ``tests/test_gaussians.py`` checks images and gradients
against the tile reference.

Numba compiles the loops on first use (seconds; cached next to this file where it is writable). This module
imports Numba: :mod:`ophav_gaussians.sparse` imports it only when Numba is installed, and otherwise composites
in PyTorch.
"""
from __future__ import annotations

import numba
import numpy as np
import torch
from numba.core.errors import NumbaError  # noqa: F401 (what a failed compilation raises; sparse.py catches it)

from ophav_gaussians.raster.projection import ALPHA_MAX, ALPHA_MIN, TRANSMITTANCE_MIN, Projection, pixel_boxes


F32 = np.float32
HALF = F32(0.5)
ALPHA_MIN32, ALPHA_MAX32 = F32(ALPHA_MIN), F32(ALPHA_MAX)


@numba.njit(cache=True, nogil=True)
def _pixel_lists(order, x0, x1, y0, y1, width, height):
    """Each pixel's Gaussians (indices into the projection) in the order of ``order`` (front to back): a
    counting sort over the pixels of each Gaussian's box. Pixel p's list is ``ids[starts[p]:starts[p + 1]]``."""
    counts = np.zeros(width * height + 1, np.int64)
    for k in range(order.size):
        g = order[k]
        for y in range(y0[g], y1[g] + 1):
            for x in range(x0[g], x1[g] + 1):
                counts[y * width + x + 1] += 1
    starts = np.cumsum(counts)
    fill = starts[:-1].copy()
    ids = np.empty(starts[-1], np.int32)
    for k in range(order.size):
        g = order[k]
        for y in range(y0[g], y1[g] + 1):
            for x in range(x0[g], x1[g] + 1):
                p = y * width + x
                ids[fill[p]] = g
                fill[p] += 1
    return starts, ids


@numba.njit(cache=True, inline="always")
def _power_and_alpha(g, px, py, means, conics, opacities):
    """The sparse path's float32 arithmetic: offset, exponent, unclamped and clamped alpha."""
    dx = means[g, 0] - px
    dy = means[g, 1] - py
    power = -HALF * (conics[g, 0] * dx * dx + conics[g, 2] * dy * dy) - conics[g, 1] * dx * dy
    raw = opacities[g] * np.exp(power)
    return dx, dy, power, raw, min(ALPHA_MAX32, raw)


@numba.njit(cache=True, nogil=True, parallel=True)
def _forward(starts, ids, means, conics, opacities, features, width):
    pixels = starts.size - 1
    channels = features.shape[1]
    out = np.zeros((pixels, channels), np.float32)
    final = np.ones(pixels, np.float64)
    ends = np.zeros(pixels, np.int64)  # one past the last composited entry of each pixel's list
    for p in numba.prange(pixels):
        px = F32(p % width) + HALF
        py = F32(p // width) + HALF
        t = 1.0
        end = starts[p]
        for k in range(starts[p], starts[p + 1]):
            g = ids[k]
            dx, dy, power, raw, alpha = _power_and_alpha(g, px, py, means, conics, opacities)
            if power > 0 or alpha < ALPHA_MIN32:
                continue
            after = t * (1.0 - alpha)
            if after < TRANSMITTANCE_MIN:
                break
            weight = alpha * t
            for c in range(channels):
                out[p, c] += features[g, c] * weight
            t = after
            end = k + 1
        final[p] = t
        ends[p] = end
    return out, final, ends


@numba.njit(cache=True, nogil=True, parallel=True)
def _backward(starts, ends, ids, final, grad_out, grad_final, means, conics, opacities, features, width, chunks):
    """dL/d(means2d, conics, opacities, features). Chunk c takes rows c, c + chunks, ... into a buffer of its
    own; the buffers are summed in a fixed order, so the result does not depend on the threads' schedule."""
    num, channels = features.shape
    rows = (starts.size - 1) // width
    g_means = np.zeros((chunks, num, 2), np.float64)
    g_conics = np.zeros((chunks, num, 3), np.float64)
    g_opacity = np.zeros((chunks, num), np.float64)
    g_features = np.zeros((chunks, num, channels), np.float64)
    for chunk in numba.prange(chunks):
        behind = np.zeros(channels, np.float64)  # sum of weight * feature of the Gaussians behind
        for row in range(chunk, rows, chunks):
            for p in range(row * width, (row + 1) * width):
                px = F32(p % width) + HALF
                py = F32(row) + HALF
                t_final = final[p]
                t = t_final
                behind[:] = 0.0
                for k in range(ends[p] - 1, starts[p] - 1, -1):
                    g = ids[k]
                    dx, dy, power, raw, alpha = _power_and_alpha(g, px, py, means, conics, opacities)
                    if power > 0 or alpha < ALPHA_MIN32:
                        continue
                    t = t / (1.0 - alpha)  # the transmittance in front of this Gaussian
                    weight = alpha * t
                    d_alpha = -grad_final[p] * t_final / (1.0 - alpha)
                    for c in range(channels):
                        g_features[chunk, g, c] += weight * grad_out[p, c]
                        d_alpha += (features[g, c] * t - behind[c] / (1.0 - alpha)) * grad_out[p, c]
                        behind[c] += features[g, c] * weight
                    if raw > ALPHA_MAX32:
                        continue  # clamped: alpha does not depend on the opacity or the position here
                    g_opacity[chunk, g] += d_alpha * np.exp(power)
                    d_power = d_alpha * alpha
                    g_means[chunk, g, 0] -= d_power * (conics[g, 0] * dx + conics[g, 1] * dy)
                    g_means[chunk, g, 1] -= d_power * (conics[g, 2] * dy + conics[g, 1] * dx)
                    g_conics[chunk, g, 0] -= d_power * 0.5 * dx * dx
                    g_conics[chunk, g, 1] -= d_power * dx * dy
                    g_conics[chunk, g, 2] -= d_power * 0.5 * dy * dy
    return g_means.sum(0), g_conics.sum(0), g_opacity.sum(0), g_features.sum(0)


def _boxes(proj: Projection, opacities: torch.Tensor, b: int, width: int, height: int):
    """Camera ``b``'s visible Gaussians front to back (stable in depth) and the pixel box of every Gaussian
    (:func:`~ophav_gaussians.raster.projection.pixel_boxes`; indexed by Gaussian, only the visible ones' are
    read)."""
    vis = torch.nonzero(proj.visible[b]).squeeze(1)
    order = vis[torch.sort(proj.depths[b].detach().index_select(0, vis), stable=True).indices]
    every = torch.arange(proj.depths.shape[1])
    return (order.numpy(),) + tuple(t.numpy() for t in pixel_boxes(proj, opacities, b, every, width, height))


def _array(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).numpy())


class _Composite(torch.autograd.Function):
    """One camera: (means2d (N,2), conics (N,3), opacities (N,), features (N,C)) -> ((H*W,C), (H*W,))."""

    @staticmethod
    def forward(ctx, means2d, conics, opacities, features, starts, ids, width, height):
        arrays = [_array(t) for t in (means2d, conics, opacities, features)]
        out, final, ends = _forward(starts, ids, *arrays, width)
        ctx.saved = (starts, ids, ends, final, arrays, width)
        return torch.from_numpy(out), torch.from_numpy(final.astype(np.float32))

    @staticmethod
    def backward(ctx, grad_out, grad_final):
        starts, ids, ends, final, arrays, width = ctx.saved
        grad_out = np.zeros((starts.size - 1, arrays[3].shape[1]), np.float32) if grad_out is None else \
            np.ascontiguousarray(grad_out.to(torch.float32).numpy())
        grad_final = np.zeros(starts.size - 1, np.float32) if grad_final is None else \
            np.ascontiguousarray(grad_final.to(torch.float32).numpy())
        chunks = numba.get_num_threads()
        grads = _backward(starts, ends, ids, final, grad_out, grad_final, *arrays, width, chunks)
        return tuple(torch.from_numpy(g.astype(np.float32)) for g in grads) + (None, None, None, None)


def composite_numba(proj: Projection, opacities: torch.Tensor, features: torch.Tensor, width: int, height: int):
    """(B, H, W, C) composited features and (B, H, W) final transmittance, as
    :func:`ophav_gaussians.sparse.composite_sparse` returns them."""
    images, transmittances = [], []
    for b in range(proj.depths.shape[0]):
        with torch.no_grad():
            order, x0, x1, y0, y1 = _boxes(proj, opacities, b, width, height)
            starts, ids = _pixel_lists(order, x0, x1, y0, y1, width, height)
        out, final = _Composite.apply(proj.means2d[b], proj.conics[b], opacities, features[b], starts, ids,
                                      width, height)
        images.append(out.view(height, width, -1))
        transmittances.append(final.view(height, width))
    return torch.stack(images), torch.stack(transmittances)
