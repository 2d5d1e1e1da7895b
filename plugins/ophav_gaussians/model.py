"""The Gaussians of an avatar: their tensors, how they start (on the mesh's triangles and on the masks' visual hull)
and how densification changes them.

Per Gaussian (N rows): ``parent`` int64 triangle or -1 (shell), ``bary`` (N, 3) its barycentric point on the
parent, ``anchor`` (N, 3) a shell Gaussian's fixed head-space point; learnt: ``offset`` (N, 3), ``rotation``
(N, 4) wxyz, ``log_scale`` (N, 3) (all in the parent's local frame, see :mod:`ophav_gaussians.anchors`),
``opacity`` (N,) logits, ``sh`` (N, K, 3) spherical-harmonics colour coefficients."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ophav_core.stages.data import MaskSet, Tracking
from ophav_gaussians.anchors import mean_triangle_size, place, rgb_to_sh_dc

LEARNT = ("offset", "rotation", "log_scale", "opacity", "sh")
FIXED = ("parent", "bary", "anchor")
FACE_ONLY_PREFIXES = ("mediapipe",)
INITIAL_OPACITY = 0.1


def sh_count(degree: int) -> int:
    return (degree + 1) ** 2


@dataclass
class Gaussians:
    parent: torch.Tensor
    bary: torch.Tensor
    anchor: torch.Tensor
    offset: torch.Tensor
    rotation: torch.Tensor
    log_scale: torch.Tensor
    opacity: torch.Tensor
    sh: torch.Tensor

    def __len__(self) -> int:
        return int(self.parent.shape[0])

    @property
    def names(self) -> tuple[str, ...]:
        return FIXED + LEARNT

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.names}

    def rows(self, index: torch.Tensor) -> "Gaussians":
        return Gaussians(**{k: v[index] for k, v in self.tensors().items()})

    def cat(self, other: "Gaussians") -> "Gaussians":
        return Gaussians(**{k: torch.cat([v, getattr(other, k)]) for k, v in self.tensors().items()})

    def to(self, device) -> "Gaussians":
        return Gaussians(**{k: v.to(device) for k, v in self.tensors().items()})

    def detached(self) -> "Gaussians":
        return Gaussians(**{k: v.detach().clone() for k, v in self.tensors().items()})

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.tensors().items()}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], device=None) -> "Gaussians":
        out = cls(**{k: state[k] for k in FIXED + LEARNT})
        return out if device is None else out.to(device)

    @property
    def on_mesh(self) -> torch.Tensor:
        return self.parent >= 0

    def place(self, vertices: torch.Tensor, faces: torch.Tensor, shell_unit: float):
        """(means, quats, scales) in the head space of the mesh ``vertices`` (V, 3)."""
        return place(vertices, faces, self.parent, self.bary, self.anchor, self.offset, self.rotation,
                     self.log_scale, shell_unit)


# ---------------------------------------------------------------------------------------------- head box


def head_box(canonical: np.ndarray, unposed: np.ndarray, mesh_type: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(box_min, box_max, mesh size) in head space: the meshes' bounds grown for hair, ears and neck (more up and
    back for a face-only mesh such as MediaPipe's), as insta's ray box."""
    points = np.concatenate([canonical[None], unposed], axis=0).reshape(-1, 3).astype(np.float64)
    low, high = points.min(axis=0), points.max(axis=0)
    size = float((high - low).max())
    face_only = mesh_type.lower().startswith(FACE_ONLY_PREFIXES)
    up, back = (0.35, 0.4) if face_only else (0.15, 0.1)
    box_min, box_max = low - 0.25 * size, high + 0.25 * size
    box_min[1] -= up * size  # y points down: "up" is -y
    box_max[2] += back * size  # z points away from the camera at rest: the back of the head
    return box_min, box_max, size


# ---------------------------------------------------------------------------------------------- initialisation


def _views(n: int, most: int = 24) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, most)).round().astype(np.int64))


def _project(points: np.ndarray, R: np.ndarray, t: np.ndarray, K: np.ndarray):
    cam = points @ R.T.astype(np.float64) + t.astype(np.float64)
    z = cam[:, 2]
    zs = np.where(z > 1e-6, z, 1e-6)
    u = K[0, 0] * cam[:, 0] / zs + K[0, 2]
    v = K[1, 1] * cam[:, 1] / zs + K[1, 2]
    return u, v, z


