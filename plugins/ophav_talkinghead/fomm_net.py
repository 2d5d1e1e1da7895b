"""First Order Motion Model (Siarohin et al., NeurIPS 2019), the networks of ``vox-cpk.pth.tar``.

Written against AliaksandrSiarohin/first-order-model (modules/keypoint_detector.py, dense_motion.py,
generator.py, config/vox-256.yaml); names match its state dicts. The public checkpoints were trained with
PyTorch 1.0, whose ``grid_sample`` behaved as ``align_corners=True`` (its README warns that later versions warp
differently), so warping here uses ``align_corners=True``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


from ophav_talkinghead.layers import (AntiAliasDownsample, DownBlock2d, Hourglass, ResBlock2d, SameBlock2d,
                                      UpBlock2d, coordinate_grid_2d, heatmap_expectation, keypoint_gaussians,
                                      spatial_softmax)

# model_params of config/vox-256.yaml (the public vox-cpk.pth.tar).
VOX_256: dict[str, Any] = {
    "common_params": {"num_kp": 10, "num_channels": 3, "estimate_jacobian": True},
    "kp_detector_params": {"temperature": 0.1, "block_expansion": 32, "max_features": 1024, "scale_factor": 0.25,
                           "num_blocks": 5},
    "generator_params": {"block_expansion": 64, "max_features": 512, "num_down_blocks": 2,
                         "num_bottleneck_blocks": 6, "estimate_occlusion_map": True,
                         "dense_motion_params": {"block_expansion": 64, "max_features": 1024, "num_blocks": 5,
                                                 "scale_factor": 0.25}},
}

Keypoints = dict[str, torch.Tensor]  # {"value": (B, K, 2), "jacobian": (B, K, 2, 2)}

def _inverse(matrices: torch.Tensor) -> torch.Tensor:
    """Inverse of 2x2 Jacobians in float32 (linalg.inv has no bfloat16/float16 kernels; under autocast the
    Jacobians come out in low precision)."""
    return torch.inverse(matrices.float()).to(matrices.dtype)


def merge_params(base: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in recursively (the YAML's nested layout)."""
    out = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_params(out[key], value)
        else:
            out[key] = value
    return out


class KPDetector(nn.Module):
    """Keypoints as soft-argmax of heatmaps from an hourglass, with a 2x2 Jacobian per keypoint."""

    def __init__(self, block_expansion: int, num_kp: int, num_channels: int, max_features: int, num_blocks: int,
                 temperature: float, estimate_jacobian: bool = False, scale_factor: float = 1.0, pad: int = 0):
        super().__init__()
        self.predictor = Hourglass(block_expansion, num_channels, num_blocks, max_features, dims=2)
        self.kp = nn.Conv2d(self.predictor.out_filters, num_kp, kernel_size=7, padding=pad)
        self.jacobian = (nn.Conv2d(self.predictor.out_filters, 4 * num_kp, kernel_size=7, padding=pad)
                         if estimate_jacobian else None)
        if self.jacobian is not None:
            # As the reference: start from identity Jacobians (matters for randomly initialised networks).
            nn.init.zeros_(self.jacobian.weight)
            with torch.no_grad():
                self.jacobian.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0]).repeat(num_kp))
        self.temperature = temperature
        self.scale_factor = scale_factor
        if scale_factor != 1:
            self.down = AntiAliasDownsample(num_channels, scale_factor)

    def forward(self, image: torch.Tensor) -> Keypoints:
        if self.scale_factor != 1:
            image = self.down(image)
        features = self.predictor(image)
        heatmap = spatial_softmax(self.kp(features), self.temperature)  # (B, K, H, W)
        out = {"value": heatmap_expectation(heatmap)}
        if self.jacobian is not None:
            b, k, h, w = heatmap.shape
            maps = self.jacobian(features).reshape(b, k, 4, h, w)
            # Each keypoint's Jacobian is its map averaged under its own heatmap.
            out["jacobian"] = torch.einsum("bkhw,bkjhw->bkj", heatmap, maps).reshape(b, k, 2, 2)
        return out


