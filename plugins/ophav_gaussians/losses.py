"""The Gaussian field's loss terms, shared by the step through ``render_views`` and the graphed halves
(:mod:`ophav_gaussians.step`), so both compute the same arithmetic in the same order."""
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


def composited_target(image_u8: torch.Tensor, mask_u8: torch.Tensor, background: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W, 3) frame (uint8) composited over ``background`` with its (H, W) uint8 mask, in [0, 1], and the
    mask in [0, 1]."""
    alpha = mask_u8.float() / 255.0
    return torch.lerp(background, image_u8.float() / 255.0, alpha[..., None]), alpha


def photometric_loss(image: torch.Tensor, alpha: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     options) -> torch.Tensor:
    """(1 - lambda_dssim) L1 + lambda_dssim (1 - SSIM) of the render against the target, plus lambda_alpha L1 of
    the rendered alpha against the mask."""
    loss = (1 - options.lambda_dssim) * (image - target).abs().mean()
    if options.lambda_dssim > 0:
        loss = loss + options.lambda_dssim * (1 - ssim(image, target))
    return loss + options.lambda_alpha * (alpha - mask).abs().mean()


def add_regularisers(loss: torch.Tensor, log_scale: torch.Tensor, offset: torch.Tensor, opacities: torch.Tensor,
                     on_mesh: torch.Tensor, options) -> torch.Tensor:
    """``loss`` plus the penalties on the parameters: scales above their threshold (triangle or shell), offsets
    farther than position_threshold from the parent triangle, and the mean opacity."""
    if options.lambda_scale > 0:
        threshold = torch.where(on_mesh, options.scale_threshold, options.shell_scale_threshold)
        loss = loss + options.lambda_scale * F.relu(torch.exp(log_scale) - threshold[:, None]).mean()
    if options.lambda_position > 0:
        far = F.relu(offset.norm(dim=-1) - options.position_threshold) * on_mesh
        loss = loss + options.lambda_position * far.mean()
    if options.lambda_opacity > 0:
        loss = loss + options.lambda_opacity * opacities.mean()
    return loss
