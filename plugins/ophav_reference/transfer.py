"""Image operations of the detail transfer: Laplacian pyramids, masked low-pass filters, flow refinement and
the weight map. All work on float32 images of one crop; OpenCV does the filtering. Anything smooth (colour
statistics, consistency, gains, band shares) is computed at a reduced resolution and upsampled at the end."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

_AMPLITUDE_FULL, _AMPLITUDE_NONE = 0.5, 0.9  # render/portrait band amplitude: replace fully below, keep above
_ENERGY_SIGMA = 3.0  # pixels of a pyramid level over which a band's local amplitude is measured
_NOISE_FLOOR = 0.25  # squared grey levels: a band weaker than half a grey level carries no detail
_STRUCTURE_FLOOR = 4.0  # squared grey levels of mid-band amplitude below which there is nothing to align


def gray(image: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def laplacian_pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """The ``levels`` finest Laplacian-pyramid bands, each at its own resolution (band k is half the size of
    band k - 1): band k = G_k - up(G_{k+1}) with G_0 the image and G_{k+1} = pyrDown(G_k)."""
    import cv2

    bands, current = [], image
    for _ in range(levels):
        if min(current.shape[:2]) < 2:
            break
        smaller = cv2.pyrDown(current)
        bands.append(current - cv2.pyrUp(smaller, dstsize=(current.shape[1], current.shape[0])))
        current = smaller
    return bands


def collapse(bands: list[np.ndarray]) -> np.ndarray:
    """Sum of pyramid bands at the finest band's resolution (the inverse of :func:`laplacian_pyramid` without
    the low-pass residual)."""
    import cv2

    total = bands[-1]
    for band in reversed(bands[:-1]):
        total = band + cv2.pyrUp(total, dstsize=(band.shape[1], band.shape[0]))
    return total


def resize_to(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``image`` resized to ``shape[:2]`` = (height, width): area averaging down, bilinear up."""
    import cv2

    height, width = shape[:2]
    if image.shape[:2] == (height, width):
        return image
    interpolation = cv2.INTER_AREA if image.shape[0] > height else cv2.INTER_LINEAR
    if image.ndim == 3 and image.shape[2] > 4:  # OpenCV resizes at most 4 channels at a time
        parts = [cv2.resize(np.ascontiguousarray(image[..., c:c + 4]), (width, height), interpolation=interpolation)
                 for c in range(0, image.shape[2], 4)]
        return np.dstack([p.reshape(height, width, -1) for p in parts])
    return cv2.resize(image, (width, height), interpolation=interpolation)


@dataclass
class Smooth:
    """Masked low-pass images at a reduced resolution (``factor`` times smaller than the crop)."""

    images: list[np.ndarray]
    factor: int


def masked_lowpass(image: np.ndarray, mask: np.ndarray, sigmas: list[float]) -> Smooth:
    """Gaussian low-passes of ``image`` at each sigma (crop pixels), over the pixels where ``mask`` > 0 only
    (normalised convolution: background and unseen parts do not leak in; the nearest masked values spread
    outside the mask). Each is computed at a resolution reduced so its sigma is still ~2 pixels there, and all
    are returned at the resolution of the first (smallest) sigma."""
    m = mask.astype(np.float32)
    weighted = image * (m[..., None] if image.ndim == 3 else m)
    out, common = [], None
    for sigma in sigmas:
        factor = _reduction(sigma, mask.shape)
        smoothed = _normalised_blur(weighted, m, sigma, factor)
        if common is None:
            common = (smoothed.shape[:2], factor)
        out.append(resize_to(smoothed, common[0]))
    return Smooth(out, common[1])


