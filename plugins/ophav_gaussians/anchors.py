"""Binding Gaussians to a mesh: triangle frames, quaternions, and a Gaussian's place in a frame's head space.

Every Gaussian has a parent: a triangle of the tracked mesh (``parent >= 0``) or the head itself
(``parent == -1``, the shell that covers hair, ears, scalp and neck, which a face-only mesh lacks).

* A triangle ``(v0, v1, v2)`` has the orthonormal frame (columns) ``a0 = (v1 - v0)/|v1 - v0|``, the normal
  ``a1 = a0 x (v2 - v0)`` normalised, and ``a2 = a0 x a1`` (in the triangle's plane; a right-handed frame), and
  the size ``s = (|v1 - v0| + |a2 . (v2 - v0)|) / 2`` (base and height averaged, as in GaussianAvatars).
* A triangle's Gaussian sits at its barycentric point plus an offset in that frame, in units of the triangle's
  size: ``mu = b . (v0, v1, v2) + s * F @ offset``; its rotation is ``F @ R_local``; its scales are
  ``s * exp(log_scale)``. So pose and expression move, turn and stretch it with its triangle, exactly.
* A shell Gaussian sits at a fixed head-space anchor plus its offset in units of the canonical mesh's mean
  triangle size, with the head's axes: rigid with the head pose. The rasteriser's world is the frame's head space
  (the tracked mesh with the pose removed); the pose is the camera's view matrix.
"""
from __future__ import annotations

import torch

EPS = 1e-12


def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(EPS)


def triangle_frames(vertices: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (..., F, 3, 3) (columns a0, normal, a2) and sizes (..., F) of the triangles of ``vertices``
    (..., V, 3)."""
    v0, v1, v2 = (vertices[..., faces[:, k], :] for k in range(3))
    a0 = _normalize(v1 - v0)
    a1 = _normalize(torch.linalg.cross(a0, v2 - v0, dim=-1))
    a2 = torch.linalg.cross(a0, a1, dim=-1)  # in the plane; (a0, a1, a2) right-handed
    frame = torch.stack([a0, a1, a2], dim=-1)
    size = 0.5 * ((v1 - v0).norm(dim=-1) + (a2 * (v2 - v0)).sum(-1).abs())
    return frame, size


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """(..., 4) quaternions wxyz (any norm) -> (..., 3, 3) rotation matrices."""
    q = _normalize(q)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(q.shape[:-1] + (3, 3))


def matrix_to_quat(m: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotation matrices -> (..., 4) unit quaternions wxyz (w >= 0). Branch-free: the largest of the
    four candidate denominators is used per matrix."""
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    cands = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    r = torch.sqrt(cands.clamp_min(1e-12))
    qw = torch.stack([r[..., 0] ** 2, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0],
                      m[..., 1, 0] - m[..., 0, 1]], -1)
    qx = torch.stack([m[..., 2, 1] - m[..., 1, 2], r[..., 1] ** 2, m[..., 1, 0] + m[..., 0, 1],
                      m[..., 0, 2] + m[..., 2, 0]], -1)
    qy = torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] + m[..., 0, 1], r[..., 2] ** 2,
                      m[..., 2, 1] + m[..., 1, 2]], -1)
    qz = torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 2, 1] + m[..., 1, 2],
                      r[..., 3] ** 2], -1)
    all_q = torch.stack([qw, qx, qy, qz], -2) / (2 * r[..., None])
    best = cands.argmax(-1)
    q = torch.gather(all_q, -2, best[..., None, None].expand(best.shape + (1, 4))).squeeze(-2)
    q = _normalize(q)
    return torch.where(q[..., :1] < 0, -q, q)


def quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product a * b of (..., 4) wxyz quaternions (the rotation b, then a)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], -1)