class DenseMotionNetwork(nn.Module):
    """Combines per-keypoint local affine motions into a dense flow (masks) and an occlusion map."""

    def __init__(self, block_expansion: int, num_blocks: int, max_features: int, num_kp: int, num_channels: int,
                 estimate_occlusion_map: bool = False, scale_factor: float = 1.0, kp_variance: float = 0.01):
        super().__init__()
        in_features = (num_kp + 1) * (num_channels + 1)
        self.hourglass = Hourglass(block_expansion, in_features, num_blocks, max_features, dims=2)
        self.mask = nn.Conv2d(self.hourglass.out_filters, num_kp + 1, kernel_size=7, padding=3)
        self.occlusion = (nn.Conv2d(self.hourglass.out_filters, 1, kernel_size=7, padding=3)
                          if estimate_occlusion_map else None)
        self.num_kp = num_kp
        self.scale_factor = scale_factor
        self.kp_variance = kp_variance
        if scale_factor != 1:
            self.down = AntiAliasDownsample(num_channels, scale_factor)

    def downsample(self, source: torch.Tensor) -> torch.Tensor:
        return self.down(source) if self.scale_factor != 1 else source

    def sparse_motions(self, grid: torch.Tensor, kp_driving: Keypoints, kp_source: Keypoints) -> torch.Tensor:
        """(B, K+1, H, W, 2): for each keypoint, where each driving pixel comes from in the source (Eq. 4);
        entry 0 is the identity (background)."""
        b = kp_driving["value"].shape[0]
        offset = grid[None, None] - kp_driving["value"][:, :, None, None, :]
        if "jacobian" in kp_driving and kp_driving["jacobian"] is not None:
            jac = kp_source["jacobian"] @ _inverse(kp_driving["jacobian"])  # (B, K, 2, 2)
            offset = torch.einsum("bkij,bkhwj->bkhwi", jac, offset)
        to_source = offset + kp_source["value"][:, :, None, None, :]
        identity = grid[None, None].expand(b, 1, *grid.shape)
        return torch.cat([identity, to_source], dim=1)

    def forward(self, small_source: torch.Tensor, kp_driving: Keypoints,
                kp_source: Keypoints) -> dict[str, torch.Tensor]:
        """``small_source``: the source already passed through :meth:`downsample` (cached across frames)."""
        b, c, h, w = small_source.shape
        k1 = self.num_kp + 1
        grid = coordinate_grid_2d(h, w, like=small_source)
        motions = self.sparse_motions(grid, kp_driving, kp_source)
        heat = (keypoint_gaussians(kp_driving["value"], grid, self.kp_variance)
                - keypoint_gaussians(kp_source["value"], grid, self.kp_variance))
        heat = torch.cat([heat.new_zeros(b, 1, h, w), heat], dim=1).unsqueeze(2)  # (B, K+1, 1, H, W)
        repeated = small_source.unsqueeze(1).expand(b, k1, c, h, w).reshape(b * k1, c, h, w)
        deformed = F.grid_sample(repeated, motions.reshape(b * k1, h, w, 2), align_corners=True).view(b, k1, c, h, w)
        prediction = self.hourglass(torch.cat([heat, deformed], dim=2).view(b, -1, h, w))
        mask = F.softmax(self.mask(prediction), dim=1)  # (B, K+1, H, W)
        out = {"mask": mask, "deformation": torch.einsum("bkhw,bkhwc->bhwc", mask, motions)}
        if self.occlusion is not None:
            out["occlusion_map"] = torch.sigmoid(self.occlusion(prediction))
        return out


