"""The public weights files the matting segmenters use, as weight-store entries.

Light module (no torch at import): ``plugin.py`` registers these objects, the components pass the same objects
to :func:`ophav_core.weights.require`. The ``verify`` functions live in :mod:`ophav_matting.rvm` and
:mod:`ophav_matting.bisenet` and import torch only when called.
"""
from __future__ import annotations

from ophav_core.weights import WeightFile

_RVM_RELEASE = "https://github.com/PeterL1n/RobustVideoMatting/releases/download/v1.0.0"
_TORCHSCRIPT_NOTE = (
    "TorchScript file (the official release format): loading it runs the TorchScript program stored in the file, "
    "so only use the official release, from the weight store or a path you chose yourself. ")

RVM_MOBILENETV3 = WeightFile(
    name="rvm-mobilenetv3",
    filename="rvm_mobilenetv3_fp32.torchscript",
    url=f"{_RVM_RELEASE}/rvm_mobilenetv3_fp32.torchscript",
    license="GPL-3.0 (Robust Video Matting)",
    needed_by="segmenter rvm (variant mobilenetv3), segmenter bisenet (matte=rvm)",
    description="Robust Video Matting, MobileNetV3 backbone, fp32. " + _TORCHSCRIPT_NOTE,
    verify="ophav_matting.rvm:verify_torchscript",
)

RVM_RESNET50 = WeightFile(
    name="rvm-resnet50",
    filename="rvm_resnet50_fp32.torchscript",
    url=f"{_RVM_RELEASE}/rvm_resnet50_fp32.torchscript",
    license="GPL-3.0 (Robust Video Matting)",
    needed_by="segmenter rvm (variant resnet50), segmenter bisenet (matte=rvm, rvm_variant=resnet50)",
    description="Robust Video Matting, ResNet-50 backbone, fp32 (slower, slightly better). " + _TORCHSCRIPT_NOTE,
    verify="ophav_matting.rvm:verify_torchscript",
)

_CELEBAMASK_NOTE = ("MIT (code); the network was trained on CelebAMask-HQ, whose terms allow non-commercial "
                    "research use only")

BISENET_FACEXLIB = WeightFile(
    name="bisenet-facexlib",
    filename="parsing_bisenet.pth",
    url="https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth",
    license=_CELEBAMASK_NOTE,
    restricted=True,
    needed_by="segmenter bisenet (checkpoint=facexlib)",
    description="BiSeNet face parser (19 CelebAMask-HQ classes), facexlib's release: a raw state dict.",
    verify="ophav_matting.bisenet:verify_state_dict",
)

BISENET_79999 = WeightFile(
    name="bisenet-79999",
    filename="79999_iter.pth",
    url="https://drive.google.com/open?id=154JgKpzCPW82qINcVieuPH3fZ2e0P812",
    license=_CELEBAMASK_NOTE,
    restricted=True,
    needed_by="segmenter bisenet (checkpoint=79999)",
    description="BiSeNet face parser from zllrunning/face-parsing.PyTorch (the original release, Google Drive).",
    verify="ophav_matting.bisenet:verify_state_dict",
)

RVM_WEIGHTS: dict[str, WeightFile] = {"mobilenetv3": RVM_MOBILENETV3, "resnet50": RVM_RESNET50}
BISENET_WEIGHTS: dict[str, WeightFile] = {"facexlib": BISENET_FACEXLIB, "79999": BISENET_79999}
ALL_WEIGHTS: tuple[WeightFile, ...] = (RVM_MOBILENETV3, RVM_RESNET50, BISENET_FACEXLIB, BISENET_79999)
