"""A CPU compositing path for :func:`ophav_gaussians.raster.render_gaussians`: the same projection
(:func:`~ophav_gaussians.raster.project_gaussians`) and compositing rule, computed over (Gaussian, pixel) pairs
instead of (tile pixels x tile Gaussians) blocks.

The reference rasteriser composites, per 16x16 tile, every pixel of the tile against every Gaussian whose box
touches the tile: on a CPU a head filling a 128x128 image costs 256 x (thousands) products per tile and seconds
per step. Here each Gaussian meets only the pixels inside its own box (where its alpha can reach 1/255), the
pairs are sorted by (pixel, depth), and the front-to-back transmittance is a segmented cumulative sum of
``log(1 - alpha)`` (float64) per pixel: O(pairs) work and memory, autograd for the gradients. Same rules as the
reference: ``alpha = min(0.99, opacity exp(-0.5 d^T conic d))``, skipped below 1/255 or where the exponent is
positive, and a pixel stops at the first Gaussian that would take its transmittance below 1e-4 (not composited).
``tests/test_gaussians.py`` checks images and gradients against the reference.
"""
from __future__ import annotations

import importlib.util
import warnings

import torch

from ophav_gaussians.raster.projection import (ALPHA_MAX, ALPHA_MIN, TRANSMITTANCE_MIN, Projection, pixel_boxes,
                                                project_gaussians)


def _pairs(proj: Projection, opacities: torch.Tensor, b: int, width: int, height: int):
    """(gaussian ids, pixel ids) of camera ``b``'s pairs whose pixel centre lies in the Gaussian's box."""
    with torch.no_grad():
        vis = torch.nonzero(proj.visible[b]).squeeze(1)
        if vis.numel() == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=proj.depths.device)
            return empty, empty
        x0, x1, y0, y1 = pixel_boxes(proj, opacities, b, vis, width, height)
        wx, wy = (x1 - x0 + 1).clamp_min(0), (y1 - y0 + 1).clamp_min(0)
        counts = wx * wy
        total = int(counts.sum())
        g = torch.repeat_interleave(torch.arange(vis.numel(), device=vis.device), counts, output_size=total)
        pick = lambda t: t.index_select(0, g)  # noqa: E731 (index_select: much faster than t[g] on a CPU)
        local = torch.arange(total, device=vis.device) - pick(torch.cumsum(counts, 0) - counts)
        w = pick(wx)
        px = pick(x0) + local % w
        py = pick(y0) + torch.div(local, w, rounding_mode="floor")
        return pick(vis), py * width + px


_COMPILE_FAILED: list[str] = []  # why Numba could not compile the loops, once it has failed in this process


def _compiled_failed(exc: Exception) -> None:
    _COMPILE_FAILED.append(f"{type(exc).__name__}: {exc}")
    warnings.warn(f"gaussians: the compiled CPU compositing is unusable ({_COMPILE_FAILED[-1]:.200}); compositing "
                  "in PyTorch instead, at about half the speed", RuntimeWarning, stacklevel=3)


def compiled_available() -> bool:
    """Whether the compiled pair compositing (:mod:`ophav_gaussians.numba_compositing`) can run: Numba imports
    (and has not failed to compile the loops in this process)."""
    return not _COMPILE_FAILED and importlib.util.find_spec("numba") is not None


