"""Rays, empty-space skipping and volume rendering.

Rays live in a frame's *unposed* head space (origin ``-R^T t``, direction ``R^T K^-1 [u, v, 1]``), so the ray
box is the head's axis-aligned box in head space (an oriented box in the camera) and the ray parameter ``t``
is the camera depth z (directions have z = 1 in the camera). Distances in the density integral are measured in
units of the head cube's side, so densities do not depend on the tracker's length unit.

Training evaluates ``S`` stratified samples per ray, skips those in empty occupancy voxels, evaluates the field
on the packed remainder only and composites in a dense (rays, S) layout (an exact per-ray cumulative sum).
Rendering marches ``block`` samples at a time and drops rays whose transmittance fell below a threshold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from ophav_insta.deform import rotate

# ---------------------------------------------------------------------------------------------- rays


@dataclass
class Rays:
    """origin/direction (R, 3) in unposed head space; frame (R,) index into the batch's frame data;
    near/far (R,) ray parameters (camera z) of the head box; hit (R,) whether the ray meets the box."""

    origin: torch.Tensor
    direction: torch.Tensor
    frame: torch.Tensor
    near: torch.Tensor
    far: torch.Tensor
    hit: torch.Tensor

    def __len__(self) -> int:
        return int(self.origin.shape[0])

    def index(self, idx: torch.Tensor) -> "Rays":
        return Rays(self.origin[idx], self.direction[idx], self.frame[idx], self.near[idx], self.far[idx], self.hit[idx])


def make_rays(u: torch.Tensor, v: torch.Tensor, frame: torch.Tensor, K_inv: torch.Tensor, rotation: torch.Tensor,
              translation: torch.Tensor, box_min: torch.Tensor, box_max: torch.Tensor) -> Rays:
    """Rays through pixel centres (u, v) (R,) of frames ``frame`` (R,); K_inv (B, 3, 3), rotation (B, 3, 3),
    translation (B, 3) per batch frame."""
    pix = torch.stack([u.float(), v.float(), torch.ones_like(u, dtype=torch.float32)], dim=-1)
    d_cam = rotate(K_inv[frame], pix)
    d_cam = d_cam / d_cam[:, 2:3]  # z = 1: the ray parameter is the camera depth
    rot_t = rotation[frame].transpose(1, 2)
    direction = rotate(rot_t, d_cam)
    origin = -rotate(rot_t, translation[frame])
    near, far, hit = ray_box(origin, direction, box_min, box_max)
    return Rays(origin, direction, frame, near, far, hit)


def ray_box(origin: torch.Tensor, direction: torch.Tensor, box_min: torch.Tensor, box_max: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slab test: entry/exit parameters (clamped to t >= 0) and whether the ray meets the box."""
    safe = torch.where(direction.abs() < 1e-9, torch.full_like(direction, 1e-9), direction)
    inv = 1.0 / safe
    t0, t1 = (box_min - origin) * inv, (box_max - origin) * inv
    near = torch.minimum(t0, t1).amax(dim=-1).clamp_min(0.0)
    far = torch.maximum(t0, t1).amin(dim=-1)
    hit = far > near
    return near, torch.where(hit, far, near), hit


# ---------------------------------------------------------------------------------------------- occupancy


