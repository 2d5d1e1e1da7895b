"""The canonical radiance field (hash grid + small MLPs), the head-space geometry it lives in, and the
per-sample evaluation that chains deformation -> encoding -> MLPs."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ophav_insta.deform import MeshDeformer
from ophav_insta.hashgrid import HashGrid, HashGridLayout
from ophav_insta.phases import phase

FACE_ONLY_PREFIXES = ("mediapipe",)


# ---------------------------------------------------------------------------------------------- geometry


@dataclass
class Geometry:
    """Head space boxes (head-space units of the tracker).

    box_min/box_max: where the head can be (rays are clipped to it); cube_min/cube_side: the cube around it that
    the hash grid and the occupancy grid cover; mesh_size: the largest extent of the meshes; near/far: the
    deformation blend distances."""

    box_min: list[float]
    box_max: list[float]
    cube_min: list[float]
    cube_side: float
    mesh_size: float
    near: float
    far: float

    @classmethod
    def from_meshes(cls, canonical: np.ndarray, unposed: np.ndarray, mesh_type: str, margin: float,
                    extra_up: float | None, extra_back: float | None, near: float, far: float) -> "Geometry":
        points = np.concatenate([canonical[None], unposed], axis=0).reshape(-1, 3)
        low, high = points.min(axis=0).astype(np.float64), points.max(axis=0).astype(np.float64)
        size = float((high - low).max())
        face_only = mesh_type.lower().startswith(FACE_ONLY_PREFIXES)
        up = extra_up if extra_up is not None else (0.35 if face_only else 0.15)
        back = extra_back if extra_back is not None else (0.4 if face_only else 0.1)
        box_min, box_max = low - margin * size, high + margin * size
        box_min[1] -= up * size  # head space: y points down, so "up" is -y
        box_max[2] += back * size  # z points away from the camera at rest: the back of the head
        side = float((box_max - box_min).max())
        centre = (box_min + box_max) / 2
        cube_min = centre - side / 2
        return cls([float(v) for v in box_min], [float(v) for v in box_max], [float(v) for v in cube_min],
                   side, size, near * size, far * size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Geometry":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    def tensors(self, device) -> dict[str, torch.Tensor]:
        t = lambda v: torch.tensor(v, dtype=torch.float32, device=device)  # noqa: E731
        return {"box_min": t(self.box_min), "box_max": t(self.box_max), "cube_min": t(self.cube_min)}

    def sample_spacing(self, samples_per_ray: int) -> float:
        """A typical sample spacing in cube units (the box diagonal over the samples)."""
        diag = float(np.linalg.norm(np.subtract(self.box_max, self.box_min)))
        return diag / samples_per_ray / self.cube_side


# ---------------------------------------------------------------------------------------------- field


class _TruncExp(torch.autograd.Function):
    """exp with a clamped gradient (Instant-NGP): densities can grow large without exploding gradients."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    return _TruncExp.apply(x)


SH_DIM = 16


def sh_encoding_reference(d: torch.Tensor) -> torch.Tensor:
    """Real spherical harmonics up to degree 3 (16 values) of unit directions (N, 3), written term by term."""
    x, y, z = d.unbind(-1)
    xx, yy, zz = x * x, y * y, z * z
    return torch.stack([
        torch.full_like(x, 0.28209479177387814),
        -0.4886025119029199 * y, 0.4886025119029199 * z, -0.4886025119029199 * x,
        1.0925484305920792 * x * y, -1.0925484305920792 * y * z, 0.31539156525252005 * (2 * zz - xx - yy),
        -1.0925484305920792 * x * z, 0.5462742152960396 * (xx - yy),
        -0.5900435899266435 * y * (3 * xx - yy), 2.890611442640554 * x * y * z,
        -0.4570457994644658 * y * (4 * zz - xx - yy), 0.3731763325901154 * z * (2 * zz - 3 * xx - 3 * yy),
        -0.4570457994644658 * x * (4 * zz - xx - yy), 1.445305721320277 * z * (xx - yy),
        -0.5900435899266435 * x * (xx - 3 * yy),
    ], dim=-1)