class OcclusionAwareGenerator(nn.Module):
    """Encoder -> warp by the dense motion -> mask occlusions -> decoder (Johnson-style)."""

    def __init__(self, num_channels: int, num_kp: int, block_expansion: int, max_features: int, num_down_blocks: int,
                 num_bottleneck_blocks: int, estimate_occlusion_map: bool = False,
                 dense_motion_params: dict[str, Any] | None = None, estimate_jacobian: bool = False):
        super().__init__()
        self.dense_motion_network = DenseMotionNetwork(num_kp=num_kp, num_channels=num_channels,
                                                       estimate_occlusion_map=estimate_occlusion_map,
                                                       **(dense_motion_params or {}))
        self.first = SameBlock2d(num_channels, block_expansion, kernel_size=7, padding=3)
        widths = [min(max_features, block_expansion * 2**i) for i in range(num_down_blocks + 1)]
        self.down_blocks = nn.ModuleList(DownBlock2d(widths[i], widths[i + 1]) for i in range(num_down_blocks))
        self.up_blocks = nn.ModuleList(UpBlock2d(widths[num_down_blocks - i], widths[num_down_blocks - i - 1])
                                       for i in range(num_down_blocks))
        self.bottleneck = nn.Sequential()
        for i in range(num_bottleneck_blocks):
            self.bottleneck.add_module(f"r{i}", ResBlock2d(widths[-1]))
        self.final = nn.Conv2d(block_expansion, num_channels, kernel_size=7, padding=3)

    def encode(self, source: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parts that depend only on the source image: computed once per video."""
        out = self.first(source)
        for block in self.down_blocks:
            out = block(out)
        return {"features": out, "small_source": self.dense_motion_network.downsample(source)}

    def decode(self, encoded: dict[str, torch.Tensor], kp_driving: Keypoints, kp_source: Keypoints) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1]; ``encoded`` may hold one source (batch 1) for a batch of drivings."""
        b = kp_driving["value"].shape[0]
        features = _expand(encoded["features"], b)
        motion = self.dense_motion_network(_expand(encoded["small_source"], b), kp_driving, kp_source)
        deformation = motion["deformation"]
        if deformation.shape[1:3] != features.shape[2:]:
            deformation = F.interpolate(deformation.permute(0, 3, 1, 2), size=features.shape[2:], mode="bilinear",
                                        align_corners=False).permute(0, 2, 3, 1)
        out = F.grid_sample(features, deformation, align_corners=True)
        if "occlusion_map" in motion:
            occlusion = motion["occlusion_map"]
            if occlusion.shape[2:] != out.shape[2:]:
                occlusion = F.interpolate(occlusion, size=out.shape[2:], mode="bilinear", align_corners=False)
            out = out * occlusion
        out = self.bottleneck(out)
        for block in self.up_blocks:
            out = block(out)
        return torch.sigmoid(self.final(out))

    def forward(self, source: torch.Tensor, kp_driving: Keypoints, kp_source: Keypoints) -> torch.Tensor:
        return self.decode(self.encode(source), kp_driving, kp_source)


def _expand(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    return tensor.expand(batch, *tensor.shape[1:]) if tensor.shape[0] == 1 and batch != 1 else tensor


@dataclass
class FOMMNetworks:
    kp_detector: KPDetector
    generator: OcclusionAwareGenerator
    params: dict[str, Any] = field(default_factory=dict)

    def modules(self) -> dict[str, nn.Module]:
        """Checkpoint key -> network, as in the public file."""
        return {"generator": self.generator, "kp_detector": self.kp_detector}


def build_fomm(model_params: dict[str, Any] | None = None) -> FOMMNetworks:
    """The networks of ``config/vox-256.yaml``, with ``model_params`` overrides (same nested names)."""
    params = merge_params(VOX_256, model_params)
    common = params["common_params"]
    kp_detector = KPDetector(**params["kp_detector_params"], **common)
    generator = OcclusionAwareGenerator(**params["generator_params"], **common)
    return FOMMNetworks(kp_detector.eval(), generator.eval(), params)


def relative_keypoints(kp_source: Keypoints, kp_driving: Keypoints, kp_driving_initial: Keypoints,
                       movement_scale: float = 1.0, relative_jacobian: bool = True) -> Keypoints:
    """FOMM's relative motion transfer: the source keypoints moved as the driver moved since its first frame."""
    out = {"value": kp_source["value"] + (kp_driving["value"] - kp_driving_initial["value"]) * movement_scale}
    if relative_jacobian and "jacobian" in kp_driving:
        change = kp_driving["jacobian"] @ _inverse(kp_driving_initial["jacobian"])
        out["jacobian"] = change @ kp_source["jacobian"]
    elif "jacobian" in kp_driving:
        out["jacobian"] = kp_driving["jacobian"]
    return out
