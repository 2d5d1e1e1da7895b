"""face-vid2vid (Wang et al., CVPR 2021) as reimplemented in zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis.

Written against that repository's final modules (keypoint_detector.py: KPDetector, HEEstimator;
dense_motion.py; generator.py: OcclusionAwareGenerator, OcclusionAwareSPADEGenerator; util.py) and the
``vox-256-spade.yaml`` published with ``00000189-checkpoint.pth.tar``; names match its state dicts.

Keypoints live in the (x right, y down, z depth) grid of the 3D feature volume, in [-1, 1]. A frame's keypoints are
``R(yaw, pitch, roll) @ kp_canonical + t + expression`` with the reimplementation's rotation
``R = R_x(pitch) @ R_y(yaw) @ R_z(roll)``. Its head-pose estimator names its heads oddly: ``fc_roll``
predicts the *yaw* bins and ``fc_yaw`` the *roll* bins (see :class:`HEEstimator`); the names are kept for the
checkpoint, the outputs are used by meaning.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ophav_talkinghead.fomm_net import merge_params
from ophav_talkinghead.layers import (AntiAliasDownsample, DownBlock2d, Hourglass, ResBlock2d, ResBlock3d,
                                      SameBlock2d, SPADEResnetBlock, UpBlock2d, UpBlock3d, coordinate_grid_3d,
                                      heatmap_expectation, keypoint_gaussians, spatial_softmax)

# model_params of vox-256-spade.yaml (identical to config/vox-256.yaml of the repository).
VOX_256: dict[str, Any] = {
    "common_params": {"num_kp": 15, "image_channel": 3, "feature_channel": 32, "estimate_jacobian": False},
    "kp_detector_params": {"temperature": 0.1, "block_expansion": 32, "max_features": 1024, "scale_factor": 0.25,
                           "num_blocks": 5, "reshape_channel": 16384, "reshape_depth": 16},
    "he_estimator_params": {"block_expansion": 64, "max_features": 2048, "num_bins": 66},
    "generator_params": {"block_expansion": 64, "max_features": 512, "num_down_blocks": 2, "reshape_channel": 32,
                         "reshape_depth": 16, "num_resblocks": 6, "estimate_occlusion_map": True,
                         "dense_motion_params": {"block_expansion": 32, "max_features": 1024, "num_blocks": 5,
                                                 "reshape_depth": 16, "compress": 4}},
}
DECODERS = ("spade", "original")


def _no_jacobian(estimate_jacobian: bool) -> None:
    if estimate_jacobian:
        raise ValueError("face-vid2vid with estimate_jacobian=True is not supported: the public checkpoint has no "
                         "Jacobian head (its config sets estimate_jacobian: False)")


# ---------------------------------------------------------------------------------------------- keypoints


class KPHourglass(nn.Module):
    """2D encoder, a 1x1 conv that lifts channels into a (C, D) volume, 3D decoder without skips."""

    def __init__(self, block_expansion: int, in_features: int, reshape_features: int, reshape_depth: int,
                 num_blocks: int, max_features: int):
        super().__init__()
        widths = [min(max_features, block_expansion * 2**i) for i in range(num_blocks + 1)]
        self.down_blocks = nn.Sequential()
        for i in range(num_blocks):
            self.down_blocks.add_module(f"down{i}", DownBlock2d(in_features if i == 0 else widths[i], widths[i + 1]))
        self.conv = nn.Conv2d(widths[-1], reshape_features, kernel_size=1)
        self.up_blocks = nn.Sequential()
        for i in range(num_blocks):
            self.up_blocks.add_module(f"up{i}", UpBlock3d(widths[num_blocks - i], widths[num_blocks - i - 1]))
        self.reshape_depth = reshape_depth
        self.out_filters = widths[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(self.down_blocks(x))
        b, c, h, w = out.shape
        return self.up_blocks(out.view(b, c // self.reshape_depth, self.reshape_depth, h, w))


class KPDetector(nn.Module):
    """Canonical (pose- and expression-free) 3D keypoints of the source identity."""

    def __init__(self, block_expansion: int, num_kp: int, image_channel: int, max_features: int, reshape_channel: int,
                 reshape_depth: int, num_blocks: int, temperature: float, estimate_jacobian: bool = False,
                 scale_factor: float = 1.0, feature_channel: int = 0, single_jacobian_map: bool = False):
        super().__init__()
        _no_jacobian(estimate_jacobian)
        self.predictor = KPHourglass(block_expansion, image_channel, reshape_channel, reshape_depth, num_blocks,
                                     max_features)
        self.kp = nn.Conv3d(self.predictor.out_filters, num_kp, kernel_size=3, padding=1)
        self.temperature = temperature
        self.scale_factor = scale_factor
        if scale_factor != 1:
            self.down = AntiAliasDownsample(image_channel, scale_factor)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, K, 3) keypoints (x, y, z) in [-1, 1]."""
        if self.scale_factor != 1:
            image = self.down(image)
        heatmap = spatial_softmax(self.kp(self.predictor(image)), self.temperature)  # (B, K, D, H, W)
        return heatmap_expectation(heatmap)


class ResBottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1, post-activation), with a projected skip when strided."""

    def __init__(self, in_features: int, stride: int):
        super().__init__()
        mid = in_features // 4
        self.conv1 = nn.Conv2d(in_features, mid, kernel_size=1)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, padding=1, stride=stride)
        self.conv3 = nn.Conv2d(mid, in_features, kernel_size=1)
        self.norm1 = nn.BatchNorm2d(mid, affine=True)
        self.norm2 = nn.BatchNorm2d(mid, affine=True)
        self.norm3 = nn.BatchNorm2d(in_features, affine=True)
        self.stride = stride
        if stride != 1:
            self.skip = nn.Conv2d(in_features, in_features, kernel_size=1, stride=stride)
            self.norm4 = nn.BatchNorm2d(in_features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = F.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        if self.stride != 1:
            x = self.norm4(self.skip(x))
        return F.relu(out + x)


def _bottleneck_stack(prefix: str, features: int, count: int) -> nn.Sequential:
    stack = nn.Sequential()
    for i in range(count):
        stack.add_module(f"{prefix}_{i}", ResBottleneck(features, stride=1))
    return stack


class HEEstimator(nn.Module):
    """Head pose (66 bins of 3 degrees each for yaw, pitch, roll), translation and expression deltas.

    The reference hard-codes the stage widths 256/512/1024/2048; here they are ``max_features`` / 8, 4, 2, 1,
    which is the same for the published ``max_features: 2048`` and lets tests build small copies."""

    def __init__(self, block_expansion: int, num_kp: int, image_channel: int, max_features: int, num_bins: int = 66,
                 feature_channel: int = 0, estimate_jacobian: bool = True):
        super().__init__()
        w1, w2, w3, w4 = (max_features // 8, max_features // 4, max_features // 2, max_features)
        self.conv1 = nn.Conv2d(image_channel, block_expansion, kernel_size=7, padding=3, stride=2)
        self.norm1 = nn.BatchNorm2d(block_expansion, affine=True)
        self.conv2 = nn.Conv2d(block_expansion, w1, kernel_size=1)
        self.norm2 = nn.BatchNorm2d(w1, affine=True)
        self.block1 = _bottleneck_stack("b1", w1, 3)
        self.conv3 = nn.Conv2d(w1, w2, kernel_size=1)
        self.norm3 = nn.BatchNorm2d(w2, affine=True)
        self.block2 = ResBottleneck(w2, stride=2)
        self.block3 = _bottleneck_stack("b3", w2, 3)
        self.conv4 = nn.Conv2d(w2, w3, kernel_size=1)
        self.norm4 = nn.BatchNorm2d(w3, affine=True)
        self.block4 = ResBottleneck(w3, stride=2)
        self.block5 = _bottleneck_stack("b5", w3, 5)
        self.conv5 = nn.Conv2d(w3, w4, kernel_size=1)
        self.norm5 = nn.BatchNorm2d(w4, affine=True)
        self.block6 = ResBottleneck(w4, stride=2)
        self.block7 = _bottleneck_stack("b7", w4, 2)
        # Named as in the checkpoint; fc_roll carries yaw and fc_yaw carries roll (see forward).
        self.fc_roll = nn.Linear(w4, num_bins)
        self.fc_pitch = nn.Linear(w4, num_bins)
        self.fc_yaw = nn.Linear(w4, num_bins)
        self.fc_t = nn.Linear(w4, 3)
        self.fc_exp = nn.Linear(w4, 3 * num_kp)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Bin logits ``yaw``/``pitch``/``roll`` (B, bins), ``t`` (B, 3), ``exp`` (B, K, 3)."""
        out = F.max_pool2d(F.relu(self.norm1(self.conv1(image))), kernel_size=3, stride=2, padding=1)
        out = self.block1(F.relu(self.norm2(self.conv2(out))))
        out = self.block3(self.block2(F.relu(self.norm3(self.conv3(out)))))
        out = self.block5(self.block4(F.relu(self.norm4(self.conv4(out)))))
        out = self.block7(self.block6(F.relu(self.norm5(self.conv5(out)))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        # The reimplementation trains yaw on fc_roll and roll on fc_yaw; swap back to meaning here.
        return {"yaw": self.fc_roll(out), "pitch": self.fc_pitch(out), "roll": self.fc_yaw(out),
                "t": self.fc_t(out), "exp": self.fc_exp(out).view(out.shape[0], -1, 3)}


# ---------------------------------------------------------------------------------------------- motion


class DenseMotionNetwork(nn.Module):
    """3D dense flow and a 2D occlusion map from keypoint-induced translations of a compressed feature volume."""

    def __init__(self, block_expansion: int, num_blocks: int, max_features: int, num_kp: int, feature_channel: int,
                 reshape_depth: int, compress: int, estimate_occlusion_map: bool = False):
        super().__init__()
        self.hourglass = Hourglass(block_expansion, (num_kp + 1) * (compress + 1), num_blocks, max_features, dims=3)
        self.mask = nn.Conv3d(self.hourglass.out_filters, num_kp + 1, kernel_size=7, padding=3)
        self.compress = nn.Conv3d(feature_channel, compress, kernel_size=1)
        self.norm = nn.BatchNorm3d(compress, affine=True)
        self.occlusion = (nn.Conv2d(self.hourglass.out_filters * reshape_depth, 1, kernel_size=7, padding=3)
                          if estimate_occlusion_map else None)
        self.num_kp = num_kp

    def forward(self, feature: torch.Tensor, kp_driving: torch.Tensor,
                kp_source: torch.Tensor) -> dict[str, torch.Tensor]:
        feature = F.relu(self.norm(self.compress(feature)))
        b, c, d, h, w = feature.shape
        k1 = self.num_kp + 1
        grid = coordinate_grid_3d(d, h, w, like=feature)
        # Per keypoint: where each driving voxel comes from in the source (pure translation, no Jacobian).
        to_source = grid[None, None] - kp_driving[:, :, None, None, None, :] + kp_source[:, :, None, None, None, :]
        motions = torch.cat([grid[None, None].expand(b, 1, d, h, w, 3), to_source], dim=1)  # (B, K+1, D, H, W, 3)
        repeated = feature.unsqueeze(1).expand(b, k1, c, d, h, w).reshape(b * k1, c, d, h, w)
        deformed = F.grid_sample(repeated, motions.reshape(b * k1, d, h, w, 3), align_corners=False)
        deformed = deformed.view(b, k1, c, d, h, w)
        heat = keypoint_gaussians(kp_driving, grid, 0.01) - keypoint_gaussians(kp_source, grid, 0.01)
        heat = torch.cat([heat.new_zeros(b, 1, d, h, w), heat], dim=1).unsqueeze(2)  # (B, K+1, 1, D, H, W)
        prediction = self.hourglass(torch.cat([heat, deformed], dim=2).view(b, -1, d, h, w))
        mask = F.softmax(self.mask(prediction), dim=1)
        out = {"mask": mask, "deformation": torch.einsum("bkdhw,bkdhwc->bdhwc", mask, motions)}
        if self.occlusion is not None:
            out["occlusion_map"] = torch.sigmoid(self.occlusion(prediction.flatten(1, 2)))
        return out


# ---------------------------------------------------------------------------------------------- generators


class SPADEDecoder(nn.Module):
    """The SPADE image decoder of the released generator. The reference hard-codes 256 input channels,
    64 output channels and 128 hidden; these are the defaults (set from the generator's widths)."""

    def __init__(self, in_channels: int = 256, out_channels: int = 64, hidden: int = 128, num_middle: int = 6):
        super().__init__()
        ic, oc = in_channels, out_channels
        self.fc = nn.Conv2d(ic, 2 * ic, kernel_size=3, padding=1)
        for i in range(num_middle):
            self.add_module(f"G_middle_{i}", SPADEResnetBlock(2 * ic, 2 * ic, ic, hidden))
        self.up_0 = SPADEResnetBlock(2 * ic, ic, ic, hidden)
        self.up_1 = SPADEResnetBlock(ic, oc, ic, hidden)
        self.conv_img = nn.Conv2d(oc, 3, kernel_size=3, padding=1)
        self.num_middle = num_middle

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        x = self.fc(feature)
        for i in range(self.num_middle):
            x = getattr(self, f"G_middle_{i}")(x, feature)
        x = self.up_0(F.interpolate(x, scale_factor=2.0, mode="nearest"), feature)
        x = self.up_1(F.interpolate(x, scale_factor=2.0, mode="nearest"), feature)
        return torch.sigmoid(self.conv_img(F.leaky_relu(x, 0.2)))


class OcclusionAwareGenerator(nn.Module):
    """Source image -> 3D appearance volume -> warped by the dense motion -> 2D features -> image.

    ``decoder="spade"`` is ``OcclusionAwareSPADEGenerator`` (the released checkpoint); ``"original"`` the
    residual/upsampling decoder of ``OcclusionAwareGenerator``."""

    def __init__(self, image_channel: int, feature_channel: int, num_kp: int, block_expansion: int, max_features: int,
                 num_down_blocks: int, reshape_channel: int, reshape_depth: int, num_resblocks: int,
                 estimate_occlusion_map: bool = False, dense_motion_params: dict[str, Any] | None = None,
                 estimate_jacobian: bool = False, decoder: str = "spade", spade_hidden: int = 128):
        super().__init__()
        _no_jacobian(estimate_jacobian)
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        self.dense_motion_network = DenseMotionNetwork(num_kp=num_kp, feature_channel=feature_channel,
                                                       estimate_occlusion_map=estimate_occlusion_map,
                                                       **(dense_motion_params or {}))
        first_kernel = 3 if decoder == "spade" else 7
        self.first = SameBlock2d(image_channel, block_expansion, kernel_size=first_kernel, padding=first_kernel // 2)
        widths = [min(max_features, block_expansion * 2**i) for i in range(num_down_blocks + 1)]
        self.down_blocks = nn.ModuleList(DownBlock2d(widths[i], widths[i + 1]) for i in range(num_down_blocks))
        self.second = nn.Conv2d(widths[-1], max_features, kernel_size=1)
        self.resblocks_3d = nn.Sequential()
        for i in range(num_resblocks):
            self.resblocks_3d.add_module(f"3dr{i}", ResBlock3d(reshape_channel))
        features_2d = block_expansion * 2**num_down_blocks
        self.third = SameBlock2d(max_features, features_2d, kernel_size=3, padding=1, lrelu=True)
        self.fourth = nn.Conv2d(features_2d, features_2d, kernel_size=1)
        self.decoder_kind = decoder
        if decoder == "spade":
            self.decoder = SPADEDecoder(features_2d, block_expansion, spade_hidden)
        else:
            self.resblocks_2d = nn.Sequential()
            for i in range(num_resblocks):
                self.resblocks_2d.add_module(f"2dr{i}", ResBlock2d(features_2d))
            ups = [max(block_expansion, block_expansion * 2**(num_down_blocks - i)) for i in range(num_down_blocks + 1)]
            self.up_blocks = nn.ModuleList(UpBlock2d(ups[i], ups[i + 1]) for i in range(num_down_blocks))
            self.final = nn.Conv2d(block_expansion, image_channel, kernel_size=7, padding=3)
        self.reshape_channel = reshape_channel
        self.reshape_depth = reshape_depth

    def encode(self, source: torch.Tensor) -> torch.Tensor:
        """The source's 3D appearance volume (B, C, D, H, W); computed once per video."""
        out = self.first(source)
        for block in self.down_blocks:
            out = block(out)
        out = self.second(out)
        b, _, h, w = out.shape
        return self.resblocks_3d(out.view(b, self.reshape_channel, self.reshape_depth, h, w))

    def decode(self, volume: torch.Tensor, kp_driving: torch.Tensor, kp_source: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1]; ``volume`` may hold one source (batch 1) for a batch of drivings."""
        b = kp_driving.shape[0]
        if volume.shape[0] == 1 and b != 1:
            volume = volume.expand(b, *volume.shape[1:])
        motion = self.dense_motion_network(volume, kp_driving, kp_source)
        deformation = motion["deformation"]
        if deformation.shape[1:4] != volume.shape[2:]:
            deformation = F.interpolate(deformation.permute(0, 4, 1, 2, 3), size=volume.shape[2:], mode="trilinear",
                                        align_corners=False).permute(0, 2, 3, 4, 1)
        out = F.grid_sample(volume, deformation, align_corners=False)
        out = self.fourth(self.third(out.flatten(1, 2)))
        if "occlusion_map" in motion:
            occlusion = motion["occlusion_map"]
            if occlusion.shape[2:] != out.shape[2:]:
                occlusion = F.interpolate(occlusion, size=out.shape[2:], mode="bilinear", align_corners=False)
            out = out * occlusion
        if self.decoder_kind == "spade":
            return self.decoder(out)
        out = self.resblocks_2d(out)
        for block in self.up_blocks:
            out = block(out)
        return torch.sigmoid(self.final(out))

    def forward(self, source: torch.Tensor, kp_driving: torch.Tensor, kp_source: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(source), kp_driving, kp_source)


# ---------------------------------------------------------------------------------------------- assembly


@dataclass
class FaceVid2VidNetworks:
    kp_detector: KPDetector
    he_estimator: HEEstimator
    generator: OcclusionAwareGenerator
    params: dict[str, Any] = field(default_factory=dict)

    def modules(self) -> dict[str, nn.Module]:
        """Checkpoint key -> network, as in the public file."""
        return {"generator": self.generator, "kp_detector": self.kp_detector, "he_estimator": self.he_estimator}


def build_facevid2vid(model_params: dict[str, Any] | None = None, decoder: str = "spade") -> FaceVid2VidNetworks:
    """The networks of ``vox-256-spade.yaml`` with ``model_params`` overrides (same nested names)."""
    params = merge_params(VOX_256, model_params)
    common = params["common_params"]
    generator = OcclusionAwareGenerator(**params["generator_params"], **common, decoder=decoder)
    kp_detector = KPDetector(**params["kp_detector_params"], **common)
    he_estimator = HEEstimator(**params["he_estimator_params"], **common)
    return FaceVid2VidNetworks(kp_detector.eval(), he_estimator.eval(), generator.eval(), params)


def detect_decoder(generator_state: dict[str, torch.Tensor]) -> str:
    """Which generator a checkpoint's ``generator`` state dict belongs to."""
    return "spade" if any(k.startswith("decoder.") for k in generator_state) else "original"


# ---------------------------------------------------------------------------------------------- head pose


def bins_to_degrees(logits: torch.Tensor) -> torch.Tensor:
    """Expected angle of 3-degree bins starting at -99 degrees (the Hopenet binning the model was trained with)."""
    bins = torch.arange(logits.shape[-1], device=logits.device, dtype=logits.dtype)
    return (F.softmax(logits, dim=-1) * bins).sum(-1) * 3 - 99


def rotation_matrix(yaw: torch.Tensor, pitch: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) = R_x(pitch) @ R_y(yaw) @ R_z(roll) from degrees, as the reimplementation builds it.

    It converts with pi ~ 3.14 (not math.pi); the released model was trained that way, so it is kept."""
    y, p, r = (a * (3.14 / 180.0) for a in (yaw, pitch, roll))
    one, zero = torch.ones_like(y), torch.zeros_like(y)
    rx = torch.stack([one, zero, zero, zero, p.cos(), -p.sin(), zero, p.sin(), p.cos()], -1).view(-1, 3, 3)
    ry = torch.stack([y.cos(), zero, y.sin(), zero, one, zero, -y.sin(), zero, y.cos()], -1).view(-1, 3, 3)
    rz = torch.stack([r.cos(), -r.sin(), zero, r.sin(), r.cos(), zero, zero, zero, one], -1).view(-1, 3, 3)
    return rx @ ry @ rz


def posed_keypoints(canonical: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor,
                    expression: torch.Tensor) -> torch.Tensor:
    """``R @ kp + t + exp`` for keypoints (B, K, 3)."""
    return canonical @ rotation.transpose(1, 2) + translation[:, None, :] + expression