def _reduction(sigma: float, shape: tuple[int, int]) -> int:
    return int(max(1, min(sigma // 2, min(shape) // 8)))


def _normalised_blur(weighted: np.ndarray, mask: np.ndarray, sigma: float, factor: int) -> np.ndarray:
    import cv2

    if factor > 1:
        small = (max(1, mask.shape[0] // factor), max(1, mask.shape[1] // factor))
        weighted, mask = resize_to(weighted, small), resize_to(mask, small)
    num = cv2.GaussianBlur(weighted, (0, 0), sigma / factor, borderType=cv2.BORDER_REPLICATE)
    den = np.maximum(cv2.GaussianBlur(mask, (0, 0), sigma / factor, borderType=cv2.BORDER_REPLICATE), 1e-4)
    return num / (den[..., None] if num.ndim == 3 else den)


def refine_maps(render: np.ndarray, source: np.ndarray, map_x: np.ndarray, map_y: np.ndarray,
                support: np.ndarray, max_shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Correct the mesh correspondence by the optical flow from the render to the portrait ``source`` warped
    by the maps (both blurred alike so their sharpness difference does not read as motion; outside the
    support the warped image is the render itself, so the support's edge is no false structure). The flow is
    clipped to ``max_shift`` pixels and used only where the corrected position still falls inside the
    support. (Flow at half resolution costs ~10% less time and 1-1.5 dB on misaligned renders: not worth it.)"""
    import cv2

    flow_of = _dense_flow()
    if max_shift <= 0 or flow_of is None:
        if flow_of is None:
            warnings.warn("this OpenCV has no DIS optical flow: the reference restorer runs without refinement",
                          stacklevel=3)
        return map_x, map_y
    warped = cv2.remap(source, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    warped = np.where(support[..., None], warped, render)
    to_u8 = lambda im: np.clip(cv2.GaussianBlur(gray(im), (0, 0), 1.5), 0, 255).astype(np.uint8)  # noqa: E731
    flow = flow_of(to_u8(render), to_u8(warped), None)
    length = cv2.magnitude(flow[..., 0], flow[..., 1])
    flow *= np.minimum(1.0, max_shift / np.maximum(length, 1e-6))[..., None]
    grid_y, grid_x = np.indices(support.shape, dtype=np.float32)
    at_x, at_y = grid_x + flow[..., 0], grid_y + flow[..., 1]
    # Map and support resampled together; a corrected sample that mixes in pixels outside the support would
    # read an undefined map, so it keeps the uncorrected position.
    stacked = np.dstack([map_x, map_y, support.astype(np.float32)])
    moved = cv2.remap(stacked, at_x, at_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    keep = (moved[..., 2] > 0.999) & support
    return np.where(keep, moved[..., 0], map_x), np.where(keep, moved[..., 1], map_y)


def alignment_weight(render: np.ndarray, portrait: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """1 where the warped portrait's structures sit where the render's are, falling towards 0 where they are
    displaced (a residual tracking error the flow could not fix): the local normalised cross-correlation of
    the two images' mid band (2-6 pixels, which a blurred render still has), computed at half resolution.
    Flat regions (no structure to compare) keep weight 1; correlation above ``threshold`` + 0.2 counts as
    aligned, below ``threshold`` - 0.2 as misaligned."""
    import cv2

    def mid_band(image: np.ndarray) -> np.ndarray:
        half = cv2.pyrDown(gray(image))
        return cv2.GaussianBlur(half, (0, 0), 1.0) - cv2.GaussianBlur(half, (0, 0), 3.0)

    a, b = mid_band(render), mid_band(portrait)
    local = lambda x: cv2.GaussianBlur(x, (0, 0), 3.0)  # noqa: E731
    cov, var_a, var_b = local(a * b), local(a * a), local(b * b)
    ncc = cov / np.sqrt(var_a * var_b + 1e-6)
    structure = var_b / (var_b + _STRUCTURE_FLOOR)
    aligned = np.clip((ncc - threshold + 0.2) / 0.4, 0.0, 1.0)
    weight = 1.0 - structure * (1.0 - aligned)
    return resize_to(weight.astype(np.float32), render.shape)


def _dense_flow():
    """OpenCV's DIS optical flow (fast preset) as ``calc(previous, next, None)``, or None where this OpenCV build
    lacks it; the preset constant's name differs between OpenCV 4 and 5."""
    import cv2

    create = getattr(cv2, "DISOpticalFlow_create", None)
    if create is None:
        return None
    preset = getattr(cv2, "DISOPTICAL_FLOW_PRESET_FAST", None)
    if preset is None:
        preset = getattr(cv2, "DISOpticalFlow_PRESET_FAST", 1)
    return create(preset).calc


def consistency_weight(low_render: np.ndarray, low_portrait: np.ndarray, coarse_render: np.ndarray,
                       coarse_portrait: np.ndarray, support: np.ndarray, threshold: float) -> np.ndarray:
    """1 where render and warped portrait agree at the scale of facial features, falling to 0 at twice the
    threshold (all images at one reduced resolution). Compared band-passed (fine low-pass minus coarse
    low-pass) so that a smooth lighting or colour difference between avatar and photo does not count, with
    each channel's contrast matched over the face; an open mouth where the portrait's is closed, or closed
    eyes over open ones, differ a lot."""
    band_r = low_render - coarse_render
    band_p = low_portrait - coarse_portrait
    inside = support > 0.5
    if inside.sum() >= 16:
        gain = band_r[inside].std(axis=0) / np.maximum(band_p[inside].std(axis=0), 1e-3)
        band_p = band_p * np.clip(gain, 0.5, 2.0).astype(np.float32)
    difference = np.sqrt(((band_r - band_p) ** 2).mean(axis=2)) / 255.0
    return np.clip((2.0 * threshold - difference) / threshold, 0.0, 1.0).astype(np.float32)


def feathered_weight(support: np.ndarray, soft: np.ndarray, feather_px: float) -> np.ndarray:
    """The final weight: ``soft`` (foreshortening x consistency, in [0, 1]) smoothed over the support, times a
    ramp that rises from 0 at the support's boundary to 1 at ``feather_px`` inside it, so the weight is exactly
    0 outside the support and the transfer has no visible seam."""
    import cv2

    inside = support.astype(np.uint8)
    if feather_px < 1.0:
        return (soft * inside).astype(np.float32)
    ramp = np.clip(cv2.distanceTransform(inside, cv2.DIST_L2, 3) / feather_px, 0.0, 1.0)
    smooth = masked_lowpass(soft.astype(np.float32), inside, [max(feather_px / 2.0, 1.0)])
    return (np.clip(resize_to(smooth.images[0], support.shape), 0.0, 1.0) * ramp).astype(np.float32)


def band_share(render_band: np.ndarray, portrait_band: np.ndarray, support: np.ndarray) -> np.ndarray:
    """How much of one band to replace, per pixel of the band's level (float32 in [0, 1]): 1 where the render's
    local amplitude is at most half the portrait's (the frequencies the render is missing), 0 where it has
    nearly all of it (the render is sharp there already, or the portrait has no detail to give), linear
    between."""
    energy = np.dstack([gray(render_band) ** 2, gray(portrait_band) ** 2])
    local = masked_lowpass(energy, support, [_ENERGY_SIGMA])
    amplitude = np.sqrt(local.images[0][..., 0] / np.maximum(local.images[0][..., 1], _NOISE_FLOOR))
    share = np.clip((_AMPLITUDE_NONE - amplitude) / (_AMPLITUDE_NONE - _AMPLITUDE_FULL), 0.0, 1.0)
    return resize_to(share.astype(np.float32), render_band.shape)