def composite_sparse(proj: Projection, opacities: torch.Tensor, features: torch.Tensor, width: int, height: int,
                     compiled: bool | None = None):
    """(B, H, W, C) composited features and (B, H, W) final transmittance, like the reference rasteriser.

    ``compiled``: the same pairs and rules walked by Numba loops (:mod:`ophav_gaussians.numba_compositing`);
    ``None`` = when Numba is installed. Where Numba cannot compile them, a warning says so once and PyTorch
    composites from then on."""
    if compiled is None:
        compiled = compiled_available()
    if compiled:
        try:
            from ophav_gaussians.numba_compositing import NumbaError, composite_numba
        except ImportError as exc:  # Numba installed but unusable here (a NumPy it does not support, say)
            _compiled_failed(exc)
        else:
            try:
                return composite_numba(proj, opacities, features, width, height)
            except NumbaError as exc:
                _compiled_failed(exc)
    batch = proj.depths.shape[0]
    channels = features.shape[-1]
    device, dtype = proj.means2d.device, proj.means2d.dtype
    images, transmittances = [], []
    for b in range(batch):
        gid, pix = _pairs(proj, opacities, b, width, height)
        pixels = width * height
        if gid.numel() == 0:
            images.append(torch.zeros(height, width, channels, dtype=dtype, device=device))
            transmittances.append(torch.ones(height, width, dtype=dtype, device=device))
            continue
        centres = torch.stack([(pix % width).to(dtype) + 0.5, (pix // width).to(dtype) + 0.5], -1)
        with torch.no_grad():  # which pairs count, and their order: (pixel, depth)
            d = proj.means2d[b].detach().index_select(0, gid) - centres
            c = proj.conics[b].detach().index_select(0, gid)
            power = -0.5 * (c[:, 0] * d[:, 0] ** 2 + c[:, 2] * d[:, 1] ** 2) - c[:, 1] * d[:, 0] * d[:, 1]
            alpha = (opacities.detach().index_select(0, gid) * torch.exp(power)).clamp(max=ALPHA_MAX)
            usable = (power <= 0) & (alpha >= ALPHA_MIN)
            gid, pix = gid[usable], pix[usable]
            rank = torch.empty_like(proj.depths[b], dtype=torch.int64)
            rank[torch.sort(proj.depths[b].detach(), stable=True).indices] = torch.arange(
                rank.numel(), device=device)
            order = torch.sort(pix * rank.numel() + rank.index_select(0, gid)).indices
            gid, pix = gid[order], pix[order]
            log_t = torch.log1p(-alpha[usable][order].double())
            csum = torch.cumsum(log_t, 0)
            first = torch.ones_like(pix, dtype=torch.bool)
            first[1:] = pix[1:] != pix[:-1]
            start = torch.cummax(torch.where(first, torch.arange(pix.numel(), device=device), 0), 0).values
            after = csum - (csum - log_t)[start]  # log transmittance after each pair, within its pixel
            kept = after >= torch.log(torch.tensor(TRANSMITTANCE_MIN, dtype=torch.float64))
            gid, pix = gid[kept], pix[kept]
        centres = torch.stack([(pix % width).to(dtype) + 0.5, (pix // width).to(dtype) + 0.5], -1)
        d = proj.means2d[b].index_select(0, gid) - centres
        c = proj.conics[b].index_select(0, gid)
        power = -0.5 * (c[:, 0] * d[:, 0] ** 2 + c[:, 2] * d[:, 1] ** 2) - c[:, 1] * d[:, 0] * d[:, 1]
        alpha = (opacities.index_select(0, gid) * torch.exp(power)).clamp(max=ALPHA_MAX)
        log_t = torch.log1p(-alpha.double())
        with torch.no_grad():
            first = torch.ones_like(pix, dtype=torch.bool)
            first[1:] = pix[1:] != pix[:-1]
            start = torch.cummax(torch.where(first, torch.arange(pix.numel(), device=device), 0), 0).values
        csum = torch.cumsum(log_t, 0)
        before = torch.exp((csum - log_t) - (csum - log_t)[start]).to(dtype)
        weights = alpha * before
        out = torch.zeros(pixels, channels, dtype=dtype, device=device).index_add(
            0, pix, weights[:, None] * features[b].index_select(0, gid))
        log_final = torch.zeros(pixels, dtype=torch.float64, device=device).index_add(0, pix, log_t)
        images.append(out.view(height, width, channels))
        transmittances.append(torch.exp(log_final).to(dtype).view(height, width))
    return torch.stack(images), torch.stack(transmittances)


def render_gaussians_sparse(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                            background=None, near=0.01, far=100.0, compiled: bool | None = None):
    """:func:`ophav_gaussians.raster.render_gaussians`'s interface and outputs, composited pair by pair
    (``compiled``: see :func:`composite_sparse`)."""
    batch, num = viewmats.shape[0], means.shape[0]
    if colors.dim() == 2:
        colors = colors.expand(batch, num, colors.shape[-1])
    if background is None:
        background = torch.zeros(batch, 3, dtype=means.dtype, device=means.device)
    elif background.dim() == 1:
        background = background.expand(batch, 3)
    proj = project_gaussians(means, quats, scales, opacities, viewmats.to(means.dtype), Ks.to(means.dtype),
                             width, height, near, far)
    if proj.means2d.requires_grad:
        proj.means2d.retain_grad()
    features = torch.cat([colors, proj.depths[..., None]], dim=-1)
    composited, transmittance = composite_sparse(proj, opacities, features, width, height, compiled)
    alpha = 1.0 - transmittance
    image = composited[..., :3] + transmittance[..., None] * background[:, None, None, :]
    depth = composited[..., 3] / alpha.clamp(min=1e-10)
    return dict(image=image, alpha=alpha, depth=depth, radii=proj.radii, means2d=proj.means2d)