class OccupancyGrid:
    """Densities on a res^3 grid over the head cube (canonical space), and the occupied voxels dilated by
    ``dilation`` voxels. Lookups use the unposed point, not the canonical one (which needs the deformation):
    the dilation covers the largest expression displacement, so the test stays conservative."""

    def __init__(self, resolution: int, cube_min: torch.Tensor, cube_side: float, dilation: int = 1):
        self.resolution, self.cube_min, self.cube_side, self.dilation = resolution, cube_min, float(cube_side), dilation
        device = cube_min.device
        self.density = torch.zeros(resolution ** 3, device=device)
        self.occupied = torch.ones(resolution ** 3, dtype=torch.bool, device=device)
        self.surface = torch.zeros(resolution ** 3, dtype=torch.bool, device=device)
        self.active = False  # False: everything counts as occupied (warm-up)

    def mark_surface(self, points: torch.Tensor) -> None:
        """Voxels holding these head-space points (the canonical mesh) always count as occupied, so the face
        keeps getting samples (and gradients) even if an early update finds its density still low."""
        rel = (points - self.cube_min) / self.cube_side
        res = self.resolution
        cell = (rel[((rel >= 0) & (rel < 1)).all(dim=-1)] * res).floor().long()
        surface = torch.zeros(res ** 3, dtype=torch.bool, device=self.density.device)
        surface[cell[:, 0] + res * (cell[:, 1] + res * cell[:, 2])] = True
        self.surface = surface

    def lookup(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) bool for points (N, 3) in head space; points outside the cube are empty."""
        rel = (x - self.cube_min) / self.cube_side
        inside = ((rel >= 0) & (rel < 1)).all(dim=-1)
        if not self.active:
            return inside
        res = self.resolution
        cell = (rel * res).floor().long().clamp(0, res - 1)
        flat = cell[:, 0] + res * (cell[:, 1] + res * cell[:, 2])
        return inside & self.occupied[flat]

    def cell_points(self, generator: torch.Generator | None, jitter: bool) -> torch.Tensor:
        """One point per voxel in unit-cube coordinates (N, 3), x fastest."""
        res, device = self.resolution, self.density.device
        idx = torch.arange(res ** 3, device=device)
        cell = torch.stack([idx % res, (idx // res) % res, idx // (res * res)], dim=-1).float()
        if jitter:  # the generator lives on the grid's device
            offset = torch.rand(cell.shape, generator=generator, device=device)
        else:
            offset = torch.full_like(cell, 0.5)
        return (cell + offset) / res

    @torch.no_grad()
    def update(self, density_fn: Callable[[torch.Tensor], torch.Tensor], step: float, threshold: float,
               decay: float, generator: torch.Generator | None = None, jitter: bool = True, activate: bool = True,
               chunk: int = 1 << 18) -> None:
        """density_fn: unit-cube points (N, 3) -> densities (N,) in cube units; ``step``: the sample spacing in
        cube units (a voxel is occupied when one sample there would be more opaque than ``threshold``)."""
        points = self.cell_points(generator, jitter)
        fresh = torch.cat([density_fn(points[i:i + chunk]).float() for i in range(0, points.shape[0], chunk)])
        self.density = torch.maximum(self.density * decay, fresh)
        opaque = ((1.0 - torch.exp(-self.density * step)) > threshold) | self.surface
        res, r = self.resolution, self.dilation
        grid = opaque.view(1, 1, res, res, res).float()
        if r > 0:
            grid = F.max_pool3d(grid, kernel_size=2 * r + 1, stride=1, padding=r)
        self.occupied = grid.view(-1) > 0
        self.active = self.active or activate

    def fraction(self) -> float:
        return float(self.occupied.float().mean()) if self.active else 1.0

    def state(self) -> dict:
        return {"density": self.density.cpu(), "occupied": self.occupied.cpu(), "active": bool(self.active),
                "dilation": int(self.dilation)}

    def load_state(self, state: dict) -> None:
        self.density = state["density"].to(self.cube_min.device).float()
        self.occupied = state["occupied"].to(self.cube_min.device).bool()
        self.active, self.dilation = bool(state["active"]), int(state["dilation"])


# ---------------------------------------------------------------------------------------------- compositing


class FieldFn(Protocol):
    def __call__(self, x: torch.Tensor, frame: torch.Tensor, direction: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unposed points (M, 3), batch frames (M,), directions (M, 3) -> density (M,) in cube units, rgb (M, 3)."""


@dataclass
class RayOutput:
    rgb: torch.Tensor  # (R, 3), not composited over the background
    opacity: torch.Tensor  # (R,)
    depth: torch.Tensor  # (R,) sum of weight * t (divide by opacity for the expected depth)
    weights: torch.Tensor | None = None  # (R, S) training only
    samples: int = 0  # field evaluations


