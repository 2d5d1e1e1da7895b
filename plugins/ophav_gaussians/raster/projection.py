"""Per-Gaussian EWA projection (pure PyTorch, shared by every rasteriser backend) and tile binning.

Conventions (the same as gsplat's): the world->camera matrix is OpenCV's (x right, y down, z forward),
``K`` maps camera coordinates to pixels, and the centre of pixel ``(i, j)`` (column ``i``, row ``j``) lies at
``(i + 0.5, j + 0.5)``. A Gaussian's screen-space footprint is bounded where its alpha falls below the
compositing threshold (``opacity * exp(-0.5 m^2) = 1/255``), not at a fixed 3 sigma: every pixel outside
that box would skip the Gaussian anyway, so what a pixel shows does not depend on the tiling, and the tiled
rasterisers can be checked against a brute-force per-pixel loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TILE = 16
LOW_PASS = 0.3  # px^2 added to the 2D covariance (3DGS's screen-space dilation)
ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
TRANSMITTANCE_MIN = 1e-4


@dataclass
class Projection:
    """Screen-space Gaussians for B cameras; every field is (B, N, ...)."""

    means2d: torch.Tensor  # (B, N, 2) pixels, differentiable
    conics: torch.Tensor  # (B, N, 3) inverse 2D covariance (a, b, c): d^T [[a, b], [b, c]] d
    depths: torch.Tensor  # (B, N) camera z, differentiable
    radii: torch.Tensor  # (B, N) int32, 0 = culled
    tile_box: torch.Tensor  # (B, N, 4) int64 inclusive tile range x0, x1, y0, y1 (empty when culled)
    visible: torch.Tensor  # (B, N) bool


def quaternion_to_matrix(quats: torch.Tensor) -> torch.Tensor:
    """(N, 4) wxyz, any norm -> (N, 3, 3) rotation."""
    w, x, y, z = (quats / quats.norm(dim=-1, keepdim=True)).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(*quats.shape[:-1], 3, 3)


def project_gaussians(means, quats, scales, opacities, viewmats, Ks, width: int, height: int,
                      near: float = 0.01, far: float = 100.0) -> Projection:
    """EWA splatting of N world-space Gaussians into B pinhole cameras."""
    rot = viewmats[:, :3, :3]
    p_cam = torch.einsum("bij,nj->bni", rot, means) + viewmats[:, None, :3, 3]
    x, y, z = p_cam.unbind(-1)
    in_range = (z > near) & (z < far)
    # Culled Gaussians still go through the arithmetic (no data-dependent shapes); a safe z keeps their
    # values, and hence every gradient, finite.
    z_safe = torch.where(in_range, z, torch.ones_like(z))
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    means2d = torch.stack([fx * x / z_safe + cx, fy * y / z_safe + cy], dim=-1)

    # The Jacobian is evaluated at a position clamped to a bit beyond the view frustum (3DGS, gsplat): far
    # off-screen Gaussians would otherwise get huge, badly conditioned footprints.
    margin_x, margin_y = 0.3 * 0.5 * width / fx, 0.3 * 0.5 * height / fy
    tx = z_safe * torch.maximum(torch.minimum(x / z_safe, (width - cx) / fx + margin_x), -cx / fx - margin_x)
    ty = z_safe * torch.maximum(torch.minimum(y / z_safe, (height - cy) / fy + margin_y), -cy / fy - margin_y)
    zero = torch.zeros_like(z_safe)
    jac = torch.stack([fx / z_safe, zero, -fx * tx / z_safe ** 2,
                       zero, fy / z_safe, -fy * ty / z_safe ** 2], dim=-1).reshape(*z.shape, 2, 3)

    rs = quaternion_to_matrix(quats) * scales[:, None, :]  # R diag(s)
    jw = jac @ rot[:, None]  # (B, N, 2, 3)
    t = jw @ rs[None]  # J W R S: cov2d = t t^T
    cov_a = (t[..., 0, :] ** 2).sum(-1) + LOW_PASS
    cov_b = (t[..., 0, :] * t[..., 1, :]).sum(-1)
    cov_c = (t[..., 1, :] ** 2).sum(-1) + LOW_PASS
    det = cov_a * cov_c - cov_b ** 2
    det_safe = torch.where(det > 0, det, torch.ones_like(det))
    conics = torch.stack([cov_c / det_safe, -cov_b / det_safe, cov_a / det_safe], dim=-1)

    with torch.no_grad():
        # Mahalanobis radius where alpha reaches the threshold; at most sqrt(2 ln 255) = 3.33 sigma.
        opacity = opacities.detach().to(z.dtype).expand_as(z)
        extent = torch.sqrt(2.0 * torch.log((opacity / ALPHA_MIN).clamp(min=1.0)))
        half_x = extent * cov_a.detach().sqrt()  # the ellipse's bounding box is +-extent * sqrt(diag)
        half_y = extent * cov_c.detach().sqrt()
        mid = 0.5 * (cov_a + cov_c).detach()
        lambda_max = mid + torch.sqrt((mid * mid - det.detach()).clamp(min=0.1))
        radius = torch.ceil(extent * lambda_max.sqrt())
        mx, my = means2d.detach().unbind(-1)
        tiles_x, tiles_y = math.ceil(width / TILE), math.ceil(height / TILE)
        x0 = torch.floor((mx - half_x) / TILE).clamp(0, tiles_x - 1)
        x1 = torch.floor((mx + half_x) / TILE).clamp(-1, tiles_x - 1)
        y0 = torch.floor((my - half_y) / TILE).clamp(0, tiles_y - 1)
        y1 = torch.floor((my + half_y) / TILE).clamp(-1, tiles_y - 1)
        on_screen = (mx + half_x >= 0) & (mx - half_x <= width) & (my + half_y >= 0) & (my - half_y <= height)
        visible = in_range & (det > 0) & (opacity > ALPHA_MIN) & on_screen & (x0 <= x1) & (y0 <= y1)
        radii = torch.where(visible, radius, torch.zeros_like(radius)).to(torch.int32)
        # Culled: an empty range (x1 < x0). Built with where(), not from a host tensor (a host->device copy
        # would stall the stream).
        empty = torch.full_like(x0, -1.0)
        tile_box = torch.stack([torch.where(visible, x0, torch.zeros_like(x0)), torch.where(visible, x1, empty),
                                torch.where(visible, y0, torch.zeros_like(y0)), torch.where(visible, y1, empty)],
                               dim=-1).to(torch.int64)
    return Projection(means2d, conics, z, radii, tile_box, visible)


def pixel_boxes(proj: Projection, opacities: torch.Tensor, b: int, vis: torch.Tensor, width: int, height: int):
    """Inclusive pixel boxes (x0, x1, y0, y1, int64) of camera ``b``'s Gaussians ``vis``: the pixel centres where
    each one's alpha can reach 1/255. Empty (x1 < x0 or y1 < y0) where none can."""
    with torch.no_grad():
        mx, my = proj.means2d[b, vis].detach().unbind(-1)
        conic = proj.conics[b, vis].detach()
        det = (conic[:, 0] * conic[:, 2] - conic[:, 1] ** 2).clamp_min(1e-20)
        cov_a, cov_c = conic[:, 2] / det, conic[:, 0] / det  # the conic's inverse: the 2D covariance diagonal
        # beyond this many sigma opacity * exp(-m^2 / 2) < 1/255 (the projection's bound)
        extent = torch.sqrt(2.0 * torch.log((opacities.detach()[vis] / ALPHA_MIN).clamp(min=1.0)))
        hx, hy = extent * cov_a.sqrt(), extent * cov_c.sqrt()
        x0 = torch.ceil(mx - hx - 0.5).clamp(0, width - 1).long()
        x1 = torch.floor(mx + hx - 0.5).clamp(-1, width - 1).long()
        y0 = torch.ceil(my - hy - 0.5).clamp(0, height - 1).long()
        y1 = torch.floor(my + hy - 0.5).clamp(-1, height - 1).long()
        return x0, x1, y0, y1


