"""The ``reference`` restorer: the portrait itself is the high-quality reference.

Each render and the portrait are tracked with the same mesh, so every render pixel on the face knows which
portrait pixel shows the same surface point. Where the portrait sees that point (front-facing, not occluded,
not too foreshortened) the render's missing high frequencies are taken from the portrait: the render keeps its
own low frequencies (the avatar's lighting and colour) and gets the portrait's Laplacian bands in the bands it
lacks, scaled by the local shading ratio. The weight falls smoothly to zero at visibility and mesh boundaries
and where render and portrait disagree (an open mouth over closed lips), and is exactly zero elsewhere, so
hair, background and everything the portrait cannot vouch for is left untouched. Identity comes from the
person's own photo, not from a generative prior; no weights are needed.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ophav_core.stages import RestoreInput, Restorer
from ophav_reference.correspond import Correspondence, PortraitReference, correspond
from ophav_reference.options import ReferenceOptions
from ophav_reference.transfer import (alignment_weight, band_share, collapse, consistency_weight, feathered_weight,
                                      laplacian_pyramid, masked_lowpass, refine_maps, resize_to)

_MIN_PIXELS = 16  # fewer usable face pixels than this: leave the image alone
_SHADING_GAIN = (0.5, 2.0)  # clip of the render/portrait local brightness ratio that scales the detail


@dataclass
class Restored:
    """One restored image, the weight (float32 (H, W) in [0, 1]) with which portrait detail went in, and the
    weighted mean share of each band (finest first) that was taken from the portrait."""

    image: np.ndarray
    weight: np.ndarray
    bands: list[float]


class ReferenceRestorer(Restorer):
    """Reference-guided restoration through the tracked mesh (see the module docstring)."""

    Options = ReferenceOptions
    options: ReferenceOptions

    def restore(self, batch: RestoreInput) -> np.ndarray:
        return np.stack([r.image for r in self.restore_detailed(batch)])

    def restore_detailed(self, batch: RestoreInput) -> list[Restored]:
        """Like :meth:`restore`, with each image's weight map and band mix (for reports and contact sheets)."""
        reference = PortraitReference.build(batch.portrait.image, batch.portrait_vertices2d,
                                            batch.portrait_vertex_depth, batch.faces)

        def one(i: int) -> Restored:
            return restore_image(batch.images[i], batch.alpha[i], batch.vertices2d[i], batch.vertex_depth[i],
                                 reference, self.options)

        workers = self.options.workers or min(8, os.cpu_count() or 1)
        results: list[Restored] = []
        with self.context.progress(len(batch), "reference restore") as bar:
            if workers <= 1 or len(batch) <= 1:
                for i in range(len(batch)):
                    results.append(one(i))
                    bar.advance(1)
            else:
                # OpenCV and most numpy kernels release the GIL, so threads share the work without copies.
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    for result in pool.map(one, range(len(batch))):
                        results.append(result)
                        bar.advance(1)
        return results


def restore_image(image: np.ndarray, alpha: np.ndarray, vertices2d: np.ndarray, vertex_depth: np.ndarray,
                  reference: PortraitReference, options: ReferenceOptions) -> Restored:
    """Bring the portrait's detail into one render (uint8 (H, W, 3))."""
    height, width = image.shape[:2]
    corr = correspond(reference, vertices2d, vertex_depth, (height, width))
    plan = _plan(corr, alpha, reference, options)
    if plan is None or options.strength == 0:
        return Restored(image.copy(), np.zeros((height, width), np.float32), [0.0] * options.levels)
    render = image[plan.crop].astype(np.float32)
    if options.refine:
        plan.map_x, plan.map_y = refine_maps(render, plan.source, plan.map_x, plan.map_y, plan.support,
                                             options.max_shift * plan.face_size)
    portrait = _warp(plan.source, plan.map_x, plan.map_y, plan.support, render)
    weight, gain = _weight_and_gain(render, portrait, plan, options)
    delta, shares = _missing_detail(render, portrait, gain, weight, plan.support, options.levels)
    out = image.copy()
    out[plan.crop] = np.clip(np.rint(render + (options.strength * weight)[..., None] * delta), 0, 255).astype(np.uint8)
    full_weight = np.zeros((height, width), np.float32)
    full_weight[plan.crop] = weight
    return Restored(out, full_weight, shares + [0.0] * (options.levels - len(shares)))


@dataclass
class _Plan:
    """Where one render takes detail from: a crop around the usable face pixels, within it the support (pixels
    with a visible, not too foreshortened portrait counterpart), the sampling maps into the chosen portrait
    pyramid level, and the foreshortening weight."""

    crop: tuple[slice, slice]
    support: np.ndarray
    map_x: np.ndarray
    map_y: np.ndarray
    facing: np.ndarray
    source: np.ndarray
    face_size: float
    feather_px: float


