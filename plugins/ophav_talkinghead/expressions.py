"""Named expressions -> small 3D keypoint displacements for face-vid2vid.

The public face-vid2vid model's 15 keypoints are unsupervised: no keypoint is "the mouth corner", and which
index lands where differs between checkpoints. So the mapping does not use indices. It places every canonical
keypoint in a face-normalised frame (centre = keypoint mean, unit = keypoint spread, x right, y down) and moves
it by where it sits. The result is approximate: how faithfully a named expression appears depends on what the
network learned near those keypoints.

Fixed mapping (intensity 1, units of the keypoint spread s; soft regions from the normalised height ny):

===========  =====================================  ===========================================
name         region                                 displacement
===========  =====================================  ===========================================
mouth_open   lower face: sigmoid((ny - 0.3)/0.15)   dy = +0.30  (jaw and lower lip drop)
smile        lower face, signed side tanh(nx/0.5)   dx = +0.12 * side, dy = -0.08 * abs(side)
blink        eye band: gauss(ny + 0.35, 0.2)        dy = +0.10  (upper lids close)
brows_up     upper face: sigmoid((-ny - 0.6)/0.15)  dy = -0.15  (brows and forehead rise)
===========  =====================================  ===========================================

Displacements are in the head's own frame and rotate with the head.
"""
from __future__ import annotations

import torch

EXPRESSION_NAMES = ("smile", "mouth_open", "blink", "brows_up")


def _regions(canonical: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft region weights (B, K) and the spread (B, 1) of canonical keypoints (B, K, 3)."""
    xy = canonical[..., :2]
    centre = xy.mean(dim=1, keepdim=True)
    spread = xy.std(dim=1, unbiased=False).mean(dim=-1, keepdim=True).clamp_min(1e-4)  # (B, 1)
    normalised = (xy - centre) / spread[:, :, None]
    nx, ny = normalised[..., 0], normalised[..., 1]
    lower = torch.sigmoid((ny - 0.3) / 0.15)
    upper = torch.sigmoid((-ny - 0.6) / 0.15)
    eyes = torch.exp(-0.5 * ((ny + 0.35) / 0.2) ** 2) * (1.0 - lower)
    side = torch.tanh(nx / 0.5)
    return lower, upper, eyes, side, spread


def expression_offsets(canonical: torch.Tensor, intensities: dict[str, torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """Keypoint displacements (B, K, 3) for per-frame ``intensities`` (name -> (B,) in [0, 1]).

    canonical: (B, K, 3) or (1, K, 3) canonical keypoints of the source identity."""
    b = max([len(v) for v in intensities.values()] + [canonical.shape[0]])
    canonical = canonical.expand(b, *canonical.shape[1:])
    lower, upper, eyes, side, spread = _regions(canonical)
    zero = torch.zeros(b, device=canonical.device, dtype=canonical.dtype)
    level = {name: intensities.get(name, zero).to(canonical)[:, None] for name in EXPRESSION_NAMES}
    dx = 0.12 * side * lower * level["smile"]
    dy = (0.30 * lower * level["mouth_open"]
          - 0.08 * side.abs() * lower * level["smile"]
          + 0.10 * eyes * level["blink"]
          - 0.15 * upper * level["brows_up"])
    offsets = torch.stack([dx, dy, torch.zeros_like(dx)], dim=-1)
    return offsets * spread[:, :, None] * scale
