"""Image operations of the detail transfer: band decomposition, masked low-pass filters, flow refinement and
the weight map. All work on float32 images of one crop; OpenCV does the filtering."""
from __future__ import annotations

import numpy as np

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_AMPLITUDE_FULL, _AMPLITUDE_NONE = 0.5, 0.9  # render/portrait band amplitude: replace fully below, keep above


def laplacian_bands(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """Band-pass images at full resolution, finest first: band k = lowpass_{k-1} - lowpass_k where lowpass_k
    is the image taken k levels down a Gaussian pyramid and back up (lowpass_0 = the image)."""
    import cv2

    sizes = [(image.shape[1], image.shape[0])]
    down = [image]
    for _ in range(levels):
        if min(down[-1].shape[:2]) < 2:
            break
        down.append(cv2.pyrDown(down[-1]))
        sizes.append((down[-1].shape[1], down[-1].shape[0]))
    previous, bands = image, []
    for k in range(1, len(down)):
        up = down[k]
        for j in range(k, 0, -1):
            up = cv2.pyrUp(up, dstsize=sizes[j - 1])
        bands.append(previous - up)
        previous = up
    return bands


def masked_lowpass(image: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian low-pass of ``image`` over the pixels where ``mask`` > 0 only (normalised convolution), so
    pixels outside the mask (background, a portrait's unseen parts) do not leak in. Computed at a reduced
    resolution for large sigmas; the result is defined everywhere (the nearest masked values spread out)."""
    import cv2

    height, width = mask.shape
    factor = int(max(1, min(sigma // 2, min(height, width) // 8)))
    small = (max(1, width // factor), max(1, height // factor))
    m = mask.astype(np.float32)
    weighted = image * m[..., None] if image.ndim == 3 else image * m
    if factor > 1:
        weighted = cv2.resize(weighted, small, interpolation=cv2.INTER_AREA)
        m = cv2.resize(m, small, interpolation=cv2.INTER_AREA)
    s = sigma / factor
    num = cv2.GaussianBlur(weighted, (0, 0), s, borderType=cv2.BORDER_REPLICATE)
    den = cv2.GaussianBlur(m, (0, 0), s, borderType=cv2.BORDER_REPLICATE)
    out = num / np.maximum(den, 1e-4)[..., None] if num.ndim == 3 else num / np.maximum(den, 1e-4)
    if factor > 1:
        out = cv2.resize(out, (width, height), interpolation=cv2.INTER_LINEAR)
    return out


def luminance(image: np.ndarray) -> np.ndarray:
    return image @ _LUMA


def refine_maps(render: np.ndarray, warped: np.ndarray, map_x: np.ndarray, map_y: np.ndarray,
                support: np.ndarray, max_shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Correct the mesh correspondence by the optical flow from the render to the warped portrait (both
    blurred alike so their sharpness difference does not read as motion); the flow is clipped to
    ``max_shift`` pixels and used only where the corrected position still falls inside the support."""
    import cv2

    if max_shift <= 0:
        return map_x, map_y
    to_gray = lambda im: np.clip(cv2.GaussianBlur(luminance(im), (0, 0), 1.5), 0, 255).astype(np.uint8)  # noqa: E731
    flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST).calc(to_gray(render), to_gray(warped), None)
    length = np.sqrt((flow ** 2).sum(axis=2, keepdims=True))
    flow *= np.minimum(1.0, max_shift / np.maximum(length, 1e-6))
    grid_y, grid_x = np.indices(support.shape, dtype=np.float32)
    at_x, at_y = grid_x + flow[..., 0], grid_y + flow[..., 1]
    new_x = cv2.remap(map_x, at_x, at_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    new_y = cv2.remap(map_y, at_x, at_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    # A corrected sample that mixes in pixels outside the support would read an undefined map.
    still_inside = cv2.remap(support.astype(np.float32), at_x, at_y, cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0) > 0.999
    keep = still_inside & support
    return np.where(keep, new_x, map_x), np.where(keep, new_y, map_y)


def consistency_weight(low_render: np.ndarray, low_portrait: np.ndarray, coarse_render: np.ndarray,
                       coarse_portrait: np.ndarray, support: np.ndarray, threshold: float) -> np.ndarray:
    """1 where render and warped portrait agree at the scale of facial features, falling to 0 at twice the
    threshold. Compared band-passed (fine low-pass minus coarse low-pass) so that a smooth lighting or colour
    difference between avatar and photo does not count, with each channel's contrast matched over the face;
    an open mouth where the portrait's is closed, or closed eyes over open ones, differ a lot."""
    band_r = low_render - coarse_render
    band_p = low_portrait - coarse_portrait
    inside = support > 0
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
    smooth = masked_lowpass(soft.astype(np.float32), inside, max(feather_px / 2.0, 1.0))
    return (np.clip(smooth, 0.0, 1.0) * ramp).astype(np.float32)


def band_mix(render_bands: list[np.ndarray], portrait_bands: list[np.ndarray], support: np.ndarray) -> list[np.ndarray]:
    """How much of each band to replace, per pixel (float32 (H, W) maps in [0, 1]): 1 where the render's local
    amplitude in that band is at most half the portrait's (the frequencies the render is missing), 0 where it
    has nearly all of it (the render is sharp there already, or the portrait has no detail to give), linear
    between. Local amplitude = root of the band's energy under a Gaussian a few band wavelengths wide."""
    mix = []
    for k, (r, p) in enumerate(zip(render_bands, portrait_bands)):
        sigma = 3.0 * 2 ** k
        energy_r = masked_lowpass(luminance(r) ** 2, support, sigma)
        energy_p = masked_lowpass(luminance(p) ** 2, support, sigma)
        amplitude = np.sqrt(energy_r / np.maximum(energy_p, 0.25))  # 0.25: half a grey level, a noise floor
        m = (_AMPLITUDE_NONE - amplitude) / (_AMPLITUDE_NONE - _AMPLITUDE_FULL)
        mix.append(np.clip(m, 0.0, 1.0).astype(np.float32))
    return mix
