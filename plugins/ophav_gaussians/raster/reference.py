"""Reference rasteriser in plain PyTorch: per 16x16 tile, the tile's depth-sorted Gaussians composited front to
back with autograd for the gradients. Slow (a Python loop over tiles) but simple; the CPU tests and small
images use it, and the fast paths are checked against it.

The compositing rule is 3DGS's: ``alpha = min(0.99, opacity * exp(-0.5 d^T conic d))``; a Gaussian with
``alpha < 1/255`` is skipped; a pixel stops at the first Gaussian that would take its transmittance below
1e-4 (that Gaussian is not composited). Expressed with cumulative products over the tile list instead of a
sequential loop: the transmittance after each Gaussian is non-increasing along the list, so "stopped" is a
suffix of the list and can be masked out in one go.
"""
from __future__ import annotations

import torch

from .projection import ALPHA_MAX, ALPHA_MIN, TILE, TRANSMITTANCE_MIN, Projection


def composite_pixels(pix: torch.Tensor, means2d, conics, opacities, features):
    """Composite K depth-sorted Gaussians over P pixels: (P, C) features and (P,) final transmittance.

    pix (P, 2) pixel centres; means2d (K, 2); conics (K, 3); opacities (K,); features (K, C).
    """
    d = means2d[None, :, :] - pix[:, None, :]  # (P, K, 2)
    dx, dy = d[..., 0], d[..., 1]
    power = -0.5 * (conics[:, 0] * dx * dx + conics[:, 2] * dy * dy) - conics[:, 1] * dx * dy
    alpha = torch.clamp(opacities * torch.exp(power), max=ALPHA_MAX)
    usable = (power <= 0) & (alpha >= ALPHA_MIN)
    alpha = torch.where(usable, alpha, torch.zeros_like(alpha))
    with torch.no_grad():
        kept = usable & (torch.cumprod(1 - alpha, dim=1) >= TRANSMITTANCE_MIN)
    alpha = torch.where(kept, alpha, torch.zeros_like(alpha))
    after = torch.cumprod(1 - alpha, dim=1)
    before = torch.cat([torch.ones_like(after[:, :1]), after[:, :-1]], dim=1)
    weights = alpha * before
    # An empty list still returns tensors attached to the inputs' graph (so a frame with nothing visible
    # back-propagates zeros instead of failing).
    final = after[:, -1] if after.shape[1] else torch.prod(1 - alpha, dim=1)
    return weights @ features, final


def rasterize_reference(proj: Projection, opacities: torch.Tensor, features: torch.Tensor, width: int, height: int):
    """Rasterise B cameras' projected Gaussians: (B, H, W, C) composited features, (B, H, W) transmittance.

    opacities (N,); features (B, N, C).
    """
    batch, num = proj.depths.shape
    dtype, device = proj.means2d.dtype, proj.means2d.device
    channels = features.shape[-1]
    images, transmittances = [], []
    for b in range(batch):
        depth = torch.where(proj.visible[b], proj.depths[b].detach(), torch.full_like(proj.depths[b], float("inf")))
        order = torch.sort(depth, stable=True).indices
        order = order[proj.visible[b][order]]
        box = proj.tile_box[b][order]
        rows, rows_t = [], []
        for ty, y_start in enumerate(range(0, height, TILE)):
            row, row_t = [], []
            for tx, x_start in enumerate(range(0, width, TILE)):
                tile_h, tile_w = min(TILE, height - y_start), min(TILE, width - x_start)
                ids = order[(box[:, 0] <= tx) & (box[:, 1] >= tx) & (box[:, 2] <= ty) & (box[:, 3] >= ty)]
                ys = torch.arange(y_start, y_start + tile_h, device=device, dtype=dtype) + 0.5
                xs = torch.arange(x_start, x_start + tile_w, device=device, dtype=dtype) + 0.5
                pix = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)
                color, trans = composite_pixels(pix, proj.means2d[b, ids], proj.conics[b, ids], opacities[ids],
                                                features[b, ids])
                row.append(color.reshape(tile_h, tile_w, channels))
                row_t.append(trans.reshape(tile_h, tile_w))
            rows.append(torch.cat(row, dim=1))
            rows_t.append(torch.cat(row_t, dim=1))
        images.append(torch.cat(rows, dim=0))
        transmittances.append(torch.cat(rows_t, dim=0))
    return torch.stack(images), torch.stack(transmittances)
