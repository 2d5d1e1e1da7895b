"""The photometric structure term of the Gaussian field's loss (used by the op-by-op step and the graphed one)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _gaussian_window(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - size // 2
    w = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return w / w.sum()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of two (H, W, 3) images in [0, 1] (11x11 Gaussian window, sigma 1.5)."""
    x, y = a.permute(2, 0, 1)[None], b.permute(2, 0, 1)[None]
    w = _gaussian_window(device=a.device)
    kx, ky = w.view(1, 1, 1, -1).repeat(15, 1, 1, 1), w.view(1, 1, -1, 1).repeat(15, 1, 1, 1)
    # The five blurred maps in one pair of separable convolutions (a training step is launch-bound).
    stack = F.pad(torch.cat([x, y, x * x, y * y, x * y], 1), (5, 5, 5, 5), mode="replicate")
    mx, my, exx, eyy, exy = F.conv2d(F.conv2d(stack, kx, groups=15), ky, groups=15).split(3, 1)
    sxx, syy, sxy = exx - mx * mx, eyy - my * my, exy - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    value = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return value.mean()
