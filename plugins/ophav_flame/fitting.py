"""The batched landmark fit: FLAME's shape (shared over the frames), per-frame expression, jaw, neck and rigid
head pose, to 2D landmarks under a fixed pinhole camera, all frames at once (Levenberg-Marquardt in PyTorch).

Camera space (OpenCV) = ``R H(FLAME(shape, expression, pose)) + t``, where ``H`` is FLAME -> ophav head space
(cm, y down, z into the screen; :mod:`ophav_flame.model`). FLAME's own global rotation stays zero: the rigid pose
is ``R, t``, so the tracking contract's ``X = R X_head + t`` holds with FLAME's origin as the head origin.

Energy (per frame, averaged over frames):

* landmarks: mean over landmarks of ``w_l |proj - observed|^2 / (0.01 face width)^2`` (a 1 % error costs 1;
  face width = the distance of MediaPipe landmarks 234 and 454 in the frame), zero for frames without a face;
* priors: ``shape_prior |shape|^2 + expression_prior |expression|^2 + pose_prior |jaw, neck|^2``;
* smoothness (videos): ``smooth`` times the squared first differences of expression (x0.1), jaw, neck, rotation
  (x30: radians) and translation (x0.1, cm), per frame.

Only the landmark points are evaluated per step (blended from their triangles; joints from the precomputed
regressor products), see :class:`LandmarkModel` and :func:`fit`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ophav_flame.layer import FlameLayer, rodrigues

HEAD = (100.0, -100.0, -100.0)
SIGMA = 0.01  # landmark noise scale: 1 % of the face width


@dataclass
class FitSettings:
    iterations: int = 6
    shape_prior: float = 0.003
    expression_prior: float = 0.001
    pose_prior: float = 1.0
    smooth: float = 0.3
    fit_shape: bool = True
    threads: int = 1  # torch CPU threads during the fit (its matrices are small: one thread wastes least)


@dataclass
class FitResult:
    shape: np.ndarray        # (S,)
    expression: np.ndarray   # (N, E)
    jaw: np.ndarray          # (N, 3)
    neck: np.ndarray         # (N, 3)
    rotation: np.ndarray     # (N, 3, 3)
    translation: np.ndarray  # (N, 3) cm
    error: np.ndarray        # (N,) mean landmark error / face width (NaN where no face)
    seconds: float = 0.0
    iterations: int = 0


def face_width(landmarks: np.ndarray, left: int = 454, right: int = 234) -> np.ndarray:
    """(N,) face width in pixels: the distance of MediaPipe's cheek landmarks (or the x extent)."""
    if landmarks.shape[1] > max(left, right):
        return np.linalg.norm(landmarks[:, left] - landmarks[:, right], axis=-1)
    return np.ptp(landmarks[..., 0], axis=1)


