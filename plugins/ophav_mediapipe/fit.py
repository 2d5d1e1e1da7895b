"""Geometry of the tracker: rigid pose from landmarks, lifting landmarks to canonical space, the expression
basis, temporal filtering and gap filling. numpy (vectorised over frames) plus cv2.solvePnP."""
from __future__ import annotations

import numpy as np


def intrinsics(width: int, height: int, focal: float) -> np.ndarray:
    """Pinhole K with square pixels and the principal point at the image centre (pixel centres at integers)."""
    return np.array([[focal, 0.0, (width - 1) / 2.0], [0.0, focal, (height - 1) / 2.0], [0.0, 0.0, 1.0]])


# ---------------------------------------------------------------------------------------------- rigid fit


def weighted_similarity(src: np.ndarray, dst: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted Umeyama fit ``dst ~ s R src + b`` for every frame.

    src (V, 3) or (N, V, 3); dst (N, V, 3); weights (V,) summing to 1. Returns s (N,), R (N, 3, 3), b (N, 3)."""
    w = weights[None, :, None]
    src = np.broadcast_to(src, dst.shape)
    mu_s, mu_d = (src * w).sum(1), (dst * w).sum(1)
    xs, xd = src - mu_s[:, None], dst - mu_d[:, None]
    cov = np.einsum("nvi,nvj->nij", xd * w, xs)
    U, S, Vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(U @ Vt))
    D = np.ones((len(dst), 3))
    D[:, 2] = d
    R = U @ (D[:, :, None] * Vt)
    var_s = (xs ** 2 * w).sum((1, 2))
    s = (S * D).sum(1) / np.maximum(var_s, 1e-12)
    b = mu_d - s[:, None] * np.einsum("nij,nj->ni", R, mu_s)
    return s, R, b


def weak_perspective_pose(landmarks: np.ndarray, shape: np.ndarray, weights: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Initial pose (R (N, 3, 3), t (N, 3)) from a 3D similarity fit of the landmark cloud (pixels, with
    MediaPipe's depth) to the head-space shape: the scale s (pixels per cm) gives the depth f / s."""
    s, R, b = weighted_similarity(shape, landmarks, weights)
    focal = K[0, 0]
    depth = focal / np.maximum(s, 1e-9)
    t = np.stack([(b[:, 0] - K[0, 2]) * depth / focal, (b[:, 1] - K[1, 2]) * depth / focal, depth], axis=1)
    return R, t


def refine_pnp(pixels: np.ndarray, shape: np.ndarray, R0: np.ndarray, t0: np.ndarray, K: np.ndarray,
               index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Perspective refinement (cv2.solvePnP, Levenberg-Marquardt from the initial guess) of each frame's pose
    on the rigid vertices ``index``. pixels (N, V, 2); shape (V, 3) or (N, V, 3)."""
    import cv2

    n = len(pixels)
    shape = np.broadcast_to(shape, (n,) + shape.shape[-2:])
    R, t = R0.copy(), t0.copy()
    for i in range(n):
        rvec, _ = cv2.Rodrigues(R0[i])
        ok, rvec, tvec = cv2.solvePnP(np.ascontiguousarray(shape[i, index], np.float64),
                                      np.ascontiguousarray(pixels[i, index], np.float64), K, None,
                                      rvec=rvec, tvec=t0[i].reshape(3, 1).astype(np.float64).copy(),
                                      useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
        if ok and np.isfinite(rvec).all() and tvec[2, 0] > 0:
            R[i] = cv2.Rodrigues(rvec)[0]
            t[i] = tvec[:, 0]
    return R, t


def lift_to_camera(landmarks: np.ndarray, R: np.ndarray, t: np.ndarray, shape: np.ndarray, weights: np.ndarray,
                   K: np.ndarray) -> np.ndarray:
    """Camera-space 3D landmarks (N, V, 3) on the pixel rays: each landmark's depth is the posed shape's depth
    (weighted mean over the rigid points) plus MediaPipe's relative depth converted from pixels to cm at the
    head's distance. Reprojecting them gives the detected pixels back exactly."""
    focal = K[0, 0]
    posed = np.einsum("nij,nvj->nvi", R, np.broadcast_to(shape, landmarks.shape)) + t[:, None]
    rel = landmarks[..., 2] - (landmarks[..., 2] * weights).sum(1, keepdims=True)
    depth = (posed[..., 2] * weights).sum(1, keepdims=True) + rel * (t[:, 2:3] / focal)
    depth = np.maximum(depth, 1e-3)
    x = (landmarks[..., 0] - K[0, 2]) / focal * depth
    y = (landmarks[..., 1] - K[1, 2]) / K[1, 1] * depth
    return np.stack([x, y, depth], axis=-1)


def to_canonical(points_cam: np.ndarray, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Head-space points (N, V, 3) = R^T (X - t)."""
    return np.einsum("nji,nvj->nvi", R, points_cam - t[:, None])


# ---------------------------------------------------------------------------------------------- basis


def orthogonal_complement(vectors: np.ndarray, against: np.ndarray) -> np.ndarray:
    """Rows of ``vectors`` (k, D) with the span of ``against`` (m, D) projected out."""
    if len(against) == 0:
        return vectors
    Q, _ = np.linalg.qr(against.T)
    return vectors - (vectors @ Q) @ Q.T


def pca_components(residuals: np.ndarray, count: int, exclude: np.ndarray) -> np.ndarray:
    """Up to ``count`` principal directions (k, D) of residuals (N, D) outside the span of ``exclude``, each
    scaled by its standard deviation over the frames (so coefficients have unit variance)."""
    if count <= 0 or len(residuals) < 2:
        return np.zeros((0, residuals.shape[1]))
    X = orthogonal_complement(residuals, exclude)
    _, S, Vt = np.linalg.svd(X, full_matrices=False)
    keep = S > S[0] * 1e-6 if len(S) else np.zeros(0, bool)
    std = S[keep][:count] / np.sqrt(len(residuals))
    return Vt[keep][:count] * std[:, None]


def graph_laplacian(faces: np.ndarray, num_vertices: int) -> np.ndarray:
    """Dense combinatorial Laplacian (V, V) of the mesh's edge graph (the face mesh is small: 468 vertices)."""
    A = np.zeros((num_vertices, num_vertices))
    for a, b in ((0, 1), (1, 2), (2, 0)):
        A[faces[:, a], faces[:, b]] = 1.0
        A[faces[:, b], faces[:, a]] = 1.0
    return np.diag(A.sum(1)) - A


def region_modes(laplacian: np.ndarray, region: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` smoothest scalar fields (count, V) that live on ``region`` (bool (V,)) and vanish outside
    it: the lowest Dirichlet eigenvectors of the Laplacian restricted to the region. They are local, smooth
    deformation patterns (a bump, a left/right tilt, an up/down split...) that fade to zero at the border.
    Across a hole of the mesh (the mouth, the eyes) neighbouring vertices are far apart on the graph, so the
    modes can move the lips or lids apart."""
    from scipy.linalg import eigh

    idx = np.nonzero(region)[0]
    k = min(count, len(idx))
    # Only the k lowest eigenpairs (LAPACK's subset driver): 4-10x faster than all of them for k << V.
    _, vecs = eigh(laplacian[np.ix_(idx, idx)], subset_by_index=[0, k - 1])
    # An eigenvector's sign is arbitrary (it differs between LAPACK drivers): its largest entry is made positive.
    vecs = vecs * np.sign(vecs[np.abs(vecs).argmax(axis=0), np.arange(vecs.shape[1])])
    out = np.zeros((count, len(region)))
    out[:k, idx] = vecs[:, :k].T
    return out


# ---------------------------------------------------------------------------------------------- time


def one_euro_zero_phase(x: np.ndarray, fps: float, min_cutoff: float, beta: float, d_cutoff: float = 1.0) -> np.ndarray:
    """One-Euro filter (Casiez et al. 2012) over axis 0 of ``x`` (N, ...), run forwards and backwards and
    averaged so it adds no lag: strong smoothing while the signal is slow (a still head does not jitter),
    little while it moves fast (a quick turn is not blurred)."""
    if len(x) < 3:
        return x.copy()

    def alpha(cutoff):
        tau = 1.0 / (2 * np.pi * cutoff)
        return 1.0 / (1.0 + tau * fps)

    def run(signal: np.ndarray) -> np.ndarray:
        out = np.empty_like(signal)
        out[0] = signal[0]
        dx_prev = np.zeros_like(signal[0])
        a_d = alpha(d_cutoff)
        for i in range(1, len(signal)):
            dx = (signal[i] - out[i - 1]) * fps
            dx_prev = a_d * dx + (1 - a_d) * dx_prev
            cutoff = min_cutoff + beta * np.abs(dx_prev)
            a = alpha(cutoff)
            out[i] = a * signal[i] + (1 - a) * out[i - 1]
        return out

    return 0.5 * (run(x) + run(x[::-1])[::-1])


def fill_gaps(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Linear interpolation over axis 0 of ``values`` (N, ...) across frames where ``valid`` is False; frames
    before the first / after the last valid one hold the nearest valid value."""
    idx = np.nonzero(valid)[0]
    if len(idx) == len(valid):
        return values
    flat = values.reshape(len(values), -1)
    filled = np.empty_like(flat)
    frames = np.arange(len(values))
    for c in range(flat.shape[1]):
        filled[:, c] = np.interp(frames, idx, flat[idx, c])
    return filled.reshape(values.shape)


def gap_lengths(valid: np.ndarray) -> np.ndarray:
    """Per frame: the length of the run of invalid frames it belongs to (0 for valid frames)."""
    out = np.zeros(len(valid), int)
    i = 0
    while i < len(valid):
        if valid[i]:
            i += 1
            continue
        j = i
        while j < len(valid) and not valid[j]:
            j += 1
        out[i:j] = j - i
        i = j
    return out
