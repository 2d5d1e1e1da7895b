"""Rays, empty-space skipping and volume rendering.

Rays live in a frame's *unposed* head space (origin ``-R^T t``, direction ``R^T K^-1 [u, v, 1]``), so the ray
box is the head's axis-aligned box in head space (an oriented box in the camera) and the ray parameter ``t``
is the camera depth z (directions have z = 1 in the camera). Distances in the density integral are measured in
units of the head cube's side, so densities do not depend on the tracker's length unit.

Training evaluates ``S`` stratified samples per ray, skips those in empty occupancy voxels, evaluates the field
on the packed remainder only and composites in a dense (rays, S) layout (an exact per-ray cumulative sum). On a
GPU the packing has a fixed capacity, so a training step never waits for the GPU (see :func:`pack`).
Rendering tests all samples against the occupancy grid first, then evaluates the field on occupied samples only,
a growing window of them per ray and round, dropping rays that became opaque between rounds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ophav_insta.deform import rotate
from ophav_insta.phases import phase

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


@dataclass
class Cameras:
    """Per frame (B): ``to_head`` (B, 3, 3) = R^T K^-1 (pixel [u, v, 1] -> head-space direction), ``origin``
    (B, 3) = -R^T t (camera centre in head space), ``z_row`` (B, 3) = the last row of K^-1 (camera z of a pixel's
    ray, divided out so that the ray parameter is the camera depth)."""

    to_head: torch.Tensor
    origin: torch.Tensor
    z_row: torch.Tensor

    @classmethod
    def build(cls, K_inv: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor) -> "Cameras":
        rot_t = rotation.transpose(1, 2)
        to_head = (rot_t[:, :, :, None] * K_inv[:, None, :, :]).sum(dim=2)  # elementwise: exact float32, no TF32
        return cls(to_head.contiguous(), -rotate(rot_t, translation), K_inv[:, 2].contiguous())


def make_rays(u: torch.Tensor, v: torch.Tensor, frame: torch.Tensor, K_inv: torch.Tensor, rotation: torch.Tensor,
              translation: torch.Tensor, box_min: torch.Tensor, box_max: torch.Tensor) -> Rays:
    """Rays through pixel centres (u, v) (R,) of frames ``frame`` (R,); K_inv (B, 3, 3), rotation (B, 3, 3),
    translation (B, 3) per frame."""
    return camera_rays(u, v, frame, Cameras.build(K_inv, rotation, translation), box_min, box_max)


def camera_rays(u: torch.Tensor, v: torch.Tensor, frame: torch.Tensor, cameras: Cameras, box_min: torch.Tensor,
                box_max: torch.Tensor) -> Rays:
    """Rays through pixel centres (u, v) (R,) of frames ``frame`` (R,) (indices into ``cameras``): one gather
    and one 3x3 product per ray (few kernels: this runs every training step)."""
    pix = torch.stack([u.float(), v.float(), torch.ones_like(u, dtype=torch.float32)], dim=-1)
    direction = rotate(cameras.to_head[frame], pix) / (cameras.z_row[frame] * pix).sum(dim=-1, keepdim=True)
    origin = cameras.origin[frame]
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


def dilate(grid: torch.Tensor, radius: int) -> torch.Tensor:
    """Max-filter of a (res, res, res) float grid over a (2r+1)^3 cube: three 1-D passes (separable)."""
    if radius <= 0:
        return grid
    k, g = 2 * radius + 1, grid[None, None]
    g = F.max_pool3d(g, (k, 1, 1), stride=1, padding=(radius, 0, 0))
    g = F.max_pool3d(g, (1, k, 1), stride=1, padding=(0, radius, 0))
    g = F.max_pool3d(g, (1, 1, k), stride=1, padding=(0, 0, radius))
    return g[0, 0]


def variable_dilation(opaque: torch.Tensor, radius: torch.Tensor, radii: list[int] | None = None) -> torch.Tensor:
    """(res^3,) bool: voxel x is occupied when an opaque voxel lies within ``radius[x]`` voxels (Chebyshev) of it.
    ``radii``: the values ``radius`` holds (computed here when None, which costs a host sync)."""
    res = round(opaque.numel() ** (1 / 3))
    grid = opaque.view(res, res, res).float()
    radius = radius.view(res, res, res)
    if radii is None:
        radii = present_radii(radius)
    occupied = torch.zeros_like(opaque).view(res, res, res)
    for r in radii:
        occupied |= (radius == r) & (dilate(grid, r) > 0)
    return occupied.view(-1)


def present_radii(radius: torch.Tensor) -> list[int]:
    return [int(r) for r in torch.unique(radius).tolist()]


@torch.no_grad()
def displacement_radius(canonical: torch.Tensor, meshes: torch.Tensor, faces: torch.Tensor, far: float,
                        cube_min: torch.Tensor, cube_side: float, resolution: int, cap: int = 4) -> torch.Tensor:
    """(res^3,) uint8: per voxel, how many voxels a point there can move between its unposed and canonical
    position, so the occupancy test of unposed points can stay conservative where the mesh moves and tight
    where it does not.

    The deformation maps a point within ``far`` of triangle j of an unposed mesh to the same barycentric point
    of the canonical triangle plus the same local offset, so it moves by at most
    ``max vertex displacement of j + 2 sin(theta_j / 2) * far`` (theta_j: the rotation between the triangle's
    two local frames); farther from every triangle it moves rigidly (not at all in head space). Each triangle's
    bound in voxels (at least 1, at most ``cap``) is spread to every voxel within ``far`` (+ the longest edge
    and a voxel) of its vertices. ``meshes``: (M, V, 3) unposed meshes (training frames, or one frame of a
    render) with the topology of ``canonical`` (V, 3)."""
    from ophav_insta.deform import triangle_frames

    res, voxel = int(resolution), float(cube_side) / int(resolution)
    meshes = meshes.reshape(-1, *canonical.shape).to(canonical)
    tri_c = canonical[faces]  # (F, 3, 3)
    frame_c = triangle_frames(tri_c[:, 0], tri_c[:, 1], tri_c[:, 2])  # (F, 3, 3)
    bound = torch.zeros(faces.shape[0], device=canonical.device)
    for mesh in meshes:  # one mesh at a time: bounded memory for long videos
        tri = mesh[faces]
        moved = (tri - tri_c).norm(dim=-1).amax(dim=-1)
        relative = triangle_frames(tri[:, 0], tri[:, 1], tri[:, 2]) @ frame_c.transpose(-1, -2)
        cos = ((relative.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0).clamp(-1.0, 1.0)
        turn = 2.0 * torch.sin(torch.acos(cos) / 2.0) * far
        bound = torch.maximum(bound, moved + turn)
    need = (bound / voxel).ceil().clamp(1, cap).to(torch.int64)  # (F,)
    edge = float((tri_c - tri_c.roll(1, dims=1)).norm(dim=-1).max())
    reach = int(np.ceil((far + edge) / voxel)) + 1
    radius = torch.ones(res, res, res, device=canonical.device)
    points_all = torch.cat([canonical[None], meshes])  # the triangles where they are, canonical and moved
    for r in range(2, int(need.max()) + 1):
        vertices = torch.unique(faces[need >= r].reshape(-1))
        if vertices.numel() == 0:
            continue
        cell = ((points_all[:, vertices].reshape(-1, 3) - cube_min) / cube_side * res).floor().long().clamp(0, res - 1)
        marks = torch.zeros(res, res, res, device=canonical.device)
        marks[cell[:, 2], cell[:, 1], cell[:, 0]] = 1.0  # grids are indexed [z, y, x] (x fastest when flat)
        radius = torch.maximum(radius, r * dilate(marks, reach))
    return radius.reshape(-1).to(torch.uint8)


class OccupancyGrid:
    """Densities on a res^3 grid over the head cube (canonical space), and the occupied voxels: the opaque ones
    dilated by ``radius`` voxels, which may vary per voxel (:func:`displacement_radius`). Lookups use the
    unposed point, not the canonical one (which needs the deformation): the dilation covers the expression
    displacement there, so the test stays conservative. :meth:`with_radius` re-dilates the same opaque voxels for
    one render frame's own displacement."""

    def __init__(self, resolution: int, cube_min: torch.Tensor, cube_side: float,
                 dilation: int | torch.Tensor = 1):
        self.resolution, self.cube_min, self.cube_side = resolution, cube_min, float(cube_side)
        device = cube_min.device
        if isinstance(dilation, torch.Tensor):
            self.radius = dilation.to(device=device, dtype=torch.uint8).reshape(-1)
        else:
            self.radius = torch.full((resolution ** 3,), int(dilation), dtype=torch.uint8, device=device)
        self.density = torch.zeros(resolution ** 3, device=device)
        self.occupied = torch.ones(resolution ** 3, dtype=torch.bool, device=device)
        self.opaque: torch.Tensor | None = None  # before dilation; None for checkpoints that did not store it
        self.surface = torch.zeros(resolution ** 3, dtype=torch.bool, device=device)
        # Voxels the training masks show empty (ophav_insta.train.carve_from_masks): never opaque, and renders
        # skip canonical points there. None: no carving.
        self.carved: torch.Tensor | None = None
        self.active = False  # False: everything counts as occupied (warm-up)

    @property
    def radius(self) -> torch.Tensor:
        return self._radius

    @radius.setter
    def radius(self, value: torch.Tensor) -> None:
        # The values it holds, read once here: an update then dilates without a host sync.
        self._radius, self._radii = value, present_radii(value)

    @property
    def dilation(self) -> int:
        return max(self._radii)

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
        # int32 truncation = floor inside the cube (outside, the clamped cell is masked by `inside`).
        cell = (rel * res).to(torch.int32).clamp_(0, res - 1)
        return inside & self.occupied[(cell * self._strides(x.device)).sum(dim=-1)]

    def _strides(self, device: torch.device) -> torch.Tensor:
        if getattr(self, "_stride_cache", None) is None or self._stride_cache.device != device:
            res = self.resolution
            self._stride_cache = torch.tensor([1, res, res * res], dtype=torch.int32, device=device)
        return self._stride_cache

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
        self.opaque = ((1.0 - torch.exp(-self.density * step)) > threshold) | self.surface
        if self.carved is not None:
            self.opaque &= ~self.carved
        # The unposed-space lookups dilate what is opaque by the expression displacement, carved voxels
        # included: a point an expression moves there has its canonical twin elsewhere.
        self.occupied = variable_dilation(self.opaque, self.radius, self._radii)
        self.active = self.active or activate

    def with_radius(self, radius: torch.Tensor) -> "OccupancyGrid":
        """The same opaque voxels dilated by another radius map (one render frame's displacement); ``self`` when
        the opaque voxels are not known (a checkpoint from before they were stored) or the grid is inactive."""
        if self.opaque is None or not self.active:
            return self
        grid = OccupancyGrid(self.resolution, self.cube_min, self.cube_side, radius)
        grid.density, grid.opaque, grid.surface, grid.active = self.density, self.opaque, self.surface, True
        grid.carved = self.carved
        grid.occupied = variable_dilation(self.opaque, grid.radius, grid._radii)
        return grid

    def canonical_test(self, margin: int = 1):
        """For renders: unit-cube canonical points (N, 3) -> (N,) bool, whether their voxel is within ``margin``
        voxels of an opaque one (the grid's densities are of the canonical field, so after the deformation no
        displacement dilation is needed; the margin covers what one jittered point per voxel can miss). None when
        the grid cannot tell (inactive, or no opaque voxels stored)."""
        if self.opaque is None or not self.active:
            return None
        res = self.resolution
        cached = getattr(self, "_near_cache", None)
        if cached is None or cached[0] is not self.opaque or cached[1] != margin or cached[2] is not self.carved:
            near = variable_dilation(self.opaque, torch.full_like(self.radius, margin), [margin])
            if self.carved is not None:  # canonical points: the carving applies exactly
                near &= ~self.carved
            self._near_cache = (self.opaque, margin, self.carved, near)
        near = self._near_cache[3]
        strides = self._strides(near.device)

        def test(unit: torch.Tensor) -> torch.Tensor:
            cell = (unit * res).to(torch.int32).clamp_(0, res - 1)
            return near[(cell * strides).sum(dim=-1)]
        return test

    def fraction(self) -> float:
        return float(self.occupied.float().mean()) if self.active else 1.0

    def state(self) -> dict:
        state = {"density": self.density.cpu(), "occupied": self.occupied.cpu(), "active": bool(self.active),
                 "dilation": self.dilation, "radius": self.radius.cpu()}
        if self.opaque is not None:
            state["opaque"] = self.opaque.cpu()
        if self.carved is not None:
            state["carved"] = self.carved.cpu()
        return state

    def load_state(self, state: dict) -> None:
        device = self.cube_min.device
        self.density = state["density"].to(device).float()
        self.occupied = state["occupied"].to(device).bool()
        self.active = bool(state["active"])
        self.opaque = state["opaque"].to(device).bool() if "opaque" in state else None
        self.carved = state["carved"].to(device).bool() if "carved" in state else None
        if "radius" in state and state["radius"].numel() == self.radius.numel():
            self.radius = state["radius"].to(device=device, dtype=torch.uint8)
        elif "radius" not in state:
            self.radius = torch.full_like(self.radius, int(state["dilation"]))


