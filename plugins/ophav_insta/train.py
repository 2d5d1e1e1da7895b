"""Training: the dataset on the device, batches of rays from a few frames, the loss, Adam + EMA, the occupancy
grid schedule. Used by :class:`ophav_insta.field.InstaField` and by the benchmark."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ophav_core.stages.data import FrameSet, MaskSet, Tracking
from ophav_insta.deform import MeshDeformer, mesh_clearance, unposed_vertices
from ophav_insta.model import CanonicalField, FieldConfig, FrameData, Geometry, HeadField
from ophav_insta.options import InstaOptions
from ophav_insta.phases import phase
from ophav_insta.render import (Cameras, OccupancyGrid, Rays, camera_rays, composite, distortion_loss, make_rays,
                                march_render, march_train_samples, opacity_entropy)

CAPACITY_HEADROOM = 1.25  # field evaluations per step = this times the recent peak of occupied samples
CAPACITY_GRANULE = 4096  # capacities are multiples of this (fewer distinct shapes for torch.compile)


def background_rgb(name: str, device) -> torch.Tensor:
    return torch.full((3,), 1.0 if name == "white" else 0.0, device=device)


def box_corners(geometry: Geometry) -> np.ndarray:
    lo, hi = np.asarray(geometry.box_min), np.asarray(geometry.box_max)
    return np.array([[(hi if (c >> d) & 1 else lo)[d] for d in range(3)] for c in range(8)], np.float64)


def box_rects(geometry: Geometry, rotation: np.ndarray, translation: np.ndarray, K: np.ndarray,
              size: tuple[int, int]) -> np.ndarray:
    """(N, 4) int64 x0, y0, x1, y1 (inclusive) pixel rectangles covering the projected head box of each frame
    (the whole image when the box reaches behind the camera)."""
    width, height = size
    cam = np.einsum("nij,cj->nci", rotation.astype(np.float64), box_corners(geometry)) + translation[:, None, :]
    z = cam[..., 2]
    uv = cam[..., :2] / np.clip(z, 1e-9, None)[..., None]
    u = K[0, 0] * uv[..., 0] + K[0, 2]
    v = K[1, 1] * uv[..., 1] + K[1, 2]
    rects = np.stack([np.floor(u.min(1)), np.floor(v.min(1)), np.ceil(u.max(1)), np.ceil(v.max(1))], axis=1)
    rects = np.clip(rects, 0, [width - 1, height - 1, width - 1, height - 1])
    behind = (z <= 1e-6).any(axis=1)
    rects[behind] = [0, 0, width - 1, height - 1]
    return rects.astype(np.int64)


def surface_points(vertices: torch.Tensor, faces: torch.Tensor, steps: int = 4) -> torch.Tensor:
    """Points spread over the mesh triangles (a barycentric grid with ``steps`` subdivisions) and its vertices."""
    grid = [(i / steps, j / steps) for i in range(steps + 1) for j in range(steps + 1 - i)]
    bary = torch.tensor([[1 - a - b, a, b] for a, b in grid], dtype=vertices.dtype, device=vertices.device)
    tri = vertices[faces]  # (F, 3, 3)
    return torch.einsum("sk,fkc->fsc", bary, tri).reshape(-1, 3)


@dataclass
class Scene:
    """The training frames on the device. images uint8 (N, H, W, 3); masks uint8 (N, H, W); per frame:
    rotation, translation, K_inv, cameras (the per-frame ray products), unposed meshes, expressions, pixel
    rectangles; ``usable`` frame indices."""

    images: torch.Tensor
    masks: torch.Tensor
    rotation: torch.Tensor
    translation: torch.Tensor
    K_inv: torch.Tensor
    meshes: torch.Tensor
    expressions: torch.Tensor
    rects: torch.Tensor
    usable: torch.Tensor
    cameras: Cameras | None = None
    depth: torch.Tensor | None = None  # (N, H, W) float16 camera depth of the tracked mesh, 0 where it is not seen

    def __post_init__(self) -> None:
        if self.cameras is None:
            self.cameras = Cameras.build(self.K_inv, self.rotation, self.translation)

    @classmethod
    def build(cls, frames: FrameSet, masks: MaskSet, tracking: Tracking, geometry: Geometry, device,
              with_depth: bool = False) -> "Scene":
        n = len(tracking)
        K_inv = np.linalg.inv(tracking.K).astype(np.float32)
        rects = box_rects(geometry, tracking.rotation, tracking.translation, tracking.K, frames.size)
        usable = np.arange(n) if tracking.valid is None or not tracking.valid.any() else np.flatnonzero(tracking.valid)
        unposed = unposed_vertices(tracking.vertices, tracking.rotation, tracking.translation)
        t = lambda a, dt=torch.float32: torch.as_tensor(np.ascontiguousarray(a), dtype=dt).to(device)  # noqa: E731
        alpha8 = np.rint(masks.alpha * 255.0).astype(np.uint8)
        depth = mesh_depth_maps(tracking, frames.size, device=device).to(torch.float16) if with_depth else None
        return cls(t(frames.frames, torch.uint8), t(alpha8, torch.uint8), t(tracking.rotation), t(tracking.translation),
                   t(np.broadcast_to(K_inv, (n, 3, 3))), t(unposed), t(tracking.expression), t(rects, torch.int64),
                   t(usable, torch.int64), depth=depth)


def mesh_depth_maps(tracking: Tracking, size: tuple[int, int], erode: int = 1, device="cpu",
                    chunk: int | None = None) -> torch.Tensor:
    """(N, H, W) float32 camera depth of each frame's tracked mesh where it is seen (front-facing, nearest
    triangle), 0 elsewhere, on ``device``; ``erode`` pixels are taken off its outline, where a pixel is part mesh,
    part hair or background. MediaPipe's mesh has triangles across the mouth opening, so an open mouth's interior
    is pulled onto the lips' surface: that is how the loss was measured (RESULTS.md, sixth session); leaving those
    triangles out is untested.

    The same rasterisation as :func:`ophav_core.media.raster.rasterise` (scanline spans of the pixel centres inside
    each triangle, edges included; depth affine in the pixel position; a z-buffer), in float64 PyTorch over
    ``chunk`` frames at a time, so that on the GPU the maps of a standard run's 1500 frames take a fraction of a
    second instead of 18 s of numpy per fit."""
    device = torch.device(device)
    width, height = int(size[0]), int(size[1])
    n = len(tracking)
    chunk = chunk or (256 if device.type == "cuda" else 4)
    f64 = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64, device=device)  # noqa: E731
    faces = torch.as_tensor(tracking.faces.astype(np.int64), device=device)
    K = np.asarray(tracking.K, np.float64)
    out = torch.zeros(n, height, width, dtype=torch.float32, device=device)
    for start in range(0, n, chunk):
        vertices = f64(tracking.vertices[start:start + chunk])  # (B, V, 3) camera space
        batch = vertices.shape[0]
        z = vertices[..., 2]
        zs = z.clamp_min(1e-6)
        px = K[0, 0] * vertices[..., 0] / zs + K[0, 2]
        py = K[1, 1] * vertices[..., 1] / zs + K[1, 2]
        tx, ty, tz = px[:, faces].reshape(-1, 3), py[:, faces].reshape(-1, 3), z[:, faces].reshape(-1, 3)
        e1x, e1y, e2x, e2y = tx[:, 1] - tx[:, 0], ty[:, 1] - ty[:, 0], tx[:, 2] - tx[:, 0], ty[:, 2] - ty[:, 0]
        cross = e1x * e2y - e1y * e2x
        drawn = 0.5 * cross < -1e-6  # front-facing (negative area with y down), not degenerate
        # Scanline rows of each drawn triangle, then each row's span of pixel centres between its edges.
        y_lo = ty.amin(1).ceil().clamp_min(0)
        y_hi = ty.amax(1).floor().clamp_max(height - 1)
        inside = drawn & (tx.amax(1) >= 0) & (tx.amin(1) <= width - 1) & (y_hi >= y_lo)
        rows = torch.where(inside, y_hi - y_lo + 1, torch.zeros_like(y_lo)).to(torch.int64)
        tri = torch.repeat_interleave(torch.arange(rows.numel(), device=device), rows)
        y = y_lo[tri] + (torch.arange(tri.numel(), device=device) - (rows.cumsum(0) - rows)[tri])
        left = torch.full_like(y, math.inf)
        right = torch.full_like(y, -math.inf)
        for i, j in ((0, 1), (1, 2), (2, 0)):
            ax, ay, bx, by = tx[tri, i], ty[tri, i], tx[tri, j], ty[tri, j]
            crosses = (torch.minimum(ay, by) <= y) & (y <= torch.maximum(ay, by)) & (ay != by)
            x = ax + (y - ay) * (bx - ax) / torch.where(ay != by, by - ay, torch.ones_like(by))
            left = torch.where(crosses, torch.minimum(left, x), left)
            right = torch.where(crosses, torch.maximum(right, x), right)
        x0 = left.ceil().clamp_min(0)
        x1 = right.floor().clamp_max(width - 1)
        ok = torch.isfinite(x0) & torch.isfinite(x1)
        length = torch.where(ok, (x1 - x0 + 1).clamp_min(0), torch.zeros_like(x0)).to(torch.int64)
        span = torch.repeat_interleave(torch.arange(length.numel(), device=device), length)
        if span.numel() == 0:
            continue
        xs = x0[span] + (torch.arange(span.numel(), device=device) - (length.cumsum(0) - length)[span])
        ys, tri = y[span], tri[span]
        # Depth at the pixel: affine in (x, y) over the triangle (the barycentric planes of the numpy rasteriser).
        det = torch.where(cross.abs() < 1e-12, torch.full_like(cross, 1e-12), cross)[tri]
        dx, dy = xs - tx[tri, 0], ys - ty[tri, 0]
        b1 = (e2y[tri] * dx - e2x[tri] * dy) / det
        b2 = (e1x[tri] * dy - e1y[tri] * dx) / det
        depth = tz[tri, 0] + b1 * (tz[tri, 1] - tz[tri, 0]) + b2 * (tz[tri, 2] - tz[tri, 0])
        frame = tri // faces.shape[0]
        pixel = (frame * height + ys.long()) * width + xs.long()
        buffer = torch.full((batch * height * width,), math.inf, dtype=torch.float64, device=device)
        buffer.scatter_reduce_(0, pixel, depth, "amin")
        buffer = buffer.view(batch, height, width)
        seen = torch.isfinite(buffer)
        if erode:
            # A pixel stays when its whole (2e+1)^2 neighbourhood is covered; outside the image counts as covered.
            hole = F.max_pool2d((~seen).to(torch.float32)[:, None], 2 * erode + 1, stride=1, padding=erode)[:, 0]
            seen &= hole == 0
        out[start:start + batch] = torch.where(seen, buffer, torch.zeros_like(buffer)).to(torch.float32)
    return out


@torch.no_grad()
def carve_from_masks(scene: Scene, occupancy: OccupancyGrid, deformer: MeshDeformer, min_share: float,
                     level: float = 0.02, max_frames: int = 256, chunk: int = 8) -> torch.Tensor:
    """(res^3,) bool: occupancy voxels the training masks show empty (space carving).

    A voxel is carved when, in at least ``min_share`` of the training frames (and in two), its whole footprint
    projects onto clear background (mask below ``level`` after a max filter as wide as the voxel's projected
    half diagonal). Only voxels farther than the deformation's ``far`` distance from every frame's mesh are
    considered (bounded through each vertex's largest displacement over the frames, :func:`mesh_clearance`):
    there every frame's field is the canonical one moved rigidly, so one camera per frame places the voxel
    exactly; nearer the mesh an expression could move the face into a voxel that was background in another frame
    (the chin of an opening jaw). Cameras see only voxels in front of them and inside the image."""
    res, side = occupancy.resolution, occupancy.cube_side
    device = occupancy.cube_min.device
    carved = torch.zeros(res ** 3, dtype=torch.bool, device=device)
    usable = scene.usable
    if usable.numel() == 0 or min_share <= 0:
        return carved
    centres = occupancy.cell_points(None, False) * side + occupancy.cube_min
    half_diagonal = 0.5 * side / res * 3 ** 0.5
    moved = (scene.meshes[usable] - deformer.canonical).norm(dim=-1).amax(dim=0)  # (V,) over the frames
    clearance = mesh_clearance(centres, deformer.canonical, deformer.faces, moved) - half_diagonal
    candidates = (clearance > deformer.far).nonzero().squeeze(1)
    if candidates.numel() == 0:
        return carved
    points = centres[candidates]
    picked = usable[torch.linspace(0, usable.numel() - 1, min(max_frames, usable.numel()), device=device).long()]
    height, width = scene.masks.shape[1:3]
    K = torch.linalg.inv(scene.K_inv[picked].double()).float()
    background = torch.zeros(candidates.numel(), dtype=torch.int32, device=device)
    for start in range(0, picked.numel(), chunk):
        frames = picked[start:start + chunk]
        cam = torch.einsum("fij,pj->fpi", scene.rotation[frames], points) + scene.translation[frames][:, None]
        z = cam[..., 2]
        k = K[start:start + chunk]
        u = k[:, 0, 0, None] * cam[..., 0] / z.clamp_min(1e-6) + k[:, 0, 2, None]
        v = k[:, 1, 1, None] * cam[..., 1] / z.clamp_min(1e-6) + k[:, 1, 2, None]
        # The footprint: the voxel's half diagonal at the nearest candidate's depth in front of the camera, plus a
        # pixel for rounding (capped: voxels right at the camera say nothing useful).
        nearest = torch.where(z > 0, z, torch.full_like(z, float("inf"))).amin(dim=1)
        footprint = float((half_diagonal * k[:, 0, 0] / nearest).max())
        radius = int(min(np.ceil(footprint) if np.isfinite(footprint) else 0, min(height, width) // 4)) + 1
        mask = scene.masks[frames].float()[:, None]
        wide = torch.nn.functional.max_pool2d(mask, 2 * radius + 1, stride=1, padding=radius)[:, 0]
        col, row = u.round().long(), v.round().long()
        seen = (z > 0) & (col >= 0) & (col < width) & (row >= 0) & (row < height)
        flat = (row.clamp(0, height - 1) * width + col.clamp(0, width - 1))
        value = torch.gather(wide.reshape(len(frames), -1), 1, flat)
        background += (seen & (value < level * 255.0)).sum(dim=0, dtype=torch.int32)
    needed = max(2, int(np.ceil(min_share * picked.numel())))
    carved[candidates[background >= needed]] = True
    return carved


@dataclass
class Batch:
    rays: Rays
    frames: FrameData
    target: torch.Tensor  # (R, 3) composited over the background
    alpha: torch.Tensor  # (R,)
    mesh_depth: torch.Tensor  # (R,) camera depth of the tracked mesh at the ray's pixel, 0 where none


def composite_and_loss(sigma_delta: torch.Tensor, colours: torch.Tensor, t: torch.Tensor, target: torch.Tensor,
                       alpha: torch.Tensor, background: torch.Tensor, huber_delta: float, lambda_alpha: float,
                       lambda_distortion: float, lambda_entropy: float, mesh_depth: torch.Tensor | None = None,
                       lambda_depth: float = 0.0, depth_tolerance: float | torch.Tensor = 0.0,
                       depth_scale: float = 1.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, photometric MSE) of a batch from its (R, S) optical thicknesses and colours: compositing over the
    background, Huber photometric + alpha + distortion + entropy + mesh-depth terms. Fixed shapes:
    ``torch.compile`` fuses its ~50 small kernels (forward and backward) when enabled."""
    weights, rgb, opacity, _, _ = composite(sigma_delta, colours, t)
    rgb = rgb + (1.0 - opacity)[:, None] * background
    loss = F.huber_loss(rgb, target, delta=huber_delta) / huber_delta
    loss = loss + lambda_alpha * F.mse_loss(opacity, alpha)
    if lambda_distortion > 0:
        loss = loss + lambda_distortion * distortion_loss(weights).mean()
    if lambda_entropy > 0:
        loss = loss + lambda_entropy * opacity_entropy(opacity).mean()
    if lambda_depth > 0 and mesh_depth is not None:
        loss = loss + lambda_depth * mesh_depth_loss(weights, t, mesh_depth, depth_tolerance, depth_scale)
    return loss, F.mse_loss(rgb.detach(), target)


def mesh_depth_loss(weights: torch.Tensor, t: torch.Tensor, mesh_depth: torch.Tensor,
                    tolerance: float | torch.Tensor, scale: float) -> torch.Tensor:
    """Mean over the rays whose pixel the tracked mesh covers (``mesh_depth`` (R,) > 0) of the compositing
    weight (R, S) that lies farther than ``tolerance`` (a number, or (R,) per ray) from the mesh's depth along the
    ray, times that distance over ``scale``.

    Why: the coarse video's face pixels are the portrait's moved by exactly this mesh, but each frame is a 2D
    warp, and a radiance field can reproduce every frame with semi-transparent layers in front of and behind the
    face, which look right only from the training views: 6 degrees of pitch away from the nearest frame the
    preview avatar's face was orange fog with streaks. Pulling the weight onto the mesh where the mesh is seen
    makes the face a surface, consistent between views. The tolerance leaves room for the mesh's own error and
    for hair in front of the forehead."""
    seen = (mesh_depth > 0).to(weights.dtype)
    if isinstance(tolerance, torch.Tensor):
        tolerance = tolerance[:, None].to(t.dtype)
    off = ((t - mesh_depth[:, None].to(t.dtype)).abs() - tolerance).clamp_min(0.0)
    per_ray = (weights * off).sum(dim=1) / scale
    return (per_ray * seen).sum() / seen.sum().clamp_min(1.0)


class Trainer:
    """One optimisation of the canonical field on a :class:`Scene`.

    On CUDA a step has no host sync: the occupied samples are packed into a fixed ``capacity`` (see
    :func:`ophav_insta.render.pack`), adapted at each occupancy update (one sync per ``occupancy_update_every``
    steps) to ``CAPACITY_HEADROOM`` times the peak occupied count seen since the previous one; samples beyond
    it (rare) are dropped and counted in :attr:`samples_dropped`. On the CPU the exact count is used."""

    def __init__(self, options: InstaOptions, config: FieldConfig, geometry: Geometry, deformer: MeshDeformer,
                 scene: Scene, device, seed: int, backend: str, total_iterations: int,
                 field_state: dict | None = None, occupancy_state: dict | None = None,
                 dilation: int | torch.Tensor = 1):
        self.options, self.config, self.geometry, self.deformer, self.scene = options, config, geometry, deformer, scene
        self.device = torch.device(device)
        self.total = max(int(total_iterations), 1)
        self.field = CanonicalField(config, backend)
        self.field.reset_parameters(torch.Generator().manual_seed(seed))
        self.field.to(self.device)
        if field_state is not None:
            self.field.load_state_dict(field_state)
        self.ema = copy.deepcopy(self.field)
        self.ema.requires_grad_(False)
        self._params = [p for p in self.field.parameters()]
        self._ema_params = [p for p in self.ema.parameters()]
        cuda = self.device.type == "cuda"
        groups = [{"params": [self.field.encoding.table], "lr": options.lr_grid, "base_lr": options.lr_grid},
                  {"params": [p for n, p in self.field.named_parameters() if not n.startswith("encoding.")],
                   "lr": options.lr_mlp, "base_lr": options.lr_mlp, "weight_decay": 1e-6}]
        self.optimizer = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15, **({"fused": True} if cuda else {}))
        tensors = geometry.tensors(self.device)
        self.box_min, self.box_max, self.cube_min = tensors["box_min"], tensors["box_max"], tensors["cube_min"]
        self.occupancy = OccupancyGrid(options.occupancy_resolution, tensors["cube_min"], geometry.cube_side, dilation)
        if occupancy_state is not None and occupancy_state["density"].numel() == options.occupancy_resolution ** 3:
            radius = self.occupancy.radius  # this training's frames (a continued one has new expressions)
            self.occupancy.load_state(occupancy_state)
            self.occupancy.radius = radius
        self.occupancy.mark_surface(surface_points(deformer.canonical, deformer.faces))
        # From this training's frames (a continued one may show new views); off, a continued one drops its carving.
        self.occupancy.carved = None
        if options.carve_min_share > 0:
            with phase("carving"):
                self.occupancy.carved = carve_from_masks(scene, self.occupancy, deformer, options.carve_min_share)
        self.generator = torch.Generator(self.device).manual_seed(seed + 1)
        self.background = background_rgb(options.background, self.device)
        self.amp = bool(options.amp and cuda)
        self.step_count = 0
        self.rays_traced = 0
        self._samples: int | torch.Tensor = 0
        self._dropped: int | torch.Tensor = 0
        self.samples_per_batch = self._rays_per_batch() * options.samples_per_ray
        self.capacity: int | None = self.samples_per_batch if cuda else None
        self._occupied_peak = torch.zeros((), dtype=torch.int64, device=self.device)
        self._local: torch.Tensor | None = None
        self._decode = self.field.decode
        self._render_decode = None
        self._loss_fn = composite_and_loss
        if options.compile and cuda:
            self._decode = torch.compile(self.field.decode, dynamic=True)
            self._render_decode = torch.compile(self.ema.decode, dynamic=True)
            self._loss_fn = torch.compile(composite_and_loss, dynamic=False)
            deformer.enable_compile()

    def _rays_per_batch(self) -> int:
        per_frame = max(1, self.options.batch_rays // self.options.frames_per_batch)
        return per_frame * max(1, self.options.batch_rays // per_frame)

    @property
    def samples_evaluated(self) -> int:
        """Field evaluations of occupied samples since the last :meth:`reset_stats` (reading it syncs)."""
        return int(self._samples)

    @property
    def samples_dropped(self) -> int:
        """Occupied samples left out because they exceeded the capacity (reading it syncs)."""
        return int(self._dropped)

    def reset_stats(self) -> None:
        self._samples, self._dropped, self.rays_traced = 0, 0, 0

    # ------------------------------------------------------------------ batches

    def sample_batch(self) -> Batch:
        """``frames_per_batch`` random usable frames, the same number of random pixels in each one's head box.
        Rays index the scene's frames directly (its meshes, expressions and cameras: nothing gathered per batch)."""
        opt, scene, gen, dev = self.options, self.scene, self.generator, self.device
        per_frame = max(1, opt.batch_rays // opt.frames_per_batch)
        num_frames = max(1, opt.batch_rays // per_frame)  # num_frames * per_frame == _rays_per_batch()
        if self._local is None:  # batch frame of each ray: the same every step
            self._local = torch.arange(num_frames, device=dev).repeat_interleave(per_frame)
        pick = scene.usable[torch.randint(0, scene.usable.numel(), (num_frames,), generator=gen, device=dev)]
        frame = pick[self._local]
        rect = scene.rects[frame]
        low, high = rect[:, :2], rect[:, 2:]
        rand = torch.rand(frame.numel(), 2, generator=gen, device=dev)
        uv = torch.minimum(low + (rand * (high - low + 1)).long(), high)  # uniform integer pixels in the box
        u, v = uv.unbind(1)
        rgb = scene.images[frame, v, u].float() / 255.0
        alpha = scene.masks[frame, v, u].float() / 255.0
        target = torch.lerp(self.background, rgb, alpha[:, None])  # composited over the background
        rays = camera_rays(u, v, frame, scene.cameras, self.box_min, self.box_max)
        mesh_depth = scene.depth[frame, v, u].float() if scene.depth is not None else torch.zeros_like(alpha)
        return Batch(rays, FrameData(scene.meshes, scene.expressions), target, alpha, mesh_depth)

    # ------------------------------------------------------------------ optimisation

    def _set_learning_rates(self) -> None:
        factor = self.options.lr_final_ratio ** (self.step_count / self.total)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor

    def loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss, photometric MSE) of one batch, with gradients (no host sync on CUDA)."""
        opt = self.options
        sigma_delta, colours, t, evaluated, occupied = self._march(batch)
        with phase("compositing + loss"):
            side = self.geometry.cube_side
            loss, mse = self._loss_fn(sigma_delta, colours, t, batch.target, batch.alpha, self.background,
                                      opt.huber_delta, opt.lambda_alpha, opt.lambda_distortion, opt.lambda_entropy,
                                      batch.mesh_depth, opt.lambda_depth, self.depth_tolerance(batch.rays), side)
            self._count(evaluated, occupied)
        self.rays_traced += len(batch.rays)
        return loss, mse

    def _march(self, batch: Batch):
        """The batch's samples through the field (optical thicknesses, colours, depths, evaluated, occupied)."""
        head = HeadField(self.field, self.deformer, self.cube_min, self.geometry.cube_side, batch.frames,
                         self._decode)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return march_train_samples(head, self.occupancy, batch.rays, self.options.samples_per_ray,
                                       self.geometry.cube_side, self.generator, self.capacity)

    def depth_tolerance(self, rays: Rays) -> torch.Tensor:
        """(R,) the mesh-depth loss's tolerance per ray: ``depth_tolerance`` of the head cube plus one sample
        spacing (weight cannot gather closer to a depth than the samples are apart)."""
        opt = self.options
        return opt.depth_tolerance * self.geometry.cube_side + (rays.far - rays.near) / opt.samples_per_ray

    @torch.no_grad()
    def off_mesh_weight(self, batches: int = 4) -> float:
        """Share of the compositing weight of rays the tracked mesh covers that lies farther than the depth
        tolerance from the mesh's depth, over ``batches`` fresh batches (the current weights; a diagnostic for
        tests and benchmarks: it draws from the training's random generator)."""
        if self.scene.depth is None:
            raise ValueError("the scene has no mesh depth maps (lambda_depth is 0)")
        off = total = 0.0
        for _ in range(batches):
            batch = self.sample_batch()
            sigma_delta, colours, t, _, _ = self._march(batch)
            weights = composite(sigma_delta.float(), colours.float(), t.float())[0]
            seen = batch.mesh_depth > 0
            far = (t.float() - batch.mesh_depth[:, None]).abs() > self.depth_tolerance(batch.rays)[:, None]
            off += float((weights * far)[seen].sum())
            total += float(weights[seen].sum())
        return off / max(total, 1e-12)

    def _count(self, evaluated: int | torch.Tensor, occupied: int | torch.Tensor) -> None:
        self._samples = self._samples + evaluated
        if self.capacity is not None:  # device tensors: accumulated without a sync
            self._dropped = self._dropped + (occupied - evaluated)
            torch.maximum(self._occupied_peak, occupied, out=self._occupied_peak)

    def _adapt_capacity(self) -> None:
        """Capacity = headroom x the peak occupied count since the last call (one sync per occupancy update);
        before the occupancy grid is active every sample counts as occupied, so the full batch is kept."""
        if self.capacity is None or not self.occupancy.active:
            return
        peak = int(self._occupied_peak)
        self._occupied_peak.zero_()
        wanted = int(np.ceil(peak * CAPACITY_HEADROOM / CAPACITY_GRANULE)) * CAPACITY_GRANULE
        self.capacity = int(min(self.samples_per_batch, max(wanted, CAPACITY_GRANULE)))

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One iteration; returns (loss, mse) as device tensors (no sync)."""
        self._set_learning_rates()
        with phase("sample rays"):
            batch = self.sample_batch()
        loss, mse = self.loss(batch)
        with phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with phase("optimizer + EMA"):
            self.optimizer.step()
            self.step_count += 1
            self._update_ema()
        if self.step_count % self.options.occupancy_update_every == 0:
            with phase("occupancy update"):
                self.update_occupancy(self.field, activate=self.step_count >= self.options.occupancy_warmup)
                self._adapt_capacity()
        return loss.detach(), mse

    @torch.no_grad()
    def _update_ema(self) -> None:
        # Bias-corrected ramp: short trainings are not dominated by the random initialisation.
        decay = min(self.options.ema_decay, (1.0 + self.step_count) / (10.0 + self.step_count))
        torch._foreach_lerp_(self._ema_params, self._params, 1.0 - decay)

    @torch.no_grad()
    def update_occupancy(self, field: CanonicalField, activate: bool, decay: float | None = None,
                         jitter: bool = True) -> None:
        opt = self.options

        def density(unit: torch.Tensor) -> torch.Tensor:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                return field.density(unit)[0]

        self.occupancy.update(density, self.geometry.sample_spacing(opt.samples_per_ray), opt.occupancy_threshold,
                              opt.occupancy_decay if decay is None else decay, self.generator, jitter, activate)

    def finalize(self) -> None:
        """Occupancy of the EMA weights (what renders use): two jittered passes from scratch. It only turns
        skipping on when the training got past the warm-up; before that a render evaluates every sample."""
        active = self.occupancy.active or self.step_count >= self.options.occupancy_warmup
        self.update_occupancy(self.ema, activate=active, decay=0.0)
        self.update_occupancy(self.ema, activate=active, decay=1.0)
        self.occupancy.active = active

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def render_frame(self, index: int, scene: Scene | None = None, field: CanonicalField | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W, 3) composited rgb in [0, 1] and (H, W) opacity of frame ``index`` of ``scene`` (default: the
        training scene), rendered with the EMA weights unless ``field`` is given."""
        scene = scene or self.scene
        height, width = scene.images.shape[1:3]
        pick = torch.tensor([index], device=self.device)
        return render_image(field or self.ema, self.deformer, self.geometry, self.occupancy,
                            FrameData(scene.meshes[pick], scene.expressions[pick]), scene.K_inv[pick],
                            scene.rotation[pick], scene.translation[pick], (width, height), self.options,
                            self.background, self.amp, self._render_decode if field is None else None)[:2]

    def target(self, index: int, scene: Scene | None = None) -> torch.Tensor:
        """(H, W, 3) frame ``index`` composited over the background with its mask, in [0, 1]."""
        scene = scene or self.scene
        alpha = scene.masks[index].float()[..., None] / 255.0
        return scene.images[index].float() / 255.0 * alpha + self.background * (1.0 - alpha)


@torch.no_grad()
def render_image(field: CanonicalField, deformer: MeshDeformer, geometry: Geometry, occupancy: OccupancyGrid,
                 frames: FrameData, K_inv: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor,
                 size: tuple[int, int], options: InstaOptions, background: torch.Tensor, amp: bool,
                 decode=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render one frame (batch of size 1 in ``frames``/K_inv/rotation/translation): rgb (H, W, 3) composited over
    ``background``, opacity (H, W), depth (H, W) (camera z, 0 where empty). Rays that miss the head box are
    dropped first; the rest are marched in chunks of ``render_chunk_rays`` (a whole 512x512 image is one)."""
    width, height = size
    device = K_inv.device
    with phase("sample rays"):
        tensors = geometry.tensors(device)
        v, u = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
        u, v = u.reshape(-1), v.reshape(-1)
        rays = make_rays(u, v, torch.zeros_like(u), K_inv, rotation, translation, tensors["box_min"],
                         tensors["box_max"])
        hit = rays.hit.nonzero().squeeze(1)
    head = HeadField(field, deformer, tensors["cube_min"], geometry.cube_side, frames, decode,
                     occupancy.canonical_test() if options.render_canonical_skip else None)
    rgb = torch.zeros(u.numel(), 3, device=device)
    opacity = torch.zeros(u.numel(), device=device)
    depth = torch.zeros(u.numel(), device=device)
    for start in range(0, hit.numel(), options.render_chunk_rays):
        idx = hit[start:start + options.render_chunk_rays]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = march_render(head, occupancy, rays.index(idx), options.samples_per_ray, geometry.cube_side,
                               options.render_block, options.render_min_transmittance,
                               options.render_colour_min_weight)
        with phase("compositing + loss"):
            rgb[idx], opacity[idx], depth[idx] = out.rgb, out.opacity, out.depth
    with phase("compositing + loss"):
        rgb = rgb + (1.0 - opacity)[:, None] * background
        depth = torch.where(opacity > 1e-3, depth / opacity.clamp_min(1e-6), torch.zeros_like(depth))
    return (rgb.clamp(0, 1).view(height, width, 3), opacity.clamp(0, 1).view(height, width),
            depth.view(height, width))


def psnr(mse: float) -> float:
    return float(-10.0 * np.log10(max(mse, 1e-12)))


class Stopwatch:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.start = self.now()

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def elapsed(self) -> float:
        return self.now() - self.start
