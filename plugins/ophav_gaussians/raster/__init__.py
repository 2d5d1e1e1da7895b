"""Differentiable 3D Gaussian splatting: one entry point, :func:`render_gaussians`, three backends.

- ``torch``: :mod:`.reference`, plain PyTorch with autograd (CPU tests, small images);
- ``triton``: :mod:`.triton_kernels`, tile forward/backward kernels (the GPU path; nothing to compile by
  hand, and the tests run it on the CPU under ``TRITON_INTERPRET=1``);
- ``gsplat``: :mod:`.gsplat_backend`, used only when asked for and importable (its CUDA code JIT-compiles).

The projection (3D covariance, EWA Jacobian, 0.3 px low-pass, culling) is PyTorch code with autograd in the
torch backend (:mod:`.projection`) and one fused kernel with a hand-written backward in the triton backend
(checked against the PyTorch one). ``import triton`` happens only when the triton backend runs.
"""
from __future__ import annotations

import importlib.util

import torch

from .projection import TILE, Projection, bin_gaussians, project_gaussians, quaternion_to_matrix

__all__ = ["render_gaussians", "triton_available", "gsplat_available", "project_gaussians", "bin_gaussians",
           "quaternion_to_matrix", "Projection", "TILE"]

BACKENDS = ("auto", "torch", "triton", "gsplat")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def gsplat_available() -> bool:
    return importlib.util.find_spec("gsplat") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "gsplat" and not gsplat_available():
        raise RuntimeError("backend='gsplat' asked for but gsplat is not importable")
    return backend


def _batched(value: torch.Tensor | None, batch: int, num: int | None, default: float, like: torch.Tensor):
    """(X,) / (N, X) -> (B, X) / (B, N, X); None -> ``default`` everywhere (background)."""
    if value is None:
        return torch.full((batch, 3), default, dtype=like.dtype, device=like.device)
    value = value.to(dtype=like.dtype, device=like.device)
    if num is None:
        return value.expand(batch, 3) if value.dim() == 1 else value
    return value.expand(batch, num, value.shape[-1]) if value.dim() == 2 else value


def render_gaussians(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                     background=None, near=0.01, far=100.0, backend="auto"):
    """Render N Gaussians into B cameras.

    means (N,3) world; quats (N,4) wxyz unnormalised; scales (N,3) linear (not log); opacities (N,) in [0,1];
    colors (N,3) or (B,N,3) linear RGB already evaluated (the field does SH itself); viewmats (B,4,4)
    world->camera, OpenCV convention (x right, y down, z forward); Ks (B,3,3) pixel intrinsics, pixel (i, j)
    centred at (i + 0.5, j + 0.5); background (3,) or (B,3) or None = black.

    Returns dict(image=(B,H,W,3), alpha=(B,H,W), depth=(B,H,W) expected depth (sum of w_i z_i over alpha;
    0 where nothing is drawn), radii=(B,N) int32 pixel radius (0 = culled), means2d=(B,N,2) projected
    means in pixels). Differentiable w.r.t. means, quats, scales, opacities, colors.

    Densification: ``means2d`` is an intermediate tensor on which ``retain_grad()`` has been called when
    gradients are on, so after ``loss.backward()`` ``out["means2d"].grad`` holds dL/d(means2d) in pixels
    per camera, (B,N,2) (3DGS's view-space gradient is this times W/2 and H/2: NDC units).
    """
    batch, num = viewmats.shape[0], means.shape[0]
    backend = resolve_backend(backend, means.device)
    colors = _batched(colors, batch, num, 0.0, means)
    background = _batched(background, batch, None, 0.0, means)
    if backend == "gsplat":
        from .gsplat_backend import render_gsplat

        return render_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                             background, near, far)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (means, quats, scales, opacities, colors))
    if backend == "triton":
        # One fused launch (and one for its backward) instead of ~200 small torch ops and their autograd.
        from .triton_kernels import project_gaussians_triton, project_gaussians_triton_autograd

        project = project_gaussians_triton_autograd if needs_grad else project_gaussians_triton
        proj = project(means, quats, scales, opacities, viewmats, Ks, width, height, near, far)
    else:
        proj = project_gaussians(means, quats, scales, opacities, viewmats.to(means.dtype), Ks.to(means.dtype),
                                 width, height, near, far)
    if proj.means2d.requires_grad:
        proj.means2d.retain_grad()
    # Depth rides along as a fourth colour channel, so the compositing kernels serve both.
    features = torch.cat([colors, proj.depths[..., None]], dim=-1)
    if backend == "triton":
        from .triton_kernels import rasterize_triton

        tiles = bin_gaussians(proj, width, height)
        composited, transmittance = rasterize_triton(proj, tiles, opacities, features, width, height)
    else:
        from .reference import rasterize_reference

        composited, transmittance = rasterize_reference(proj, opacities, features, width, height)
    alpha = 1.0 - transmittance
    image = composited[..., :3] + transmittance[..., None] * background[:, None, None, :]
    depth = composited[..., 3] / alpha.clamp(min=1e-10)
    return dict(image=image, alpha=alpha, depth=depth, radii=proj.radii, means2d=proj.means2d)