# ---------------------------------------------------------------------------------------------- compositing


class FieldFn(Protocol):
    def __call__(self, x: torch.Tensor, ray: torch.Tensor, rays: Rays) -> tuple[torch.Tensor, torch.Tensor]:
        """Unposed points (M, 3) on rays ``ray`` (M,) (indices into ``rays``) -> density (M,) in cube units,
        rgb (M, 3). Per-ray inputs (view direction, frame) come from ``rays``, so they are computed per ray."""


@dataclass
class RayOutput:
    rgb: torch.Tensor  # (R, 3), not composited over the background
    opacity: torch.Tensor  # (R,)
    depth: torch.Tensor  # (R,) sum of weight * t (divide by opacity for the expected depth)
    weights: torch.Tensor | None = None  # (R, S) training only
    samples: int | torch.Tensor = 0  # field evaluations of occupied samples (a device tensor: no sync)
    occupied: int | torch.Tensor = 0  # occupied samples found (more than ``samples`` when a capacity cut some)
    sigma_delta: torch.Tensor | None = None  # (R, S) training only: optical thickness per sample
    colours: torch.Tensor | None = None  # (R, S, 3) training only
    t: torch.Tensor | None = None  # (R, S) training only: sample parameters


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
    k = _arange(stop, rays.origin.device, torch.float32)[start:]
    offset = jitter if jitter is not None else 0.5
    span = rays.far - rays.near
    t = rays.near[:, None] + (k[None] + offset) / count * span[:, None]
    return t, span / count * rays.direction.norm(dim=-1)