def pose_vector(neck: torch.Tensor, jaw: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros_like(neck)
    return torch.cat([zero, neck, jaw, zero, zero], dim=1)


class LandmarkModel:
    """FLAME evaluated at embedded surface points only, with the eyes at rest (what the fit uses). Each point's
    template, blendshapes, pose correctives and skinning weights are the barycentric blend of its triangle's
    (the point is skinned with the blended weights: within a triangle FLAME's weights barely vary, and the fit
    then has an exact analytic Jacobian). With the global and eye rotations zero, FLAME's five skinning
    transforms reduce to three: identity (global), the neck's (neck and both eyes) and the jaw's."""

    def __init__(self, layer: FlameLayer, triangles: np.ndarray, bary: np.ndarray):
        dev, dt = layer.v_template.device, layer.v_template.dtype
        corners = layer.faces[torch.as_tensor(triangles, dtype=torch.int64, device=dev)]   # (L, 3)
        b = torch.as_tensor(bary, dtype=dt, device=dev)
        blend = lambda a: (a[corners] * b.reshape(b.shape + (1,) * (a.dim() - 1))).sum(1)  # noqa: E731
        self.template = blend(layer.v_template)            # (L, 3)
        self.dirs = blend(layer.dirs)                      # (L, 3, K)
        self.posedirs = blend(layer.posedirs)[:, :, :18]   # (L, 3, 18): neck, jaw
        w = blend(layer.weights)
        self.w_root, self.w_neck, self.w_jaw = w[:, 0:1], (w[:, 1] + w[:, 3] + w[:, 4])[:, None], w[:, 2:3]
        self.J_template, self.J_dirs = layer.J_template, layer.J_dirs  # (5, 3), (5, 3, K)
        self.L = int(corners.shape[0])

    def __call__(self, coeff: torch.Tensor, neck: torch.Tensor, jaw: torch.Tensor, parts: bool = False):
        """coeff (B, K) shape+expression coefficients, neck/jaw (B, 3) axis-angle -> (B, L, 3) FLAME
        coordinates (and with ``parts`` the rotations and joints the Jacobian needs)."""
        B = coeff.shape[0]
        v = self.template + torch.einsum("lck,bk->blc", self.dirs, coeff)
        J = self.J_template + torch.einsum("jck,bk->bjc", self.J_dirs, coeff)
        Rn, Rj = rodrigues(neck), rodrigues(jaw)
        eye = torch.eye(3, dtype=coeff.dtype, device=coeff.device)
        feature = torch.cat([(Rn - eye).reshape(B, 9), (Rj - eye).reshape(B, 9)], 1)
        v = v + torch.einsum("lcq,bq->blc", self.posedirs, feature)
        J1, J2 = J[:, 1:2], J[:, 2:3]
        Rnj = Rn @ Rj
        v_neck = (v - J1) @ Rn.transpose(1, 2) + J1
        v_jaw = (v - J2) @ Rnj.transpose(1, 2) + (J2 - J1) @ Rn.transpose(1, 2) + J1
        out = self.w_root * v + self.w_neck * v_neck + self.w_jaw * v_jaw
        return (out, Rn, Rnj) if parts else out

    def projected_jacobian(self, P: torch.Tensor, Rn: torch.Tensor, Rnj: torch.Tensor, columns: slice) -> torch.Tensor:
        """(B, L, a, k): ``P`` (B, L, a, 3), the derivative of some output by the points (FLAME coordinates),
        times the derivative of the points by the coefficients ``columns``. Fused: the (B, L, 3, k) derivative of
        the points is never formed."""
        Bc = self.dirs[:, :, columns]
        J1d, J2d = self.J_dirs[1, :, columns], self.J_dirs[2, :, columns]
        eye = torch.eye(3, dtype=Rn.dtype, device=Rn.device)
        Rn_, Rnj_ = Rn[:, None], Rnj[:, None]
        M = self.w_root[..., None] * P + self.w_neck[..., None] * (P @ Rn_) + self.w_jaw[..., None] * (P @ Rnj_)
        out = torch.einsum("blaj,ljk->blak", M, Bc)
        shifts = torch.cat([torch.einsum("bij,jk->bik", eye - Rn, J1d),          # neck: (I - Rn) J1
                            torch.einsum("bij,jk->bik", Rn - Rnj, J2d)], 1)      # jaw: (Rn - Rnj) J2
        Pw = torch.cat([(self.w_neck + self.w_jaw)[..., None] * P, self.w_jaw[..., None] * P], -1)
        return out + torch.einsum("blaj,bjk->blak", Pw, shifts)


def fit(layer: FlameLayer, triangles: np.ndarray, bary: np.ndarray, observed: np.ndarray, valid: np.ndarray,
        K: np.ndarray, R0: np.ndarray, t0: np.ndarray, settings: FitSettings, landmark_weights: np.ndarray | None = None,
        shape: np.ndarray | None = None, video: bool = True, device: str = "cpu",
        init: np.ndarray | None = None, trace: list | None = None) -> FitResult:
    """Fit ``observed`` (N, L, 2) pixels of the landmarks embedded at (``triangles``, ``bary``) (L,), (L, 3).
    ``R0, t0``: the initial rigid pose (N, 3, 3), (N, 3) cm. ``shape``: the initial (or, with
    ``settings.fit_shape`` False, fixed) identity. ``init``: (N, E + 6) initial expression, jaw and neck.

    Levenberg-Marquardt on all parameters at once: per frame D = E + 12 (expression, jaw, neck, rotation,
    translation), shared S (shape), solved through the Schur complement of the block-diagonal frame part
    (one batched D x D solve per frame, one S x S solve). Jacobians: analytic for the coefficients and the
    translation, central differences for the 9 rotation parameters. Temporal smoothness enters each frame's
    block with its neighbours' current values as the anchor (block Jacobi)."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu" and settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _fit(layer, triangles, bary, observed, valid, K, R0, t0, settings, landmark_weights, shape, video,
                    device, init, trace)
    finally:
        torch.set_num_threads(threads)


def _fit(layer, triangles, bary, observed, valid, K, R0, t0, settings, landmark_weights, shape, video, device, init,
         trace) -> FitResult:
    start = time.perf_counter()
    dev = torch.device(device)
    dt = torch.float32
    layer = layer.to(dev)
    model = LandmarkModel(layer, triangles, bary)
    n, L = observed.shape[:2]
    S, E = layer.num_shape, layer.num_expressions
    T = lambda a: torch.as_tensor(np.asarray(a), dtype=dt, device=dev)  # noqa: E731
    obs, Kt = T(observed), T(K)
    fx, fy, cx, cy = (float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]))
    width = np.where(valid, face_width(observed), 1.0)
    width = np.where(width > 1, width, 1.0)
    w_l = np.ones(L) if landmark_weights is None else np.asarray(landmark_weights, np.float64)
    w_frame = valid.astype(np.float64)
    count = max(float(w_frame.sum()), 1.0)
    sw = T(np.sqrt(w_l / w_l.sum())[None, :] * (np.sqrt(w_frame / count) / (SIGMA * width))[:, None])[..., None]
    head = T(HEAD)
    R0t, t0t = T(R0), T(t0)
    fit_shape = settings.fit_shape and S > 0
    beta = T(np.zeros(S) if shape is None else np.asarray(shape)[:S])
    D = E + 12
    per = torch.zeros(n, D, device=dev, dtype=dt)
    if init is not None:
        per[:, :E + 6] = T(init)
    # The neck's rotation and the head's are nearly indistinguishable from face landmarks: the neck is held 10x
    # harder, so the rigid pose carries the head's turn.
    prior = T(np.concatenate([np.full(E, settings.expression_prior), np.full(3, settings.pose_prior),
                              np.full(3, 10 * settings.pose_prior), np.zeros(6)]) / count)
    use_smooth = video and settings.smooth > 0 and n > 2
    smooth_w = T(np.concatenate([np.full(E, 0.1), np.full(9, 30.0), np.full(3, 0.1)]) * settings.smooth / count)

    def forward(beta_, per_, parts=False):
        psi, jaw, neck, rot, tau = per_[:, :E], per_[:, E:E + 3], per_[:, E + 3:E + 6], per_[:, E + 6:E + 9], per_[:, E + 9:]
        coeff = torch.cat([beta_[None].expand(per_.shape[0], -1), psi], 1)
        q, Rn, Rnj = model(coeff, neck, jaw, parts=True)
        R = R0t @ rodrigues(rot)
        cam = (q * head) @ R.transpose(1, 2) + (t0t + tau)[:, None, :]
        z = cam[..., 2].clamp_min(1e-3)
        proj = torch.stack([fx * cam[..., 0] / z + cx, fy * cam[..., 1] / z + cy], -1)
        r = ((proj - obs) * sw).reshape(per_.shape[0], -1)
        return (r, cam, R, Rn, Rnj) if parts else r

    def total_cost(r, p, b, anchor=None):
        cost = r.pow(2).sum() + (p.pow(2) * prior).sum()
        if use_smooth:
            cost = cost + ((p[1:] - p[:-1]).pow(2) * smooth_w).sum()
        return cost + (settings.shape_prior * b.pow(2).sum() if fit_shape else 0.0)

    def solve_frames(Ad: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """Solve the frame system: block diagonal ``Ad`` (n, D, D) plus, with smoothness, the first-difference
        coupling (off-diagonal blocks -W): block Thomas algorithm over the frames."""
        if not use_smooth:
            return torch.linalg.solve(Ad, rhs)
        W = smooth_w
        Dp, Rp = [], []
        for k in range(n):
            Dk, Rk = Ad[k], rhs[k]
            if k:
                inv_prev = torch.linalg.solve(Dp[-1], torch.cat([torch.diag(W), Rp[-1]], 1))
                Dk = Dk - W[:, None] * inv_prev[:, :D]
                Rk = Rk + W[:, None] * inv_prev[:, D:]
            Dp.append(Dk)
            Rp.append(Rk)
        x = [None] * n
        x[-1] = torch.linalg.solve(Dp[-1], Rp[-1])
        for k in range(n - 2, -1, -1):
            x[k] = torch.linalg.solve(Dp[k], Rp[k] + W[:, None] * x[k + 1])
        return torch.stack(x)

    mu = 1e-3
    iterations = max(3, settings.iterations)
    eye_D = torch.eye(D, device=dev, dtype=dt)
    with torch.no_grad():
        for it in range(iterations):
            rigid_only = it == 0
            r, cam, R, Rn, Rnj = forward(beta, per, parts=True)
            cost = total_cost(r, per, beta)
            # d proj / d cam, weighted: (n, L, 2, 3)
            z = cam[..., 2].clamp_min(1e-3)
            Pu = torch.zeros(n, L, 2, 3, device=dev, dtype=dt)
            Pu[..., 0, 0], Pu[..., 0, 2] = fx / z, -fx * cam[..., 0] / z ** 2
            Pu[..., 1, 1], Pu[..., 1, 2] = fy / z, -fy * cam[..., 1] / z ** 2
            Pu = Pu * sw[..., None]
            PR = Pu @ R[:, None]                              # d proj / d q_head
            PRh = PR * head                                   # d proj / d q_flame
            Jc = model.projected_jacobian(PRh, Rn, Rnj, slice(0, S + E))
            J_psi, J_beta = Jc[..., S:].reshape(n, 2 * L, E), Jc[..., :S].reshape(n, 2 * L, S)
            J_tau = Pu.reshape(n, 2 * L, 3)
            cols = []
            h = 1e-3
            for k in range(9):
                d = torch.zeros(D, device=dev, dtype=dt)
                d[E + k] = h
                cols.append((forward(beta, per + d) - forward(beta, per - d)) / (2 * h))
            J_rot = torch.stack(cols, -1)                     # (n, 2L, 9)
            Jn = torch.cat([J_psi, J_rot, J_tau], -1)         # (n, 2L, D)
            A = Jn.transpose(1, 2) @ Jn + torch.diag_embed(prior.expand(n, D))
            g = (Jn.transpose(1, 2) @ r[..., None])[..., 0] + prior * per
            if use_smooth:
                degree = torch.full((n, 1), 2.0, device=dev, dtype=dt)
                degree[0] = degree[-1] = 1.0
                A = A + torch.diag_embed(degree * smooth_w)
                diff = per[1:] - per[:-1]
                g = g + smooth_w * (torch.cat([torch.zeros_like(per[:1]), diff]) - torch.cat([diff, torch.zeros_like(per[:1])]))
            if rigid_only:
                mask = torch.zeros(D, device=dev, dtype=dt)
                mask[E + 6:] = 1
                A = A * mask[:, None] * mask[None, :] + torch.diag_embed((1 - mask).expand(n, D))
                g = g * mask
            shape_step = fit_shape and not rigid_only
            if shape_step:
                Bm = torch.einsum("nms,nmt->st", J_beta, J_beta) + settings.shape_prior * torch.eye(S, device=dev, dtype=dt)
                gb = torch.einsum("nms,nm->s", J_beta, r) + settings.shape_prior * beta
                C = Jn.transpose(1, 2) @ J_beta               # (n, D, S)
                if rigid_only:
                    C = C * mask[:, None]
            for _ in range(6):
                Ad = A + mu * torch.diag_embed(torch.diagonal(A, dim1=1, dim2=2)) + 1e-9 * eye_D
                if shape_step:
                    Bd = Bm + mu * torch.diag(torch.diagonal(Bm))
                    Y = solve_frames(Ad, torch.cat([C, g[..., None]], -1))  # (n, D, S+1)
                    schur = Bd - torch.einsum("nds,ndt->st", C, Y[..., :S])
                    rhs = gb - torch.einsum("nds,nd->s", C, Y[..., S])
                    d_beta = -torch.linalg.solve(schur, rhs)
                    d_per = -(Y[..., S] + (Y[..., :S] @ d_beta[:, None])[..., 0])
                else:
                    d_beta = torch.zeros_like(beta)
                    d_per = -solve_frames(Ad, g[..., None])[..., 0]
                trial_beta, trial_per = beta + d_beta, per + d_per
                new_cost = total_cost(forward(trial_beta, trial_per), trial_per, trial_beta)
                if bool(torch.isfinite(new_cost)) and new_cost < cost:
                    beta, per, mu = trial_beta, trial_per, max(mu / 3, 1e-7)
                    break
                mu *= 8
            if trace is not None:
                trace.append((it, float(cost), float(new_cost), mu, time.perf_counter() - start))
        psi, jaw, neck, rot, tau = per[:, :E], per[:, E:E + 3], per[:, E + 3:E + 6], per[:, E + 6:E + 9], per[:, E + 9:]
        r = forward(beta, per).reshape(n, L, 2) / sw.clamp_min(1e-12)
        err = r.norm(dim=-1).mean(1).cpu().numpy() / width
        R = (R0t @ rodrigues(rot)).cpu().numpy().astype(np.float64)
        t = (t0t + tau).cpu().numpy().astype(np.float64)
        f64 = lambda a: a.detach().cpu().numpy().astype(np.float64)  # noqa: E731
        return FitResult(f64(beta), f64(psi), f64(jaw), f64(neck), R, t, np.where(valid, err, np.nan),
                         time.perf_counter() - start, iterations)


def full_mesh(layer: FlameLayer, shape: np.ndarray, expression: np.ndarray, jaw: np.ndarray, neck: np.ndarray,
              chunk: int = 64, device: str = "cpu") -> np.ndarray:
    """(N, 5023, 3) float64 head-space (cm) FLAME meshes."""
    dev = torch.device(device)
    layer = layer.to(dev)
    out = []
    T = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=dev)  # noqa: E731
    with torch.no_grad():
        b = T(shape)[None]
        for i in range(0, len(expression), chunk):
            e, j, nk = T(expression[i:i + chunk]), T(jaw[i:i + chunk]), T(neck[i:i + chunk])
            v = layer(shape=b, expression=e, pose=pose_vector(nk, j)) * T(HEAD)
            out.append(v.cpu().numpy().astype(np.float64))
    return np.concatenate(out) if out else np.zeros((0, layer.v_template.shape[0], 3))
