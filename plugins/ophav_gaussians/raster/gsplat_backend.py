"""Optional backend: gsplat's CUDA rasteriser (``pip install gsplat``; its kernels JIT-compile on first use, so it
needs a CUDA toolkit). Used only when ``backend="gsplat"`` is asked for.

Same conventions as ours (OpenCV cameras, pixel centres at +0.5, 0.3 px low-pass, 1/255 and 0.99 alpha limits,
1e-4 transmittance stop). Differences: gsplat bounds a Gaussian's footprint by its own radius rule rather than
ours (see :mod:`.projection`), so the faint fringes (alpha of a few 1/255) can differ; the background is
composited here from the returned alpha.
"""
from __future__ import annotations

import torch


def render_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width, height, background, near, far):
    import gsplat

    rendered, alphas, meta = gsplat.rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane=near, far_plane=far,
        eps2d=0.3, packed=False, render_mode="RGB+ED", rasterize_mode="classic")
    alpha = alphas[..., 0]
    image = rendered[..., :3] + (1.0 - alpha)[..., None] * background[:, None, None, :]
    means2d = meta["means2d"]
    if means2d.requires_grad:
        means2d.retain_grad()
    radii = meta["radii"]
    if radii.dim() == 3:  # gsplat >= 1.5 returns per-axis radii
        radii = radii.amax(dim=-1)
    return dict(image=image, alpha=alpha, depth=rendered[..., 3], radii=radii.to(torch.int32), means2d=means2d)
