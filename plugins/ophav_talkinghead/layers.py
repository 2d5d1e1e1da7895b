"""Building blocks shared by the FOMM and face-vid2vid networks.

Module and parameter names follow the public implementations (AliaksandrSiarohin/first-order-model and
zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis) so their checkpoints load with
``strict=True``. Their ``SynchronizedBatchNorm`` is a ``_BatchNorm`` subclass with the same parameters and
buffers as torch's BatchNorm, so plain BatchNorm is used (inference only: running statistics).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------- grids


def coordinate_grid_2d(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """(H, W, 2) grid of (x, y) in [-1, 1], pixel centres at the ends (the references' convention)."""
    x = torch.linspace(-1.0, 1.0, width, device=like.device, dtype=like.dtype)
    y = torch.linspace(-1.0, 1.0, height, device=like.device, dtype=like.dtype)
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def coordinate_grid_3d(depth: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """(D, H, W, 3) grid of (x, y, z) in [-1, 1]."""
    x = torch.linspace(-1.0, 1.0, width, device=like.device, dtype=like.dtype)
    y = torch.linspace(-1.0, 1.0, height, device=like.device, dtype=like.dtype)
    z = torch.linspace(-1.0, 1.0, depth, device=like.device, dtype=like.dtype)
    zz, yy, xx = torch.meshgrid(z, y, x, indexing="ij")
    return torch.stack([xx, yy, zz], dim=-1)


def keypoint_gaussians(keypoints: torch.Tensor, grid: torch.Tensor, variance: float) -> torch.Tensor:
    """Unnormalised Gaussians around keypoints (B, K, C) on ``grid`` (*S, C): (B, K, *S)."""
    spatial = grid.shape[:-1]
    offsets = grid.reshape(1, 1, *grid.shape) - keypoints.reshape(*keypoints.shape[:2], *([1] * len(spatial)), -1)
    return torch.exp(-0.5 * offsets.pow(2).sum(-1) / variance)


def heatmap_expectation(heatmap: torch.Tensor) -> torch.Tensor:
    """Expected grid coordinate of each (softmax-normalised) heatmap (B, K, *S) -> (B, K, len(S))."""
    spatial = heatmap.shape[2:]
    if len(spatial) == 2:
        grid = coordinate_grid_2d(*spatial, like=heatmap)
    else:
        grid = coordinate_grid_3d(*spatial, like=heatmap)
    weights = heatmap.flatten(2)  # (B, K, S)
    return torch.einsum("bks,sc->bkc", weights, grid.reshape(-1, grid.shape[-1]))


def spatial_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    shape = logits.shape
    return F.softmax(logits.flatten(2) / temperature, dim=2).view(shape)


# ---------------------------------------------------------------------------------------------- 2D blocks


class SameBlock2d(nn.Module):
    """conv -> BN -> ReLU (LeakyReLU where ``lrelu``), same resolution."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, padding: int = 1,
                 lrelu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding)
        self.norm = nn.BatchNorm2d(out_features, affine=True)
        self.lrelu = lrelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return F.leaky_relu(x, 0.01) if self.lrelu else F.relu(x)


class DownBlock2d(nn.Module):
    """conv -> BN -> ReLU -> 2x2 average pool."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(out_features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.relu(self.norm(self.conv(x))), 2)


class UpBlock2d(nn.Module):
    """nearest x2 -> conv -> BN -> ReLU."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(out_features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))))


class ResBlock2d(nn.Module):
    """Pre-activation residual block (BN -> ReLU -> conv, twice)."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.norm1 = nn.BatchNorm2d(features, affine=True)
        self.norm2 = nn.BatchNorm2d(features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        return x + self.conv2(F.relu(self.norm2(out)))


class AntiAliasDownsample(nn.Module):
    """Gaussian blur then subsampling by an integer factor (``1/scale``); the blur kernel is a buffer named
    ``weight`` because the public checkpoints store it."""

    def __init__(self, channels: int, scale: float):
        super().__init__()
        sigma = (1.0 / scale - 1.0) / 2.0
        size = 2 * round(sigma * 4) + 1
        self.pad_before = size // 2
        self.pad_after = self.pad_before - 1 if size % 2 == 0 else self.pad_before
        coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        g = torch.exp(-coords.pow(2) / (2 * sigma**2))
        kernel = g[:, None] * g[None, :]
        kernel = (kernel / kernel.sum()).expand(channels, 1, size, size).clone()
        self.register_buffer("weight", kernel)
        self.groups = channels
        self.step = int(round(1.0 / scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad_before, self.pad_after, self.pad_before, self.pad_after))
        x = F.conv2d(x, self.weight, groups=self.groups)
        # Both references subsample by taking every step-th pixel (nearest interpolation at 1/step gives the same).
        return x[:, :, :: self.step, :: self.step]


# ---------------------------------------------------------------------------------------------- 3D blocks


class DownBlock3d(nn.Module):
    """conv3d -> BN -> ReLU -> (1, 2, 2) average pool (the reimplementation's final version)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.conv = nn.Conv3d(in_features, out_features, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(out_features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(F.relu(self.norm(self.conv(x))), (1, 2, 2))


class UpBlock3d(nn.Module):
    """nearest (1, 2, 2) upsampling -> conv3d -> BN -> ReLU."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.conv = nn.Conv3d(in_features, out_features, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(out_features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return F.relu(self.norm(self.conv(x)))


class ResBlock3d(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv3d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv3d(features, features, kernel_size=3, padding=1)
        self.norm1 = nn.BatchNorm3d(features, affine=True)
        self.norm2 = nn.BatchNorm3d(features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        return x + self.conv2(F.relu(self.norm2(out)))


# ---------------------------------------------------------------------------------------------- hourglasses


def _hourglass_widths(block_expansion: int, max_features: int, num_blocks: int) -> list[int]:
    """Channel count after each encoder level: level i has min(max, expansion * 2**i)."""
    return [min(max_features, block_expansion * 2**i) for i in range(num_blocks + 1)]


class HourglassEncoder(nn.Module):
    def __init__(self, block, block_expansion: int, in_features: int, num_blocks: int, max_features: int):
        super().__init__()
        widths = _hourglass_widths(block_expansion, max_features, num_blocks)
        self.down_blocks = nn.ModuleList(
            block(in_features if i == 0 else widths[i], widths[i + 1]) for i in range(num_blocks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = [x]
        for down in self.down_blocks:
            outs.append(down(outs[-1]))
        return outs


class HourglassDecoder(nn.Module):
    """Upsampling path with skip connections; ``final_conv`` adds the 3D variant's closing conv-BN-ReLU."""

    def __init__(self, block, block_expansion: int, in_features: int, num_blocks: int, max_features: int,
                 final_conv: bool = False):
        super().__init__()
        widths = _hourglass_widths(block_expansion, max_features, num_blocks)
        blocks = []
        for i in reversed(range(num_blocks)):
            # The deepest level has no skip concatenated yet; every other level gets its skip's channels too.
            in_filters = (1 if i == num_blocks - 1 else 2) * widths[i + 1]
            blocks.append(block(in_filters, widths[i]))
        self.up_blocks = nn.ModuleList(blocks)
        self.out_filters = block_expansion + in_features
        self.final_conv = final_conv
        if final_conv:
            self.conv = nn.Conv3d(self.out_filters, self.out_filters, kernel_size=3, padding=1)
            self.norm = nn.BatchNorm3d(self.out_filters, affine=True)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        skips = list(skips)
        out = skips.pop()
        for up in self.up_blocks:
            out = torch.cat([up(out), skips.pop()], dim=1)
        if self.final_conv:
            out = F.relu(self.norm(self.conv(out)))
        return out


class Hourglass(nn.Module):
    """U-Net style hourglass: 2D (FOMM) or 3D (face-vid2vid)."""

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int, dims: int = 2):
        super().__init__()
        down, up = (DownBlock2d, UpBlock2d) if dims == 2 else (DownBlock3d, UpBlock3d)
        self.encoder = HourglassEncoder(down, block_expansion, in_features, num_blocks, max_features)
        self.decoder = HourglassDecoder(up, block_expansion, in_features, num_blocks, max_features,
                                        final_conv=dims == 3)
        self.out_filters = self.decoder.out_filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


# ---------------------------------------------------------------------------------------------- SPADE


class SpectralConv2d(nn.Module):
    """A conv with spectral normalisation as ``torch.nn.utils.spectral_norm`` stores it (``weight_orig``,
    ``weight_u``, ``weight_v``), evaluated the way that hook does at inference: W / (u^T W v), no power step."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, bias: bool = True):
        super().__init__()
        self.weight_orig = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.register_buffer("weight_u", F.normalize(torch.randn(out_channels), dim=0))
        self.register_buffer("weight_v", F.normalize(torch.randn(in_channels * kernel_size * kernel_size), dim=0))
        nn.init.kaiming_uniform_(self.weight_orig, a=5**0.5)
        self.padding = padding
        self.estimate_singular_vectors()

    @torch.no_grad()
    def estimate_singular_vectors(self, iterations: int = 10) -> None:
        """Power iteration for ``weight_u``/``weight_v`` (a trained checkpoint stores converged ones; this makes a
        freshly initialised layer behave like one)."""
        matrix = self.weight_orig.flatten(1)
        u, v = self.weight_u, self.weight_v
        for _ in range(iterations):
            v = F.normalize(matrix.t() @ u, dim=0)
            u = F.normalize(matrix @ v, dim=0)
        self.weight_u.copy_(u)
        self.weight_v.copy_(v)

    def weight(self) -> torch.Tensor:
        matrix = self.weight_orig.flatten(1)
        sigma = torch.dot(self.weight_u, matrix @ self.weight_v)
        return self.weight_orig / sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight(), self.bias, padding=self.padding)


class SPADE(nn.Module):
    """Spatially adaptive (de)normalisation: instance norm modulated by maps predicted from ``segmap``."""

    def __init__(self, norm_channels: int, label_channels: int, hidden: int = 128):
        super().__init__()
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_channels, hidden, kernel_size=3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, norm_channels, kernel_size=3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, norm_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        normalized = F.instance_norm(x, eps=1e-5)
        segmap = F.interpolate(segmap, size=x.shape[2:], mode="nearest")
        actv = self.mlp_shared(segmap)
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SPADEResnetBlock(nn.Module):
    """SPADE residual block with spectrally normalised convs (``norm_G='spadespectralinstance'``)."""

    def __init__(self, fin: int, fout: int, label_channels: int, hidden: int = 128):
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = SpectralConv2d(fin, fmiddle, kernel_size=3, padding=1)
        self.conv_1 = SpectralConv2d(fmiddle, fout, kernel_size=3, padding=1)
        self.norm_0 = SPADE(fin, label_channels, hidden)
        self.norm_1 = SPADE(fmiddle, label_channels, hidden)
        if self.learned_shortcut:
            self.conv_s = SpectralConv2d(fin, fout, kernel_size=1, bias=False)
            self.norm_s = SPADE(fin, label_channels, hidden)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, segmap)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, segmap), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, segmap), 0.2))
        return shortcut + dx
