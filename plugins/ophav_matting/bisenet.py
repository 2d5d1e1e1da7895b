"""BiSeNet face parsing (CelebAMask-HQ, 19 classes) as a segmenter that keeps the head and drops the body.

The network follows the public checkpoints' layout (zllrunning/face-parsing.PyTorch, re-released by facexlib as
``parsing_bisenet.pth``): a ResNet-18 context path (``cp.resnet``), attention refinement (``cp.arm16``,
``cp.arm32``), feature fusion (``ffm``) and three output heads (``conv_out``, ``conv_out16``, ``conv_out32``);
the spatial path is replaced by the ResNet's 1/8 feature. Both files are raw state dicts with the same names;
a ``module.`` prefix (DataParallel) and missing BatchNorm ``num_batches_tracked`` counters are tolerated,
anything else must match exactly.

Input: RGB resized to 512x512, ImageNet mean/std. The segmenter turns the class probabilities (softmax,
bilinearly upsampled to the frame) into a soft alpha by summing the kept classes, so edges stay soft.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ophav_core.stages import FrameSet, MaskSet, Segmenter, Tracking
from ophav_core.weights import require
from ophav_matting.headcut import head_cut
from ophav_matting.options import BiSeNetOptions
from ophav_matting.weights import BISENET_WEIGHTS

NUM_CLASSES = 19
CLASS_NAMES = ("background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
               "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat")
BACKGROUND, NECK, NECKLACE, CLOTH, HAT = 0, 14, 15, 16, 18
HEAD_CLASSES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 17)  # face parts, glasses, ears, earring, hair
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------- network


class ConvBNReLU(nn.Module):
    def __init__(self, in_chan: int, out_chan: int, ks: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chan, out_chan, kernel_size=ks, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chan)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, in_chan: int, out_chan: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chan, out_chan, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chan)
        self.conv2 = nn.Conv2d(out_chan, out_chan, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chan)
        self.downsample = None
        if in_chan != out_chan or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(in_chan, out_chan, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_chan))

    def forward(self, x: Tensor) -> Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


class ResNet18(nn.Module):
    """ResNet-18 without the classifier; returns the 1/8, 1/16 and 1/32 features."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._layer(64, 64, stride=1)
        self.layer2 = self._layer(64, 128, stride=2)
        self.layer3 = self._layer(128, 256, stride=2)
        self.layer4 = self._layer(256, 512, stride=2)

    @staticmethod
    def _layer(in_chan: int, out_chan: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_chan, out_chan, stride), BasicBlock(out_chan, out_chan, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


class AttentionRefinementModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chan, out_chan)
        self.conv_atten = nn.Conv2d(out_chan, out_chan, kernel_size=1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_chan)

    def forward(self, x: Tensor) -> Tensor:
        feat = self.conv(x)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))
        return feat * atten


class ContextPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = ResNet18()
        self.arm16 = AttentionRefinementModule(256, 128)
        self.arm32 = AttentionRefinementModule(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, ks=1, padding=0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        global_context = self.conv_avg(F.adaptive_avg_pool2d(feat32, 1))
        feat32_sum = self.arm32(feat32) + F.interpolate(global_context, feat32.shape[2:], mode="nearest")
        feat32_up = self.conv_head32(F.interpolate(feat32_sum, feat16.shape[2:], mode="nearest"))
        feat16_sum = self.arm16(feat16) + feat32_up
        feat16_up = self.conv_head16(F.interpolate(feat16_sum, feat8.shape[2:], mode="nearest"))
        return feat8, feat16_up, feat32_up


class FeatureFusionModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.convblk = ConvBNReLU(in_chan, out_chan, ks=1, padding=0)
        self.conv1 = nn.Conv2d(out_chan, out_chan // 4, kernel_size=1, bias=False)
        self.conv2 = nn.Conv2d(out_chan // 4, out_chan, kernel_size=1, bias=False)

    def forward(self, spatial: Tensor, context: Tensor) -> Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(feat, 1)))))
        return feat + feat * atten


