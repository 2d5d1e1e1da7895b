"""Image operations of the detail transfer: Laplacian pyramids, masked low-pass filters, flow refinement and
the weight map. All work on float32 images of one crop; OpenCV does the filtering. Anything smooth (colour
statistics, consistency, gains, band shares) is computed at a reduced resolution and upsampled at the end."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_AMPLITUDE_FULL, _AMPLITUDE_NONE = 0.5, 0.9  # render/portrait band amplitude: replace fully below, keep above
_ENERGY_SIGMA = 3.0  # pixels of a pyramid level over which a band's local amplitude is measured
_NOISE_FLOOR = 0.25  # squared grey levels: a band weaker than half a grey level carries no detail


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
    outside the mask). Computed at a resolution reduced so the smallest sigma is still ~2 pixels there."""
    import cv2

    height, width = mask.shape
    factor = int(max(1, min(min(sigmas) // 2, min(height, width) // 8)))
    small = (max(1, height // factor), max(1, width // factor))
    m = mask.astype(np.float32)
    weighted = image * (m[..., None] if image.ndim == 3 else m)
    if factor > 1:
        weighted, m = resize_to(weighted, small), resize_to(m, small)
    out = []
    for sigma in sigmas:
        num = cv2.GaussianBlur(weighted, (0, 0), sigma / factor, borderType=cv2.BORDER_REPLICATE)
        den = np.maximum(cv2.GaussianBlur(m, (0, 0), sigma / factor, borderType=cv2.BORDER_REPLICATE), 1e-4)
        out.append(num / (den[..., None] if num.ndim == 3 else den))
    return Smooth(out, factor)


def refine_maps(render: np.ndarray, warped: np.ndarray, map_x: np.ndarray, map_y: np.ndarray,
                support: np.ndarray, max_shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Correct the mesh correspondence by the optical flow from the render to the warped portrait (both
    blurred alike so their sharpness difference does not read as motion); the flow is clipped to
    ``max_shift`` pixels and used only where the corrected position still falls inside the support."""
    import cv2

    if max_shift <= 0:
        return map_x, map_y
    to_u8 = lambda im: np.clip(cv2.GaussianBlur(gray(im), (0, 0), 1.5), 0, 255).astype(np.uint8)  # noqa: E731
    flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST).calc(to_u8(render), to_u8(warped), None)
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
