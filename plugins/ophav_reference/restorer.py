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
from ophav_reference.transfer import (band_share, collapse, consistency_weight, feathered_weight,
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
    unchanged = Restored(image.copy(), np.zeros((height, width), np.float32), [0.0] * options.levels)
    corr = correspond(reference, vertices2d, vertex_depth, (height, width))
    facing = _facing_weight(corr, options.min_visibility)
    raster = corr.raster
    usable = corr.visible & (facing > 0) & (alpha[raster.ys, raster.xs] > 0.5)
    if options.strength == 0 or usable.sum() < _MIN_PIXELS:
        return unchanged
    face_size = float(np.sqrt(raster.mask.sum()))
    feather_px = options.feather * face_size
    y0, y1, x0, x1 = _crop(raster.ys[usable], raster.xs[usable], (height, width),
                           pad=int(2 ** (options.levels + 1) + feather_px + 4))
    crop = np.s_[y0:y1, x0:x1]
    shape = (y1 - y0, x1 - x0)

    level = _portrait_level(corr.scale, len(reference.pyramid))
    source = reference.pyramid[level]
    ys, xs = raster.ys[usable] - y0, raster.xs[usable] - x0
    support = np.zeros(shape, bool)
    support[ys, xs] = True
    map_x = np.full(shape, -1.0, np.float32)
    map_y = np.full(shape, -1.0, np.float32)
    map_x[ys, xs] = corr.portrait_xy[usable, 0] / 2 ** level
    map_y[ys, xs] = corr.portrait_xy[usable, 1] / 2 ** level
    soft = np.zeros(shape, np.float32)
    soft[ys, xs] = facing[usable]

    render = image[crop].astype(np.float32)
    portrait = _warp(source, map_x, map_y, support, render)
    if options.refine:
        map_x, map_y = refine_maps(render, portrait, map_x, map_y, support, options.max_shift * face_size)
        portrait = _warp(source, map_x, map_y, support, render)

    sigma = max(2.0, 0.025 * face_size)  # about the size of facial features' smallest parts
    low, coarse = masked_lowpass(np.dstack([render, portrait]), support, [sigma, 4.0 * sigma]).images
    small_support = resize_to(support.astype(np.float32), low.shape)
    consistency = consistency_weight(low[..., :3], low[..., 3:], coarse[..., :3], coarse[..., 3:], small_support,
                                     options.consistency)
    soft *= resize_to(consistency, shape)
    weight = feathered_weight(support, soft, feather_px)
    # Detail as reflectance: the portrait's bands scaled by how much brighter the render is locally.
    gain = np.clip(low[..., :3] / np.maximum(low[..., 3:], 1.0), *_SHADING_GAIN).astype(np.float32)

    deltas, shares = [], []
    for r, p in zip(laplacian_pyramid(render, options.levels), laplacian_pyramid(portrait, options.levels)):
        p = p * resize_to(gain, r.shape)
        share = band_share(r, p, resize_to(support.astype(np.float32), r.shape) > 0.5)
        deltas.append(share[..., None] * (p - r))
        level_weight = resize_to(weight, r.shape)
        shares.append(float((share * level_weight).sum() / max(float(level_weight.sum()), 1e-9)))
    restored = render + (options.strength * weight)[..., None] * collapse(deltas)
    out = image.copy()
    out[crop] = np.clip(np.rint(restored), 0, 255).astype(np.uint8)
    full_weight = np.zeros((height, width), np.float32)
    full_weight[crop] = weight
    return Restored(out, full_weight, shares + [0.0] * (options.levels - len(shares)))


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