def place(vertices: torch.Tensor, faces: torch.Tensor, parent: torch.Tensor, bary: torch.Tensor,
          anchor: torch.Tensor, offset: torch.Tensor, rotation: torch.Tensor, log_scale: torch.Tensor,
          shell_unit: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """World (head-space) means (N, 3), quaternions wxyz (N, 4) and linear scales (N, 3) of the Gaussians for one
    frame's head-space mesh ``vertices`` (V, 3). ``parent`` (N,) triangle or -1; ``bary`` (N, 3); ``anchor``
    (N, 3) the shell's fixed points; ``offset`` (N, 3), ``rotation`` (N, 4), ``log_scale`` (N, 3) the learnt local
    values; ``shell_unit`` the shell's length unit."""
    on_mesh = parent >= 0
    tri = parent.clamp_min(0)
    frame_all, size_all = triangle_frames(vertices, faces)
    with torch.no_grad():
        quat_all = matrix_to_quat(frame_all)
    frame, size, qf = frame_all[tri], size_all[tri], quat_all[tri]
    corners = vertices[faces[tri].long()]  # (N, 3, 3)
    origin = (bary[:, :, None] * corners).sum(1)
    eye = torch.eye(3, dtype=vertices.dtype, device=vertices.device).expand_as(frame)
    identity = torch.tensor([1.0, 0, 0, 0], dtype=vertices.dtype, device=vertices.device).expand_as(qf)
    mask = on_mesh[:, None]
    frame = torch.where(mask[..., None], frame, eye)
    size = torch.where(on_mesh, size, torch.full_like(size, float(shell_unit)))
    origin = torch.where(mask, origin, anchor)
    qf = torch.where(mask, qf, identity)
    means = origin + size[:, None] * (frame @ offset[:, :, None])[..., 0]
    quats = quat_multiply(qf, rotation)
    scales = size[:, None] * torch.exp(log_scale)
    return means, quats, scales


PACK = 35  # per triangle: frame (9, row-major), size (1), quaternion product matrix (16), corners (9)


def quat_product_matrix(q: torch.Tensor) -> torch.Tensor:
    """(..., 4, 4) ``L(q)`` with ``L(q) @ r == quat_multiply(q, r)``: the left product as a matrix."""
    w, x, y, z = q.unbind(-1)
    return torch.stack([w, -x, -y, -z, x, w, -z, y, y, z, w, -x, z, -y, x, w], -1).reshape(q.shape[:-1] + (4, 4))


@torch.no_grad()
def triangle_pack(vertices: torch.Tensor, faces: torch.Tensor, shell_unit: float) -> torch.Tensor:
    """(..., F + 1, PACK) what :func:`place` needs of each triangle of the meshes ``vertices`` (..., V, 3), the
    last row the shell's (the head's axes, ``shell_unit``, no corners). Training renders the same frames' meshes
    over and over: packed once, placing the Gaussians is a gather and three small products per step
    (:func:`place_packed`) instead of ~100 ops on every triangle."""
    frame, size = triangle_frames(vertices, faces)
    product = quat_product_matrix(matrix_to_quat(frame))
    corners = vertices[..., faces, :]  # (..., F, 3, 3) rows v0, v1, v2
    lead = frame.shape[:-2]
    rows = torch.cat([frame.reshape(lead + (9,)), size[..., None], product.reshape(lead + (16,)),
                      corners.reshape(lead + (9,))], -1)
    shell = torch.cat([torch.eye(3).reshape(9), torch.tensor([float(shell_unit)]), torch.eye(4).reshape(16),
                       torch.zeros(9)]).to(rows)
    return torch.cat([rows, shell.expand(lead[:-1] + (1, PACK))], -2)


def place_packed(pack: torch.Tensor, parent: torch.Tensor, bary: torch.Tensor, anchor: torch.Tensor,
                 offset: torch.Tensor, rotation: torch.Tensor, log_scale: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`place` from one mesh's :func:`triangle_pack` (F + 1, PACK): the same means, quaternions and scales,
    differentiable in ``offset``, ``rotation`` and ``log_scale``."""
    on_mesh = parent >= 0
    rows = pack[torch.where(on_mesh, parent, pack.shape[0] - 1)]
    n = rows.shape[0]
    frame, size = rows[:, :9].reshape(n, 3, 3), rows[:, 9:10]
    product, corners = rows[:, 10:26].reshape(n, 4, 4), rows[:, 26:].reshape(n, 3, 3)
    origin = torch.where(on_mesh[:, None], (bary[:, None, :] @ corners)[:, 0], anchor)
    means = origin + size * (frame @ offset[:, :, None])[..., 0]
    quats = (product @ rotation[:, :, None])[..., 0]
    return means, quats, size * torch.exp(log_scale)


def view_matrices(rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """(B, 4, 4) world (head space) -> camera: the head pose."""
    out = torch.zeros(rotation.shape[0], 4, 4, dtype=torch.float32, device=rotation.device)
    out[:, :3, :3], out[:, :3, 3], out[:, 3, 3] = rotation, translation, 1.0
    return out


def camera_centres(rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """(B, 3) the cameras' centres in head space, ``-R^T t``."""
    return -torch.einsum("bji,bj->bi", rotation, translation)


def rasteriser_intrinsics(Ks: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) ``Ks`` for the rasteriser: ophav's pixel centres are at integer coordinates, the rasteriser's at
    +0.5, so the principal point moves by half a pixel."""
    Ks = Ks.clone()
    Ks[:, 0, 2] += 0.5
    Ks[:, 1, 2] += 0.5
    return Ks


def mean_triangle_size(vertices: torch.Tensor, faces: torch.Tensor) -> float:
    return float(triangle_frames(vertices, faces)[1].mean())


# ---------------------------------------------------------------------------------------------- colour

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658,
         1.445305721320277, -0.5900435899266435)


def sh_basis(d: torch.Tensor, degree: int) -> torch.Tensor:
    """Real SH basis (..., (degree+1)^2) of unit directions (..., 3), the 3DGS ordering and signs."""
    x, y, z = d.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        out += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [SH_C2[0] * x * y, SH_C2[1] * y * z, SH_C2[2] * (2 * zz - xx - yy), SH_C2[3] * x * z,
                SH_C2[4] * (xx - yy)]
    if degree >= 3:
        out += [SH_C3[0] * y * (3 * xx - yy), SH_C3[1] * x * y * z, SH_C3[2] * y * (4 * zz - xx - yy),
                SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy), SH_C3[4] * x * (4 * zz - xx - yy),
                SH_C3[5] * z * (xx - yy), SH_C3[6] * x * (xx - 3 * yy)]
    return torch.stack(out, -1)


def sh_colours(sh: torch.Tensor, means: torch.Tensor, camera_centres: torch.Tensor, degree: int) -> torch.Tensor:
    """(B, N, 3) linear RGB (>= 0) of SH coefficients (N, K, 3) seen from camera centres (B, 3) (head space),
    up to ``degree`` (coefficients beyond it are ignored). ``means`` (N, 3) or (B, N, 3)."""
    k = (degree + 1) ** 2
    if degree == 0:
        rgb = SH_C0 * sh[:, 0][None].expand(camera_centres.shape[0], -1, -1)
    else:
        d = _normalize(means - camera_centres[:, None, :])
        basis = sh_basis(d, degree)  # (B, N, k)
        rgb = torch.einsum("bnk,nkc->bnc", basis, sh[:, :k])
    return (rgb + 0.5).clamp_min(0.0)


def rgb_to_sh_dc(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb - 0.5) / SH_C0