_ARANGE: dict[tuple, torch.Tensor] = {}


def _arange(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A cached ``arange(n)``: the same constants every step, created once (no allocation or launch)."""
    key = (n, str(device), dtype)
    if key not in _ARANGE:
        if len(_ARANGE) > 64:
            _ARANGE.clear()
        _ARANGE[key] = torch.arange(n, device=device, dtype=dtype)
    return _ARANGE[key]


def pack(keep: torch.Tensor, capacity: int | None) -> tuple[torch.Tensor, int | torch.Tensor]:
    """Positions of the ``True`` entries of ``keep`` (T,), in order: (slots, count).

    ``capacity`` None: exactly the kept positions (``nonzero``: the host waits for the GPU to know how many),
    and their number as an int.
    ``capacity`` C: a fixed-size (C,) result without any host sync: the first C kept positions, padded with
    T (callers write padded results to a discarded slot T); ``count`` (a 0-d device tensor) may exceed C, and
    then the last kept positions are dropped. A stable sort puts the kept positions first in order."""
    total = keep.numel()
    if capacity is None:
        slots = keep.nonzero().squeeze(1)
        return slots, int(slots.numel())
    capacity = min(int(capacity), total)
    order = torch.sort((~keep).to(torch.uint8), stable=True).indices[:capacity]
    return torch.where(keep[order], order, total), keep.sum()


def evaluate_samples(field: FieldFn, occupancy: OccupancyGrid, rays: Rays, t: torch.Tensor, delta: torch.Tensor,
                     cube_side: float, capacity: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor, int | torch.Tensor]:
    """Optical thickness (R, S) and colours (R, S, 3) of the samples ``t`` (R, S); samples in empty voxels (or
    beyond ``capacity``, see :func:`pack`) are skipped and get zero thickness. Also returns the number of field
    evaluations and of occupied samples (ints without a capacity, 0-d device tensors with one)."""
    num_rays, num_samples = t.shape
    total = num_rays * num_samples
    with phase("occupancy lookup"):
        flat_x = (rays.origin[:, None, :] + t[..., None] * rays.direction[:, None, :]).reshape(-1, 3)
        keep = occupancy.lookup(flat_x) & rays.hit[:, None].expand(num_rays, num_samples).reshape(-1)
        slots, occupied = pack(keep, capacity)
        sample = slots.clamp(max=total - 1) if capacity is not None else slots
        ray = torch.div(sample, num_samples, rounding_mode="floor")
        points = flat_x[sample]
    sigma, rgb = field(points, ray, rays)
    with phase("compositing + loss"):
        thickness = sigma.float() * (delta[ray] / cube_side)
        # Padded slots (== total) write to an extra row that is cut off: their values and gradients vanish.
        sigma_delta = torch.zeros(total + 1, device=t.device, dtype=torch.float32).index_copy(0, slots, thickness)
        colours = torch.zeros(total + 1, 3, device=t.device, dtype=torch.float32).index_copy(0, slots, rgb.float())
        # (a Python scalar bound: creating a CUDA tensor from a host value would sync)
        evaluated = occupied.clamp(max=slots.numel()) if capacity is not None else occupied
    return (sigma_delta[:total].view(num_rays, num_samples), colours[:total].view(num_rays, num_samples, 3),
            evaluated, occupied)


def march_train_samples(field: FieldFn, occupancy: OccupancyGrid, rays: Rays, num_samples: int, cube_side: float,
                        generator: torch.Generator | None, capacity: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | torch.Tensor, int | torch.Tensor]:
    """All ``num_samples`` samples of every ray at once (stratified jitter): optical thicknesses (R, S),
    colours (R, S, 3), sample parameters t (R, S), field evaluations and occupied samples. With a
    ``capacity`` there is no host sync (see :func:`pack`)."""
    with phase("sample rays"):
        jitter = torch.rand(len(rays), num_samples, generator=generator, device=rays.origin.device)
        t, delta = sample_segment(rays, 0, num_samples, num_samples, jitter)
    sigma_delta, colours, evaluated, occupied = evaluate_samples(field, occupancy, rays, t, delta, cube_side, capacity)
    return sigma_delta, colours, t, evaluated, occupied


def march_train(field: FieldFn, occupancy: OccupancyGrid, rays: Rays, num_samples: int, cube_side: float,
                generator: torch.Generator | None, capacity: int | None = None) -> RayOutput:
    """:func:`march_train_samples` composited; weights and per-sample values kept for the losses."""
    sigma_delta, colours, t, evaluated, occupied = march_train_samples(field, occupancy, rays, num_samples,
                                                                       cube_side, generator, capacity)
    weights, rgb, opacity, depth, _ = composite(sigma_delta, colours, t)
    return RayOutput(rgb, opacity, depth, weights, evaluated, occupied, sigma_delta, colours, t)


@torch.no_grad()
def march_render(field: FieldFn, occupancy: OccupancyGrid, rays: Rays, num_samples: int, cube_side: float,
                 block: int, min_transmittance: float, colour_min_weight: float = 0.0) -> RayOutput:
    """Occupancy first, then the field on occupied samples only, front to back with early termination.

    All ``num_samples`` samples of every ray are tested against the occupancy grid at once (cheap: no field)
    and ranked per ray. Then rounds evaluate, for the rays still alive, their next ``window`` occupied samples
    (``block`` in the first round, doubling each round: at most ~log2(num_samples / block) + 1 rounds),
    composited in order after what the rays absorbed so far (empty samples contribute nothing, so this equals
    compositing all samples). After each round rays whose transmittance fell below ``min_transmittance`` or
    with no occupied sample left are dropped: a ray that meets the surface stops after about one window of
    evaluations instead of evaluating the whole occupied interior of the head. Two host syncs per round.

    ``colour_min_weight`` > 0 with a field that can split (:meth:`HeadField.density_first`): each round's
    densities first, then the colour MLP only for samples whose compositing weight exceeds it (the rest would
    add at most their weight to the pixel; behind a surface and in empty space that is ~0)."""
    device, num = rays.origin.device, len(rays)
    rgb = torch.zeros(num, 3, device=device)
    opacity = torch.zeros(num, device=device)
    depth = torch.zeros(num, device=device)
    log_t = torch.zeros(num, device=device)
    stop_log_t = -float(np.log(max(min_transmittance, 1e-30)))
    with phase("sample rays"):
        t, delta = sample_segment(rays, 0, num_samples, num_samples, None)  # (R, S), (R,)
    with phase("occupancy lookup"):
        x = rays.origin[:, None, :] + t[..., None] * rays.direction[:, None, :]
        occupied = occupancy.lookup(x.view(-1, 3)).view(num, num_samples) & rays.hit[:, None]
        del x
        rank = torch.cumsum(occupied, dim=1, dtype=torch.int32)  # 1-based rank of each occupied sample
        per_ray = rank[:, -1]
        alive = (per_ray > 0).nonzero().squeeze(1)
    count, start, window = 0, 0, max(1, int(block))
    while alive.numel() and start < num_samples:
        stop = start + window
        with phase("occupancy lookup"):
            ranks = rank[alive]
            chosen = occupied[alive] & (ranks > start) & (ranks <= stop)  # (A, S): this round's samples
            row, sample = chosen.nonzero().unbind(1)
            ray = alive[row]
            slot = ranks[row, sample].long() - (start + 1)
            sample_t = t[ray, sample]
            points = rays.origin[ray] + sample_t[:, None] * rays.direction[ray]
        count += int(ray.numel())
        width = min(window, num_samples)
        shape = (alive.numel(), width)
        if colour_min_weight > 0 and getattr(field, "splits", False):
            sigma, colour_of = field.density_first(points, ray, rays)
            with phase("compositing + loss"):
                thickness = sigma.float() * (delta[ray] / cube_side)
                seg_thickness = torch.zeros(shape, device=device).index_put_((row, slot), thickness)
                before = torch.cumsum(seg_thickness, dim=1) - seg_thickness + log_t[alive][:, None]
                weight = (torch.exp(-before) * (1.0 - torch.exp(-seg_thickness)))[row, slot]
                wanted = (weight > colour_min_weight).nonzero().squeeze(1)
            colour = torch.zeros(ray.numel(), 3, device=device)
            colour[wanted] = colour_of(wanted).float()
        else:
            sigma, colour = field(points, ray, rays)
            seg_thickness = None
        with phase("compositing + loss"):
            if seg_thickness is None:
                seg_thickness = torch.zeros(shape, device=device).index_put_(
                    (row, slot), sigma.float() * (delta[ray] / cube_side))
            seg_colour = torch.zeros(shape + (3,), device=device).index_put_((row, slot), colour.float())
            seg_t = torch.zeros(shape, device=device).index_put_((row, slot), sample_t)
            _, seg_rgb, seg_opacity, seg_depth, seg_total = composite(seg_thickness, seg_colour, seg_t, log_t[alive])
            rgb.index_add_(0, alive, seg_rgb)
            opacity.index_add_(0, alive, seg_opacity)
            depth.index_add_(0, alive, seg_depth)
            log_t.index_add_(0, alive, seg_total)
            alive = alive[(log_t[alive] < stop_log_t) & (per_ray[alive] > stop)]
        start, window = stop, window * 2
    return RayOutput(rgb, opacity, depth, None, count, count)


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