def _plan(corr: Correspondence, alpha: np.ndarray, reference: PortraitReference,
          options: ReferenceOptions) -> _Plan | None:
    raster = corr.raster
    facing = _facing_weight(corr, options.min_visibility)
    usable = corr.visible & (facing > 0) & (alpha[raster.ys, raster.xs] > 0.5)
    if usable.sum() < _MIN_PIXELS:
        return None
    face_size = float(np.sqrt(raster.mask.sum()))
    feather_px = options.feather * face_size
    pad = int(2 ** (options.levels + 1) + feather_px + 4)  # filters near the crop's edge never reach the support
    y0, y1, x0, x1 = _crop(raster.ys[usable], raster.xs[usable], alpha.shape, pad)
    shape = (y1 - y0, x1 - x0)
    level = _portrait_level(corr.scale, len(reference.pyramid))
    ys, xs = raster.ys[usable] - y0, raster.xs[usable] - x0
    support = np.zeros(shape, bool)
    support[ys, xs] = True
    map_x = np.full(shape, -1.0, np.float32)
    map_y = np.full(shape, -1.0, np.float32)
    map_x[ys, xs] = corr.portrait_xy[usable, 0] / 2 ** level
    map_y[ys, xs] = corr.portrait_xy[usable, 1] / 2 ** level
    facing_map = np.zeros(shape, np.float32)
    facing_map[ys, xs] = facing[usable]
    return _Plan(np.s_[y0:y1, x0:x1], support, map_x, map_y, facing_map, reference.pyramid[level], face_size,
                 feather_px)


def _weight_and_gain(render: np.ndarray, portrait: np.ndarray, plan: _Plan,
                     options: ReferenceOptions) -> tuple[np.ndarray, np.ndarray]:
    """The transfer weight (foreshortening x consistency x alignment, feathered) and the local shading gain
    (render over portrait brightness, at the reduced resolution of the low-pass filters)."""
    sigma = max(2.0, 0.025 * plan.face_size)  # about the size of the smallest facial features
    # Lighting may differ between avatar and photo at the scale of the whole face, not at the scale of a mouth.
    coarse_sigma = max(4.0 * sigma, 0.2 * plan.face_size)
    low_r, coarse_r = masked_lowpass(render, plan.support, [sigma, coarse_sigma]).images
    low_p, coarse_p = masked_lowpass(portrait, plan.support, [sigma, coarse_sigma]).images
    small_support = resize_to(plan.support.astype(np.float32), low_r.shape)
    consistency = consistency_weight(low_r, low_p, coarse_r, coarse_p, small_support, options.consistency)
    soft = plan.facing * resize_to(consistency, plan.support.shape)
    if options.alignment_check:
        soft *= alignment_weight(render, portrait)
    weight = feathered_weight(plan.support, soft, plan.feather_px)
    # Detail as reflectance: the portrait's bands scaled by how much brighter the render is locally.
    gain = np.clip(low_r / np.maximum(low_p, 1.0), *_SHADING_GAIN).astype(np.float32)
    return weight, gain


def _missing_detail(render: np.ndarray, portrait: np.ndarray, gain: np.ndarray, weight: np.ndarray,
                    support: np.ndarray, levels: int) -> tuple[np.ndarray, list[float]]:
    """Per Laplacian band, the portrait's band (shading-scaled) minus the render's, in the share the render
    lacks, summed at full resolution; and each band's weighted mean share."""
    deltas, shares = [], []
    for r, p in zip(laplacian_pyramid(render, levels), laplacian_pyramid(portrait, levels)):
        p = p * resize_to(gain, r.shape)
        share = band_share(r, p, resize_to(support.astype(np.float32), r.shape) > 0.5)
        deltas.append(share[..., None] * (p - r))
        level_weight = resize_to(weight, r.shape)
        shares.append(float((share * level_weight).sum() / max(float(level_weight.sum()), 1e-9)))
    return collapse(deltas), shares


def _facing_weight(corr: Correspondence, min_visibility: float) -> np.ndarray:
    """0 at or below ``min_visibility`` relative foreshortening, 1 from twice that up, linear between."""
    if min_visibility <= 0:
        return np.ones_like(corr.foreshortening)
    return np.clip((corr.foreshortening - min_visibility) / min_visibility, 0.0, 1.0).astype(np.float32)


def _crop(ys: np.ndarray, xs: np.ndarray, size: tuple[int, int], pad: int) -> tuple[int, int, int, int]:
    height, width = size
    return (max(0, int(ys.min()) - pad), min(height, int(ys.max()) + pad + 1),
            max(0, int(xs.min()) - pad), min(width, int(xs.max()) + pad + 1))


def _portrait_level(scale: float, levels: int) -> int:
    """The portrait pyramid level whose pixels are closest to the render's (never finer than needed, so a
    large portrait is filtered before it is resampled and does not alias)."""
    if scale <= 1.0:
        return 0
    return int(np.clip(np.floor(np.log2(scale) + 0.5), 0, levels - 1))


def _warp(source: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, support: np.ndarray,
          render: np.ndarray) -> np.ndarray:
    """The portrait resampled into the render's frame on the support, the render itself elsewhere (so filters
    and optical flow see no artificial edge where the support ends)."""
    import cv2

    warped = cv2.remap(source, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return np.where(support[..., None], warped, render)
