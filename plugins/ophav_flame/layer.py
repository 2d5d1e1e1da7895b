"""FLAME in PyTorch, batched: identity and expression blendshapes, pose correctives over Rodrigues rotations,
linear blend skinning over FLAME's 5 joints (global, neck, jaw, left eye, right eye).

``pose`` is (B, 15): axis-angle of the 5 joints in that order (FLAME's own layout). Output in FLAME coordinates
(metres). :meth:`FlameLayer.forward` can evaluate only a subset of vertices, or barycentric points on triangles
(the landmark embedding), which is what the fit needs per step; joints always come from the full shaped mesh
(through the precomputed ``J_regressor`` products, so this costs 5 x (S + E) numbers, not 5023 vertices).
"""
from __future__ import annotations

import numpy as np
import torch

from ophav_flame.model import FlameModel


def rodrigues(rotvec: torch.Tensor) -> torch.Tensor:
    """(..., 3) axis-angle -> (..., 3, 3) rotation matrices; exact at zero (Taylor terms below 1e-4 rad)."""
    theta2 = (rotvec * rotvec).sum(-1, keepdim=True)
    theta = torch.sqrt(theta2.clamp_min(1e-12))
    small = theta2 < 1e-8
    sin_t = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    cos_t = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / theta2.clamp_min(1e-12))
    x, y, z = rotvec.unbind(-1)
    zero = torch.zeros_like(x)
    K = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(rotvec.shape[:-1] + (3, 3))
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device).expand(K.shape)
    return eye + sin_t[..., None] * K + cos_t[..., None] * (K @ K)


class FlameLayer(torch.nn.Module):
    def __init__(self, model: FlameModel, num_shape: int | None = None, num_expressions: int | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        S = model.num_shape if num_shape is None else min(num_shape, model.num_shape)
        E = model.num_expression if num_expressions is None else min(num_expressions, model.num_expression)
        self.num_shape, self.num_expressions = S, E
        self.parents = list(model.parents)
        t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)  # noqa: E731
        self.register_buffer("v_template", t(model.v_template))
        dirs = np.concatenate([model.shapedirs[:, :, :S], model.exprdirs[:, :, :E]], axis=2)
        self.register_buffer("dirs", t(dirs))                                    # (V, 3, S+E)
        self.register_buffer("posedirs", t(model.posedirs))                      # (V, 3, 36)
        self.register_buffer("weights", t(model.weights))                        # (V, 5)
        self.register_buffer("J_template", t(model.J_regressor @ model.v_template))            # (5, 3)
        self.register_buffer("J_dirs", t(np.einsum("jv,vck->jck", model.J_regressor, dirs)))   # (5, 3, S+E)
        self.register_buffer("faces", torch.as_tensor(model.faces, dtype=torch.int64))

    def coefficients(self, shape: torch.Tensor | None, expression: torch.Tensor | None, batch: int) -> torch.Tensor:
        dev, dt = self.v_template.device, self.v_template.dtype
        parts = []
        for value, count in ((shape, self.num_shape), (expression, self.num_expressions)):
            if value is None:
                value = torch.zeros(batch, count, device=dev, dtype=dt)
            value = value.expand(batch, -1) if value.shape[0] == 1 else value
            parts.append(value[:, :count])
        return torch.cat(parts, dim=1)

    def joints(self, beta: torch.Tensor) -> torch.Tensor:
        """(B, 5, 3) rest joints of the shaped (and expressed) mesh."""
        return self.J_template + torch.einsum("jck,bk->bjc", self.J_dirs, beta)

    def transforms(self, pose: torch.Tensor, joints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-joint rotations (B, 5, 3, 3) and skinning transforms (B, 5, 3, 4) from the rest pose."""
        rot = rodrigues(pose.reshape(pose.shape[0], -1, 3))
        world_R, world_t = [], []
        for k, parent in enumerate(self.parents):
            if parent < 0:
                world_R.append(rot[:, k])
                world_t.append(joints[:, k])
            else:
                world_R.append(world_R[parent] @ rot[:, k])
                world_t.append(world_R[parent] @ (joints[:, k] - joints[:, parent])[..., None]
                               + world_t[parent][..., None])
                world_t[-1] = world_t[-1][..., 0]
        R = torch.stack(world_R, dim=1)
        G_t = torch.stack(world_t, dim=1)
        # Remove the rest position: A_k x = R_k (x - J_k) + G_k
        A_t = G_t - (R @ joints[..., None])[..., 0]
        return rot, torch.cat([R, A_t[..., None]], dim=-1)

    def forward(self, shape: torch.Tensor | None = None, expression: torch.Tensor | None = None,
                pose: torch.Tensor | None = None, vertices: torch.Tensor | None = None,
                bary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Posed points (B, P, 3), FLAME coordinates. ``vertices``: evaluate only these vertex indices;
        ``bary = (triangles (L,) long, weights (L, 3))``: points on the surface (exact: the triangle's three
        vertices are skinned, then interpolated)."""
        batch = max(x.shape[0] for x in (shape, expression, pose) if x is not None) if any(
            x is not None for x in (shape, expression, pose)) else 1
        beta = self.coefficients(shape, expression, batch)
        if pose is None:
            pose = torch.zeros(batch, 15, device=beta.device, dtype=beta.dtype)
        pose = pose.expand(batch, -1) if pose.shape[0] == 1 else pose
        if bary is not None:
            tri, bw = bary
            index = self.faces[tri].reshape(-1)
        elif vertices is not None:
            index = vertices
        else:
            index = None
        take = (lambda a: a) if index is None else (lambda a: a[index])  # noqa: E731
        v = take(self.v_template) + torch.einsum("vck,bk->bvc", take(self.dirs), beta)
        rot, A = self.transforms(pose, self.joints(beta))
        eye = torch.eye(3, dtype=beta.dtype, device=beta.device)
        feature = (rot[:, 1:] - eye).reshape(batch, 36)
        v = v + torch.einsum("vck,bk->bvc", take(self.posedirs), feature)
        T = torch.einsum("vj,bjrc->bvrc", take(self.weights), A)                  # (B, P, 3, 4)
        out = (T[..., :3] @ v[..., None])[..., 0] + T[..., 3]
        if bary is not None:
            out = (out.reshape(batch, -1, 3, 3) * bary[1][None, :, :, None]).sum(2)
        return out
