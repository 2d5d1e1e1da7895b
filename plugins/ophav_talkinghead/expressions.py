"""Named expressions -> small 3D keypoint displacements for face-vid2vid.

The public face-vid2vid model's 15 keypoints are unsupervised: no keypoint is "the mouth corner", and which
index lands where differs between checkpoints. So the mapping does not use indices. It places every canonical
keypoint in a face-normalised frame (centre = keypoint mean; nx, ny = offsets from it divided by the keypoints'
standard deviation along x and y; x right, y down) and moves it by where it sits. The result is approximate: how
faithfully a named expression appears depends on what the network learned near those keypoints.

Fixed mapping at intensity 1 (displacements in units of the keypoints' vertical standard deviation):

===========  ==============================================  ==========================================
name         region weight                                   displacement
===========  ==============================================  ==========================================
mouth_open   lower face L = sigmoid((ny - 0.4) / 0.2)        dy = +0.30 L  (jaw and lower lip drop)
smile        L, side S = tanh(nx / 0.6)                      dx = +0.12 S L, dy = -0.08 abs(S) L
blink        eye band E = exp(-((ny + 0.8) / 0.25)^2 / 2)    dy = +0.10 E (1 - U) (1 - L)  (lids close)
brows_up     upper face U = sigmoid((-ny - 1.1) / 0.15)      dy = -0.15 U  (brows and forehead rise)
===========  ==============================================  ==========================================

Displacements are in the head's own frame and rotate with the head.
"""
from __future__ import annotations

import torch

EXPRESSION_NAMES = ("smile", "mouth_open", "blink", "brows_up")


def _regions(canonical: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft region weights (B, K) and the vertical spread (B, 1) of canonical keypoints (B, K, 3)."""
    xy = canonical[..., :2]
    centre = xy.mean(dim=1, keepdim=True)
    spread = xy.std(dim=1, unbiased=False).clamp_min(1e-4)  # (B, 2)
    normalised = (xy - centre) / spread[:, None, :]
    nx, ny = normalised[..., 0], normalised[..., 1]
    lower = torch.sigmoid((ny - 0.4) / 0.2)
    upper = torch.sigmoid((-ny - 1.1) / 0.15)
    eyes = torch.exp(-0.5 * ((ny + 0.8) / 0.25) ** 2) * (1.0 - upper) * (1.0 - lower)
    side = torch.tanh(nx / 0.6)
    return lower, upper, eyes, side, spread[:, 1:]


def expression_offsets(canonical: torch.Tensor, intensities: dict[str, torch.Tensor],
                       scale: float = 1.0) -> torch.Tensor:
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