class BiSeNetOutput(nn.Module):
    def __init__(self, in_chan: int, mid_chan: int, num_class: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chan, mid_chan)
        self.conv_out = nn.Conv2d(mid_chan, num_class, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """The face parser; ``forward`` returns the main head's logits (B, num_class, H, W) at the input size.
    ``conv_out16``/``conv_out32`` are the training-time auxiliary heads, kept so the checkpoints load strictly."""

    def __init__(self, num_class: int = NUM_CLASSES):
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusionModule(256, 256)
        self.conv_out = BiSeNetOutput(256, 256, num_class)
        self.conv_out16 = BiSeNetOutput(128, 64, num_class)
        self.conv_out32 = BiSeNetOutput(128, 64, num_class)

    def forward(self, x: Tensor) -> Tensor:
        feat_res8, feat_cp8, _ = self.cp(x)
        logits = self.conv_out(self.ffm(feat_res8, feat_cp8))
        return F.interpolate(logits, x.shape[2:], mode="bilinear", align_corners=True)


# ---------------------------------------------------------------------------------------------- loading


def adapt_state_dict(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Map a public checkpoint's names onto :class:`BiSeNet`: strip a DataParallel ``module.`` prefix and add
    BatchNorm ``num_batches_tracked`` counters older checkpoints lack (they are not used in eval mode)."""
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"expected a state dict, got {type(state).__name__}")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    return state


def load_bisenet(path: str | Path, device: str = "cpu") -> BiSeNet:
    """BiSeNet with the weights in ``path`` (loaded strictly, tensors only), in eval mode on ``device``."""
    from ophav_core.weights import load_tensors

    state = load_tensors(path, what="the BiSeNet face-parsing weights (79999_iter.pth)")
    model = BiSeNet(NUM_CLASSES)
    model.load_state_dict(adapt_state_dict(state, model), strict=True)
    return model.eval().to(device)


def verify_state_dict(path: Path) -> None:
    """Weight-store check: the file loads strictly into the 19-class BiSeNet."""
    load_bisenet(path, "cpu")


# ---------------------------------------------------------------------------------------------- parsing


def kept_classes(keep_neck: bool = False, keep_hat: bool = False) -> tuple[int, ...]:
    """Class indices that make up the head: face parts, ears, hair; neck and hat on request. Background,
    necklace and cloth are never kept."""
    keep = list(HEAD_CLASSES)
    if keep_neck:
        keep.append(NECK)
    if keep_hat:
        keep.append(HAT)
    return tuple(sorted(keep))


def head_alpha(probs: np.ndarray | Tensor, keep: Iterable[int], background_is_matted: bool = False):
    """Soft head alpha (N, H, W) from class probabilities (N, C, H, W): the summed probability of the kept
    classes. With ``background_is_matted`` a separate matte handles the background, so the background class
    counts as kept and only the removed body classes (neck, necklace, cloth, hat...) lower the alpha."""
    keep = sorted(set(keep) | ({BACKGROUND} if background_is_matted else set()))
    if isinstance(probs, np.ndarray):
        return probs[:, keep].sum(axis=1).clip(0.0, 1.0).astype(np.float32)
    return probs[:, keep].sum(dim=1).clamp(0.0, 1.0)


def parse_probabilities(model: BiSeNet, frames: np.ndarray, parse_size: int = 512, device: str = "cpu") -> Tensor:
    """Class probabilities (N, 19, H, W) of uint8 RGB ``frames`` (N, H, W, 3) at the frames' size: parsed at
    ``parse_size`` squared (the checkpoints' training size), softmax, then bilinearly upsampled."""
    height, width = frames.shape[1:3]
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    if (height, width) != (parse_size, parse_size):
        # antialias like the reference's PIL bilinear resize when shrinking
        x = F.interpolate(x, (parse_size, parse_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    probs = torch.softmax(model((x - mean) / std).float(), dim=1)
    if (height, width) != (parse_size, parse_size):
        probs = F.interpolate(probs, (height, width), mode="bilinear", align_corners=False)
    return probs


class BiSeNetSegmenter(Segmenter):
    """Head alpha from face parsing: skin, brows, eyes, glasses, ears, earring, nose, mouth, lips and hair kept;
    background, neck, necklace, cloth and hat removed (neck and hat optional), as OPHAvatars does.

    ``matte="rvm"`` multiplies with a Robust Video Matting person matte (the paper's combination): RVM gives the
    background edge (fine hair), the parser removes the body classes. With a tracking the result is also cut
    below the jaw (``head_cut``).
    """

    Options = BiSeNetOptions

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self._model: BiSeNet | None = None
        self._rvm = None

    def model(self) -> BiSeNet:
        if self._model is None:
            path = require(BISENET_WEIGHTS[self.options.checkpoint], self.options.weights)
            self._model = load_bisenet(path, self.context.device)
        return self._model

    def rvm(self):
        if self._rvm is None:
            from ophav_matting.rvm import RVMSegmenter

            opts = RVMSegmenter.Options(variant=self.options.rvm_variant, weights=self.options.rvm_weights,
                                        head_cut=False)
            self._rvm = RVMSegmenter(opts, self.context)
        return self._rvm

    def segment(self, frames: FrameSet, tracking: Tracking | None = None) -> MaskSet:
        model = self.model()  # fail on missing weights before any matting work
        use_rvm = self.options.matte == "rvm"
        alpha = self.rvm().matte(frames) if use_rvm else np.ones(frames.frames.shape[:3], np.float32)
        keep = kept_classes(self.options.keep_neck, self.options.keep_hat)
        step = self.options.batch_size
        with torch.inference_mode(), self.context.progress(len(frames), "bisenet parsing") as bar:
            for start in range(0, len(frames), step):
                probs = parse_probabilities(model, frames.frames[start:start + step], self.options.parse_size,
                                            self.context.device)
                alpha[start:start + len(probs)] *= head_alpha(probs, keep, use_rvm).cpu().numpy()
                bar.advance(len(probs))
        if tracking is not None and self.options.head_cut:
            head_cut(alpha, tracking, self.options.neck_margin, self.options.feather, inplace=True)
        return MaskSet(alpha)
