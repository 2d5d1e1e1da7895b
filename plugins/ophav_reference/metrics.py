"""Measures used to judge a restorer without a learned metric: sharpness in the face region and the distance
between two tracked face shapes."""
from __future__ import annotations

import numpy as np


def _gray(image: np.ndarray) -> np.ndarray:
    return (np.asarray(image, np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))


def laplacian_variance(image: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Variance of the Laplacian of the grey image over ``mask`` (the classic focus measure; higher = sharper)."""
    import cv2

    lap = cv2.Laplacian(_gray(image), cv2.CV_32F, ksize=1)
    values = lap[mask] if mask is not None else lap.ravel()
    return float(values.var()) if values.size else 0.0


def high_frequency_energy(image: np.ndarray, mask: np.ndarray | None = None, sigma: float = 1.5) -> float:
    """Mean squared residual of the grey image minus its Gaussian blur (sigma in pixels) over ``mask``: the
    energy of the frequencies a blur of that size removes."""
    import cv2

    gray = _gray(image)
    residual = gray - cv2.GaussianBlur(gray, (0, 0), sigma)
    values = residual[mask] if mask is not None else residual.ravel()
    return float((values ** 2).mean()) if values.size else 0.0


def shape_distance(shape: np.ndarray, reference: np.ndarray) -> float:
    """Mean vertex distance between two face shapes (V, 3) after the best similarity alignment of ``shape``
    onto ``reference`` (removes pose and scale), in units of the reference's face width (x extent)."""
    a = np.asarray(shape, np.float64)
    b = np.asarray(reference, np.float64)
    a0, b0 = a - a.mean(axis=0), b - b.mean(axis=0)
    u, s, vt = np.linalg.svd(a0.T @ b0)
    d = np.sign(np.linalg.det(u @ vt))
    fix = np.diag([1.0, 1.0, d])
    rotation = u @ fix @ vt
    scale = (s * np.diag(fix)).sum() / max((a0 ** 2).sum(), 1e-12)
    aligned = scale * a0 @ rotation
    width = max(float(np.ptp(b[:, 0])), 1e-12)
    return float(np.linalg.norm(aligned - b0, axis=1).mean() / width)