# The same 16 polynomials as coefficients of the monomials [1, d_i, d_i d_j, d_i d_j d_k] (1 + 3 + 9 + 27
# columns, i, j, k = x, y, z = 0, 1, 2): a handful of kernels instead of ~35 (each a launch on a GPU).
_SH_TERMS: list[dict[tuple[int, ...], float]] = [
    {(): 0.28209479177387814},
    {(1,): -0.4886025119029199}, {(2,): 0.4886025119029199}, {(0,): -0.4886025119029199},
    {(0, 1): 1.0925484305920792}, {(1, 2): -1.0925484305920792},
    {(2, 2): 2 * 0.31539156525252005, (0, 0): -0.31539156525252005, (1, 1): -0.31539156525252005},
    {(0, 2): -1.0925484305920792}, {(0, 0): 0.5462742152960396, (1, 1): -0.5462742152960396},
    {(0, 0, 1): -3 * 0.5900435899266435, (1, 1, 1): 0.5900435899266435}, {(0, 1, 2): 2.890611442640554},
    {(1, 2, 2): -4 * 0.4570457994644658, (0, 0, 1): 0.4570457994644658, (1, 1, 1): 0.4570457994644658},
    {(2, 2, 2): 2 * 0.3731763325901154, (0, 0, 2): -3 * 0.3731763325901154, (1, 1, 2): -3 * 0.3731763325901154},
    {(0, 2, 2): -4 * 0.4570457994644658, (0, 0, 0): 0.4570457994644658, (0, 1, 1): 0.4570457994644658},
    {(0, 0, 2): 1.445305721320277, (1, 1, 2): -1.445305721320277},
    {(0, 0, 0): -0.5900435899266435, (0, 1, 1): 3 * 0.5900435899266435},
]
_SH_MATRIX: dict[str, torch.Tensor] = {}


def _monomial_column(exponents: tuple[int, ...]) -> int:
    offsets = {0: 0, 1: 1, 2: 4, 3: 13}
    index = 0
    for axis in exponents:
        index = index * 3 + axis
    return offsets[len(exponents)] + index