def composite(sigma_delta: torch.Tensor, rgb: torch.Tensor, t: torch.Tensor, log_transmittance: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Alpha compositing of (R, S) optical thicknesses and (R, S, 3) colours; ``log_transmittance`` (R,) is
    what earlier segments of the rays absorbed. Returns weights, rgb, opacity, depth sum and the total
    optical thickness of the segment."""
    total = torch.cumsum(sigma_delta, dim=1)
    before = total - sigma_delta
    if log_transmittance is not None:
        before = before + log_transmittance[:, None]
    weights = torch.exp(-before) * (1.0 - torch.exp(-sigma_delta))
    out_rgb = (weights[..., None] * rgb).sum(dim=1)
    return weights, out_rgb, weights.sum(dim=1), (weights * t).sum(dim=1), total[:, -1]


def sample_segment(rays: Rays, start: int, stop: int, count: int, jitter: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray parameters (R, stop - start) of samples ``start..stop`` out of ``count`` spread over [near, far],
    and the sample spacing (R,) in head-space length."""
    k = torch.arange(start, stop, device=rays.origin.device, dtype=torch.float32)
    offset = jitter if jitter is not None else 0.5
    span = rays.far - rays.near
    t = rays.near[:, None] + (k[None] + offset) / count * span[:, None]
    return t, span / count * rays.direction.norm(dim=-1)


def _evaluate_segment(field: FieldFn, occupancy: OccupancyGrid, rays: Rays, t: torch.Tensor, delta: torch.Tensor,
                      cube_side: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Optical thickness (R, S) and colours (R, S, 3) of the samples ``t``; empty voxels are skipped."""
    num_rays, num_samples = t.shape
    x = rays.origin[:, None, :] + t[..., None] * rays.direction[:, None, :]
    flat_x = x.reshape(-1, 3)
    keep = occupancy.lookup(flat_x) & rays.hit.repeat_interleave(num_samples)
    idx = keep.nonzero().squeeze(1)
    ray_of = torch.div(idx, num_samples, rounding_mode="floor")
    sigma, rgb = field(flat_x[idx], rays.frame[ray_of], rays.direction[ray_of])
    thickness = sigma.float() * (delta[ray_of] / cube_side)
    total = num_rays * num_samples
    sigma_delta = torch.zeros(total, device=t.device, dtype=torch.float32).index_copy(0, idx, thickness)
    colours = torch.zeros(total, 3, device=t.device, dtype=torch.float32).index_copy(0, idx, rgb.float())
    return sigma_delta.view(num_rays, num_samples), colours.view(num_rays, num_samples, 3), int(idx.numel())


def march_train(field: FieldFn, occupancy: OccupancyGrid, rays: Rays, num_samples: int, cube_side: float,
                generator: torch.Generator | None) -> RayOutput:
    """All samples at once (stratified jitter), weights kept for the regularisers."""
    jitter = torch.rand(len(rays), num_samples, generator=generator, device=rays.origin.device)
    t, delta = sample_segment(rays, 0, num_samples, num_samples, jitter)
    sigma_delta, colours, count = _evaluate_segment(field, occupancy, rays, t, delta, cube_side)
    weights, rgb, opacity, depth, _ = composite(sigma_delta, colours, t)
    return RayOutput(rgb, opacity, depth, weights, count)


@torch.no_grad()
def march_render(field: FieldFn, occupancy: OccupancyGrid, rays: Rays, num_samples: int, cube_side: float,
                 block: int, min_transmittance: float) -> RayOutput:
    """Front to back in blocks of samples; rays stop when their transmittance drops below the threshold."""
    device, num = rays.origin.device, len(rays)
    rgb = torch.zeros(num, 3, device=device)
    opacity = torch.zeros(num, device=device)
    depth = torch.zeros(num, device=device)
    log_t = torch.zeros(num, device=device)
    alive = rays.hit.nonzero().squeeze(1)
    stop_log_t = -torch.log(torch.tensor(max(min_transmittance, 1e-30))).item()
    count = 0
    for start in range(0, num_samples, block):
        if alive.numel() == 0:
            break
        sub = rays.index(alive)
        t, delta = sample_segment(sub, start, min(start + block, num_samples), num_samples, None)
        sigma_delta, colours, n = _evaluate_segment(field, occupancy, sub, t, delta, cube_side)
        count += n
        if n == 0:
            continue
        _, seg_rgb, seg_opacity, seg_depth, seg_total = composite(sigma_delta, colours, t, log_t[alive])
        rgb.index_add_(0, alive, seg_rgb)
        opacity.index_add_(0, alive, seg_opacity)
        depth.index_add_(0, alive, seg_depth)
        log_t.index_add_(0, alive, seg_total)
        alive = alive[log_t[alive] < stop_log_t]
    return RayOutput(rgb, opacity, depth, None, count)


# ---------------------------------------------------------------------------------------------- regularisers


def distortion_loss(weights: torch.Tensor) -> torch.Tensor:
    """mip-NeRF 360 distortion of (R, S) weights on equal intervals of the normalised ray [0, 1], in O(S)
    with prefix sums: sum_ij w_i w_j |s_i - s_j| + sum_i w_i^2 / (3 S). Returns (R,)."""
    num = weights.shape[1]
    s = (torch.arange(num, device=weights.device, dtype=weights.dtype) + 0.5) / num
    ws = weights * s
    w_before = torch.cumsum(weights, dim=1) - weights
    ws_before = torch.cumsum(ws, dim=1) - ws
    inter = 2.0 * (weights * (s * w_before - ws_before)).sum(dim=1)
    intra = (weights ** 2).sum(dim=1) / (3.0 * num)
    return inter + intra


def opacity_entropy(opacity: torch.Tensor) -> torch.Tensor:
    a = opacity.clamp(1e-5, 1 - 1e-5)
    return -(a * torch.log(a) + (1 - a) * torch.log(1 - a))