@dataclass
class TileLists:
    """Gaussian-tile intersections sorted by (camera, tile, depth)."""

    gaussian_ids: torch.Tensor  # (M,) int32 flat index b * N + n
    ranges: torch.Tensor  # (B * tiles + 1,) int32: tile t's list is gaussian_ids[ranges[t]:ranges[t + 1]]
    tiles_x: int
    tiles_y: int


def bin_gaussians(proj: Projection, width: int, height: int) -> TileLists:
    """Duplicate each visible Gaussian into the tiles its box covers and sort by tile then depth.

    One host sync (the number of intersections, to size the buffers); everything else stays on the device.
    """
    batch, num = proj.depths.shape
    tiles_x, tiles_y = math.ceil(width / TILE), math.ceil(height / TILE)
    tiles_per_image = tiles_x * tiles_y
    device = proj.depths.device
    box = proj.tile_box.reshape(-1, 4)
    span_x = (box[:, 1] - box[:, 0] + 1).clamp(min=0)
    span_y = (box[:, 3] - box[:, 2] + 1).clamp(min=0)
    counts = span_x * span_y
    ends = torch.cumsum(counts, 0)
    total = int(ends[-1]) if counts.numel() else 0
    if total == 0:
        ranges = torch.zeros(batch * tiles_per_image + 1, dtype=torch.int32, device=device)
        return TileLists(torch.zeros(0, dtype=torch.int32, device=device), ranges, tiles_x, tiles_y)
    flat = torch.repeat_interleave(torch.arange(batch * num, device=device), counts, output_size=total)
    local = torch.arange(total, device=device) - (ends - counts)[flat]
    width_of = span_x[flat]
    tile_x = box[flat, 0] + local % width_of
    tile_y = box[flat, 2] + local // width_of
    tile = (flat // num) * tiles_per_image + tile_y * tiles_x + tile_x
    # Positive float32 depths sort like their bit patterns: one int64 key of (tile, depth).
    depth_bits = proj.depths.detach().float().reshape(-1).contiguous().view(torch.int32).to(torch.int64)
    key = (tile << 32) | depth_bits[flat]
    key, order = torch.sort(key, stable=True)  # stable: equal depths keep the Gaussian order
    boundaries = torch.arange(batch * tiles_per_image + 1, device=device, dtype=torch.int64)
    ranges = torch.searchsorted(key >> 32, boundaries).to(torch.int32)
    return TileLists(flat[order].to(torch.int32), ranges, tiles_x, tiles_y)
