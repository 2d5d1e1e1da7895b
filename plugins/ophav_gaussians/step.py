"""The triton training step as two dense halves around the rasteriser, each of which can be one CUDA graph.

A training step at the standard profile launched ~375 kernels for ~3 ms of GPU work (H200, 30k Gaussians, 512x512):
it was bound by the host issuing them, the GPU busy about a third of the time (``benchmarks/profile_gaussians_step.py``,
benchmarks/RESULTS.md). Between two densifications everything but the tile binning has fixed shapes:

* the *front* (placing the Gaussians on the frame's triangles, their SH colours, the fused projection, the
  regularisers on the parameters) is a function of the parameters and the frame's pack, pose and intrinsics;
* the *photometric* half (compositing over the background, L1, SSIM, the alpha loss) is a function of the
  rasteriser's output and the frame's image and mask.

Only the binning between them has a data-dependent size (it syncs once with the host), so it and the compositing
kernels stay eager, and each half is captured with ``torch.cuda.make_graphed_callables``: one replay for its
forward and one for its backward. The arithmetic is the same as the eager path's (``Trainer`` checks it in the
tests); the graphs are recaptured whenever the Gaussians change (densification, pruning, the SH degree).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ophav_gaussians.anchors import camera_centres, place_packed, rasteriser_intrinsics, sh_colours, view_matrices
from ophav_gaussians.losses import add_regularisers, composited_target, photometric_loss


def make_front(parent: torch.Tensor, bary: torch.Tensor, anchor: torch.Tensor, degree: int, width: int,
               height: int, near: float, far: float, options) -> Callable:
    """``front(offset, rotation, log_scale, opacity_logit, sh, pack, rotation_pose, translation, K)`` (the
    parameters in :data:`~ophav_gaussians.model.LEARNT` order) ->
    ``(means2d, conics, opacities, features, regularisers, depths, radii, tile_box, visible)`` for one view
    (``pack`` the frame's :func:`~ophav_gaussians.anchors.triangle_pack`, the pose (1, 3, 3) and (1, 3), K (1, 3, 3)
    in ophav's pixel convention). ``features`` are RGB and camera depth (the compositing kernels' four channels);
    the returned ``depths`` carry no gradient (they only order the binning). The function holds ``parent``,
    ``bary`` and ``anchor``, which the graphs read by address."""
    from ophav_gaussians.raster.triton_kernels import project_gaussians_triton_autograd

    def front(offset, rotation, log_scale, opacity_logit, sh, pack, rotation_pose, translation, K):
        means, quats, scales = place_packed(pack, parent, bary, anchor, offset, rotation, log_scale)
        colours = sh_colours(sh, means, camera_centres(rotation_pose, translation), degree)
        opacities = torch.sigmoid(opacity_logit)
        proj = project_gaussians_triton_autograd(means, quats, scales, opacities,
                                                 view_matrices(rotation_pose, translation),
                                                 rasteriser_intrinsics(K), width, height, near, far)
        features = torch.cat([colours, proj.depths[..., None]], dim=-1)
        regularisers = add_regularisers(torch.zeros((), device=means.device), log_scale, offset, opacities,
                                        parent >= 0, options)
        return (proj.means2d, proj.conics, opacities, features, regularisers, proj.depths.detach(), proj.radii,
                proj.tile_box, proj.visible)

    return front


def make_photometric(background: torch.Tensor, options) -> Callable:
    """``photometric(composited, transmittance, image_u8, mask_u8)`` -> ``(loss, mse)``: the rasteriser's (1, H, W,
    4) output and (1, H, W) transmittance against the frame (H, W, 3) uint8 and its mask (H, W) uint8, composited
    over ``background``. ``mse`` (of the image, no gradient) is what the progress reports as PSNR."""

    def photometric(composited, transmittance, image_u8, mask_u8):
        image = composited[0, ..., :3] + transmittance[0, ..., None] * background
        target, mask = composited_target(image_u8, mask_u8, background)
        loss = photometric_loss(image, 1.0 - transmittance[0], target, mask, options)
        return loss, F.mse_loss(image.detach(), target)

    return photometric


def graphed(function: Callable, live: tuple[torch.Tensor, ...], staged: tuple[torch.Tensor, ...]) -> Callable:
    """``function(*live, *staged)`` captured as CUDA graphs (forward and backward).

    ``live`` are the parameters: the graphs read their storage in place (Adam updates it in place), through
    leaves of their own that share it (``detach``), so the capture, which runs autograd on a side stream, never
    touches the parameters' own gradient accumulators: those stay on the stream the training runs on, where
    autograd would otherwise have to synchronise with the capture stream (and break a later capture). A call
    passes the parameters themselves (same storage: nothing is copied) and their gradients arrive as usual.
    ``staged`` are examples of the per-call inputs: the graphs get their own leaf copies (with the same
    ``requires_grad``), into which each call copies its inputs, so nothing of the caller's autograd graph or
    storage is held."""
    def leaves() -> tuple[torch.Tensor, ...]:
        return tuple(t.detach().requires_grad_(t.requires_grad) for t in live) + \
            tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in staged)

    # Warm up (Triton's compilation, cuBLAS's lazy set-up) on leaves of its own, then capture without
    # make_graphed_callables' warm-up: some torch versions (2.11) keep its warm-up graph alive into the capture on
    # another stream, and autograd's sync with that stale stream invalidates the capture.
    warm = leaves()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            outputs = [o for o in function(*warm) if o.requires_grad]
            torch.autograd.grad(outputs, [t for t in warm if t.requires_grad],
                                [torch.ones_like(o) for o in outputs], allow_unused=True)
    torch.cuda.current_stream().wait_stream(side)
    del warm, outputs
    torch.cuda.synchronize()
    replay = torch.cuda.make_graphed_callables(function, leaves(), num_warmup_iters=0, allow_unused_input=True)
    # The graphs read, by address, tensors that ``function``'s closure holds: the graphed callable does not hold
    # ``function``, so it must, or memory only the closure owns goes back to the allocator and the replays read
    # whatever is put there next.
    replay.function = function
    return replay