def carve_shell(tracking: Tracking, masks: MaskSet, unposed: np.ndarray, resolution: int, tolerance: float,
                count: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Seeds of the shell: (M <= count, 3) head-space points on the surface of the masks' visual hull that the face
    mesh does not cover, and the voxel size.

    The head box is cut into voxels; a voxel is in the hull when it projects inside the segmentation mask in all but
    ``tolerance`` of the views that see it, and not in front of the tracked face (closer to the camera than the
    mesh's depth at its pixel) in any view. Voxels of the hull with a neighbour outside it, farther than a voxel
    from every mesh vertex, are the seeds: hair, ears, scalp and neck where the masks show them."""
    from ophav_core.media.raster import rasterise

    box_min, box_max, _ = head_box(tracking.canonical_vertices, unposed, tracking.mesh_type)
    voxel = float((box_max - box_min).max()) / resolution
    dims = np.maximum(1, np.ceil((box_max - box_min) / voxel).astype(int))
    axes = [box_min[d] + (np.arange(dims[d]) + 0.5) * voxel for d in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    votes = np.zeros(len(grid), np.int32)
    inside = np.zeros(len(grid), np.int32)
    front = np.zeros(len(grid), bool)
    height, width = masks.alpha.shape[1:]
    for i in _views(len(tracking)):
        R, t = tracking.rotation[i], tracking.translation[i]
        u, v, z = _project(grid, R, t, tracking.K)
        ui, vi = np.rint(u).astype(np.int64), np.rint(v).astype(np.int64)
        seen = (z > 1e-6) & (ui >= 0) & (ui < width) & (vi >= 0) & (vi < height)
        votes[seen] += 1
        inside[seen] += masks.alpha[i][vi[seen], ui[seen]] >= 0.5
        mu, mv, mz = _project(tracking.vertices[i].astype(np.float64), np.eye(3), np.zeros(3), tracking.K)
        raster = rasterise(np.stack([mu, mv], -1), mz, tracking.faces, (height, width))
        depth = raster.dense(raster.interpolate(mz), fill=np.inf)
        hit = seen.copy()
        hit[seen] = np.isfinite(depth[vi[seen], ui[seen]])
        front[hit] |= z[hit] < depth[vi[hit], ui[hit]] - voxel
    hull = (votes > 0) & (inside >= np.ceil((1.0 - tolerance) * votes)) & ~front
    cube = hull.reshape(tuple(dims))
    padded = np.pad(cube, 1)
    interior = np.ones_like(cube)
    for d in range(3):
        for s in (-1, 1):
            interior &= np.roll(padded, s, axis=d)[1:-1, 1:-1, 1:-1]
    surface = (cube & ~interior).reshape(-1)
    seeds = grid[surface]
    if len(seeds):
        mesh_points = np.concatenate([tracking.canonical_vertices, unposed.reshape(-1, 3)[::7]]).astype(np.float64)
        near = np.zeros(len(seeds), bool)
        for start in range(0, len(seeds), 4096):
            chunk = seeds[start:start + 4096]
            d2 = ((chunk[:, None, :] - mesh_points[None]) ** 2).sum(-1).min(1)
            near[start:start + 4096] = d2 < voxel ** 2
        seeds = seeds[~near]
    if len(seeds) > count:
        seeds = seeds[rng.choice(len(seeds), count, replace=False)]
    return seeds.astype(np.float32), voxel


def sample_colours(points: list[np.ndarray], frames: np.ndarray, masks: np.ndarray, tracking: Tracking,
                   default: float = 0.5) -> np.ndarray:
    """(N, 3) float32 in [0, 1]: each head-space point's mean pixel colour over the views where it projects inside
    the mask. ``points``: per view of :func:`_views` order, (N, 3) head-space positions (the face's move with the
    expression); a single array is used for every view."""
    views = _views(len(tracking))
    n = len(points[0])
    total = np.zeros((n, 3), np.float64)
    hits = np.zeros(n, np.float64)
    height, width = masks.shape[1:]
    for j, i in enumerate(views):
        p = points[min(j, len(points) - 1)].astype(np.float64)
        u, v, z = _project(p, tracking.rotation[i], tracking.translation[i], tracking.K)
        ui, vi = np.rint(u).astype(np.int64), np.rint(v).astype(np.int64)
        ok = (z > 1e-6) & (ui >= 0) & (ui < width) & (vi >= 0) & (vi < height)
        ok[ok] = masks[i][vi[ok], ui[ok]] >= 0.5
        total[ok] += frames[i][vi[ok], ui[ok]] / 255.0
        hits[ok] += 1
    out = np.full((n, 3), default, np.float64)
    seen = hits > 0
    out[seen] = total[seen] / hits[seen, None]
    return out.astype(np.float32)


def initial_gaussians(frames: np.ndarray, masks: MaskSet, tracking: Tracking, unposed: np.ndarray, per_face: int,
                      shell_count: int, carve_resolution: int, carve_tolerance: float, sh_degree: int,
                      rng: np.random.Generator, faces: np.ndarray | None = None,
                      interior: np.ndarray | None = None) -> tuple[Gaussians, float]:
    """The starting Gaussians (CPU) and the shell's length unit (the tracker's canonical mesh's mean triangle
    size): ``per_face`` on every triangle of ``faces`` (default the tracker's; indices into ``unposed``'s
    vertices) (the first at its centroid, the others at random barycentric points), half a triangle wide, and the
    shell's on the visual hull (:func:`carve_shell`), half a voxel wide; opacity 0.1; colour the mean of the
    pixels they project to, except on the ``interior`` triangles (the inside of the mouth, hidden in most
    frames), which start dark red."""
    unit = mean_triangle_size(torch.as_tensor(tracking.canonical_vertices),
                              torch.as_tensor(tracking.faces.astype(np.int64)))
    faces = np.asarray(tracking.faces if faces is None else faces, np.int64)
    num_faces = len(faces)
    parent = np.repeat(np.arange(num_faces), per_face)
    bary = np.full((len(parent), 3), 1.0 / 3.0)
    if per_face > 1:
        extra = np.arange(len(parent)) % per_face != 0
        cuts = np.sort(rng.uniform(size=(int(extra.sum()), 2)), axis=1)
        bary[extra] = np.stack([cuts[:, 0], cuts[:, 1] - cuts[:, 0], 1 - cuts[:, 1]], 1)
    tracked = unposed[:, :tracking.vertices.shape[1]]  # without the points the field appends (the mouth pocket's)
    shell, voxel = carve_shell(tracking, masks, tracked, carve_resolution, carve_tolerance, shell_count, rng) \
        if shell_count > 0 else (np.zeros((0, 3), np.float32), unit)
    n_face, n_shell = len(parent), len(shell)
    views = _views(len(tracking))
    face_points = [(bary[:, :, None] * unposed[i][faces[parent]]).sum(1) for i in views]
    colours = np.concatenate([sample_colours(face_points, frames, masks.alpha, tracking),
                              sample_colours([shell], frames, masks.alpha, tracking)]) if n_shell else \
        sample_colours(face_points, frames, masks.alpha, tracking)
    if interior is not None:
        from ophav_gaussians.mouth import INTERIOR_RGB

        colours[:n_face][interior[parent]] = INTERIOR_RGB
    n = n_face + n_shell
    log_scale = np.concatenate([np.full((n_face, 3), math.log(0.5 / math.sqrt(per_face))),
                                np.full((n_shell, 3), math.log(max(0.5 * voxel, 1e-6) / unit))])
    sh = torch.zeros(n, sh_count(sh_degree), 3)
    sh[:, 0] = rgb_to_sh_dc(torch.as_tensor(colours))
    f32 = lambda a: torch.as_tensor(np.asarray(a, np.float32))  # noqa: E731
    gaussians = Gaussians(
        parent=torch.as_tensor(np.concatenate([parent, -np.ones(n_shell, np.int64)])),
        bary=f32(np.concatenate([bary, np.zeros((n_shell, 3))])),
        anchor=f32(np.concatenate([np.zeros((n_face, 3)), shell])),
        offset=torch.zeros(n, 3), rotation=torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1), log_scale=f32(log_scale),
        opacity=torch.full((n,), math.log(INITIAL_OPACITY / (1 - INITIAL_OPACITY))), sh=sh)
    return gaussians, unit
