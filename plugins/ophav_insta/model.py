"""The canonical radiance field (hash grid + small MLPs), the head-space geometry it lives in, and the
per-sample evaluation that chains deformation -> encoding -> MLPs."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ophav_insta.deform import MeshDeformer
from ophav_insta.hashgrid import HashGrid, HashGridLayout

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


def sh_encoding(d: torch.Tensor) -> torch.Tensor:
    """Real spherical harmonics up to degree 3 (16 values) of unit directions (N, 3)."""
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
        raw = self.density_net(self.encoding(unit))
        sigma = trunc_exp(raw[:, 0].float() + self.config.density_bias)
        return sigma, raw[:, 1:]

    def forward(self, unit: torch.Tensor, direction: torch.Tensor, expression: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        sigma, geo = self.density(unit)
        inputs = [geo, sh_encoding(direction).to(geo.dtype)]
        if expression.shape[1]:
            inputs.append(expression.to(geo.dtype))
        rgb = torch.sigmoid(self.color_net(torch.cat(inputs, dim=-1)).float())
        return sigma, rgb


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class FrameData:
    """What a batch of frames contributes to the evaluation: unposed meshes (B, V, 3), expressions (B, E)."""

    meshes: torch.Tensor
    expressions: torch.Tensor


class HeadField:
    """Unposed samples of some frames -> (density, colour): deformation, cube coordinates, canonical field."""

    def __init__(self, field_net: CanonicalField, deformer: MeshDeformer, cube_min: torch.Tensor, cube_side: float,
                 frames: FrameData):
        self.field, self.deformer, self.frames = field_net, deformer, frames
        self.cube_min, self.cube_side = cube_min, float(cube_side)

    def __call__(self, x: torch.Tensor, frame: torch.Tensor, direction: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        x_c, closeness = self.deformer.deform(x, frame, self.frames.meshes)
        unit = (x_c - self.cube_min) / self.cube_side
        inside = ((unit >= 0) & (unit <= 1)).all(dim=-1)
        d = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        expression = self.frames.expressions[frame]
        if self.field.config.expression_falloff:
            expression = expression * closeness[:, None]
        sigma, rgb = self.field(unit, d, expression)
        return sigma * inside, rgb