def _sh_matrix(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _SH_MATRIX:
        matrix = torch.zeros(40, SH_DIM, dtype=torch.float32)
        for column, term in enumerate(_SH_TERMS):
            for exponents, coefficient in term.items():
                matrix[_monomial_column(exponents), column] = coefficient
        _SH_MATRIX[key] = matrix.to(device)
    return _SH_MATRIX[key]


def sh_encoding(d: torch.Tensor) -> torch.Tensor:
    """Real spherical harmonics up to degree 3 (16 values, float32) of unit directions (N, 3)."""
    with torch.autocast(d.device.type, enabled=False):  # float32 (not bf16) monomials and products
        d = d.float()
        n = d.shape[0]
        square = (d[:, :, None] * d[:, None, :]).reshape(n, 9)
        cube = (square[:, :, None] * d[:, None, :]).reshape(n, 27)
        monomials = torch.cat([torch.ones_like(d[:, :1]), d, square, cube], dim=1)
        return monomials @ _sh_matrix(d.device)


@dataclass
class FieldConfig:
    """Architecture (stored in the checkpoint; a continued training keeps it)."""

    levels: int
    features_per_level: int
    log2_table: int
    base_resolution: int
    finest_resolution: int
    hidden_dim: int
    geo_features: int
    color_layers: int
    expression_dim: int
    expression_falloff: bool = True
    density_bias: float = -2.0  # a faint initial fog rather than an opaque box
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def layout(self) -> HashGridLayout:
        return HashGridLayout(self.levels, self.features_per_level, self.log2_table, self.base_resolution,
                              self.finest_resolution)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FieldConfig":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def _mlp(inputs: int, hidden: int, outputs: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    width = inputs
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    mods.append(nn.Linear(width, outputs))
    return nn.Sequential(*mods)


class CanonicalField(nn.Module):
    """Canonical head: density from the hash features, colour from geometry features, the view direction (SH)
    and the expression."""

    def __init__(self, config: FieldConfig, backend: str = "torch"):
        super().__init__()
        self.config = config
        self.encoding = HashGrid(config.layout, backend)
        self.density_net = _mlp(config.layout.output_dim, config.hidden_dim, 1 + config.geo_features, 1)
        self.color_net = _mlp(config.geo_features + SH_DIM + config.expression_dim, config.hidden_dim, 3,
                              config.color_layers)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Deterministic initialisation from ``generator`` (CPU), whatever the device."""
        self.encoding.reset_parameters(generator)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    bound = 1.0 / np.sqrt(module.in_features)
                    for p in (module.weight, module.bias):
                        p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)

    def density(self, unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """unit: points (N, 3) in the unit cube -> density (N,) float32 in cube units, geometry features (N, G)."""
        return self.density_from_features(self.encoding(unit))

    def density_from_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.density_net(features)
        sigma = trunc_exp(raw[:, 0].float() + self.config.density_bias)
        return sigma, raw[:, 1:]

    def decode(self, features: torch.Tensor, conditioning: torch.Tensor, closeness: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hash features (N, L*F), per-sample conditioning (N, SH_DIM + E) = SH of the view direction and the
        frame's expression, closeness to the mesh (N,) -> density (N,), rgb (N, 3) float32. The MLP part of
        a field evaluation (what ``torch.compile`` fuses when enabled)."""
        sigma, geo = self.density_from_features(features)
        return sigma, self.colour_from(geo, conditioning, closeness)

    def colour_from(self, geo: torch.Tensor, conditioning: torch.Tensor, closeness: torch.Tensor) -> torch.Tensor:
        """The colour MLP: geometry features (N, G) from :meth:`density_from_features`, conditioning and
        closeness as in :meth:`decode` -> rgb (N, 3) float32."""
        if self.config.expression_dim and self.config.expression_falloff:
            expression = conditioning[:, SH_DIM:] * closeness[:, None].to(conditioning.dtype)
            conditioning = torch.cat([conditioning[:, :SH_DIM], expression], dim=-1)
        return torch.sigmoid(self.color_net(torch.cat([geo, conditioning.to(geo.dtype)], dim=-1)).float())

    def forward(self, unit: torch.Tensor, direction: torch.Tensor, expression: torch.Tensor,
                closeness: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample convenience: unit points (N, 3), unit directions (N, 3), expressions (N, E)."""
        if closeness is None:
            closeness = torch.ones(unit.shape[0], device=unit.device)
        return self.decode(self.encoding(unit), torch.cat([sh_encoding(direction), expression.float()], dim=-1),
                           closeness)


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class FrameData:
    """What a batch of frames contributes to the evaluation: unposed meshes (B, V, 3), expressions (B, E)."""

    meshes: torch.Tensor
    expressions: torch.Tensor


class HeadField:
    """Unposed samples of some frames -> (density, colour): deformation, cube coordinates, canonical field.
    ``decode`` replaces ``field_net.decode`` (e.g. a ``torch.compile``'d version of it)."""

    def __init__(self, field_net: CanonicalField, deformer: MeshDeformer, cube_min: torch.Tensor, cube_side: float,
                 frames: FrameData, decode: Any = None, canonical_test: Any = None):
        """``canonical_test``: unit-cube canonical points (N, 3) -> (N,) bool, False where the canonical field is
        known to be empty (renders: the occupancy grid's opaque voxels); those samples skip the hash grid and
        the MLPs and get zero density."""
        self.field, self.deformer, self.frames = field_net, deformer, frames
        self.canonical_test = canonical_test
        self.cube_min, self.cube_side = cube_min, float(cube_side)
        self.decode = decode or field_net.decode
        self._ray_cache: tuple[Any, torch.Tensor] | None = None

    def ray_inputs(self, rays: Any) -> torch.Tensor:
        """(R, SH_DIM + E) per ray: SH of its unit direction and its frame's expression (computed per ray, then
        gathered per sample: 30-60x fewer rows than per sample; kept for the rounds of a render)."""
        if self._ray_cache is not None and self._ray_cache[0] is rays:
            return self._ray_cache[1]
        d = rays.direction / rays.direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        inputs = sh_encoding(d)
        if self.field.config.expression_dim:
            inputs = torch.cat([inputs, self.frames.expressions[rays.frame].float()], dim=-1)
        self._ray_cache = (rays, inputs)
        return inputs

    @property
    def splits(self) -> bool:
        """Whether :meth:`density_first` applies (not with a fused, ``torch.compile``'d decode)."""
        return self.decode == self.field.decode

    def density_first(self, x: torch.Tensor, ray: torch.Tensor, rays: Any
                      ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Renders: the density (M,) of the samples now, and a function giving the colour (len(idx), 3) of the
        samples ``idx`` later, so the colour MLP runs only where the compositing weight matters (not behind an
        opaque surface or in empty space)."""
        with phase("deform"):
            x_c, closeness = self.deformer.deform(x, rays.frame[ray], self.frames.meshes)
        with phase("hash encoding"):
            unit = (x_c - self.cube_min) / self.cube_side
            keep = ((unit >= 0) & (unit <= 1)).all(dim=-1)
            if self.canonical_test is not None:
                keep &= self.canonical_test(unit)
            keep = keep.nonzero().squeeze(1)
            features = self.field.encoding(unit[keep])
        with phase("MLPs"):
            kept_sigma, geo = self.field.density_from_features(features)
            sigma = torch.zeros(x.shape[0], dtype=kept_sigma.dtype, device=x.device).index_put_((keep,), kept_sigma)
            row_of = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
            row_of[keep] = torch.arange(keep.numel(), device=x.device)

        def colour(idx: torch.Tensor) -> torch.Tensor:
            with phase("MLPs"):
                rows = row_of[idx]
                valid = (rows >= 0).nonzero().squeeze(1)  # samples with zero density have none to give
                rgb = torch.zeros(idx.numel(), 3, device=x.device)
                chosen = idx[valid]
                rgb[valid] = self.field.colour_from(geo[rows[valid]], self.ray_inputs(rays)[ray[chosen]],
                                                    closeness[chosen])
                return rgb
        return sigma, colour

    def __call__(self, x: torch.Tensor, ray: torch.Tensor, rays: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with phase("deform"):
            x_c, closeness = self.deformer.deform(x, rays.frame[ray], self.frames.meshes)
        with phase("hash encoding"):
            unit = (x_c - self.cube_min) / self.cube_side
            inside = ((unit >= 0) & (unit <= 1)).all(dim=-1)
            if self.canonical_test is not None:
                keep = (inside & self.canonical_test(unit)).nonzero().squeeze(1)
                features = self.field.encoding(unit[keep])
            else:
                features = self.field.encoding(unit)
        with phase("MLPs"):
            if self.canonical_test is None:
                sigma, rgb = self.decode(features, self.ray_inputs(rays)[ray], closeness)
                return sigma * inside, rgb
            kept_sigma, kept_rgb = self.decode(features, self.ray_inputs(rays)[ray[keep]], closeness[keep])
            sigma = torch.zeros(x.shape[0], dtype=kept_sigma.dtype, device=x.device).index_put_((keep,), kept_sigma)
            rgb = torch.zeros(x.shape[0], 3, dtype=kept_rgb.dtype, device=x.device).index_put_((keep,), kept_rgb)
            return sigma, rgb
