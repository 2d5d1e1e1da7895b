"""Options of the matting segmenters. Light module: validated before any work starts, imports no torch."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class HeadCutOptions(BaseModel):
    """How the matte is cut below the jaw when the run has a tracking (see :mod:`ophav_matting.headcut`)."""

    model_config = ConfigDict(extra="forbid")

    head_cut: bool = Field(True, description="with a tracking, remove everything below the jaw line (neck, body)")
    neck_margin: float = Field(0.08, ge=0.0, le=1.0,
                               description="how far below the jaw the cut lies, as a fraction of the face height")
    feather: float = Field(0.04, ge=0.0, le=1.0,
                           description="width of the soft edge of the cut, as a fraction of the face height")


class RVMOptions(HeadCutOptions):
    """Robust Video Matting (the official TorchScript release)."""

    variant: Literal["mobilenetv3", "resnet50"] = Field(
        "mobilenetv3", description="backbone: weights rvm-mobilenetv3 or rvm-resnet50")
    weights: str | None = Field(
        None, description="path of the .torchscript file; default: the weight store (never a URL: the file's "
                          "TorchScript program runs when it is loaded)")
    downsample_ratio: float | None = Field(
        None, gt=0.0, le=1.0, description="RVM's internal scale; None: chosen from the frame size so the long side "
                                          "is at most max_internal_size")
    max_internal_size: int = Field(512, ge=16, le=4096,
                                   description="long side in pixels of the internal resolution when downsample_ratio is None")
    seq_chunk: int = Field(4, ge=1, le=64, description="frames per forward pass (the recurrent state is carried "
                                                        "inside and across chunks)")
    warmup_frames: int = Field(0, ge=0, description="run this many first frames once before the real pass, so the "
                                                     "first frames already benefit from a primed recurrent state")


class BiSeNetOptions(HeadCutOptions):
    """BiSeNet face parsing (CelebAMask-HQ classes); removes background, neck, cloth, necklace and hat."""

    checkpoint: Literal["facexlib", "79999"] = Field(
        "facexlib", description="which public file: facexlib's parsing_bisenet.pth or the original 79999_iter.pth")
    weights: str | None = Field(None, description="path of the checkpoint; default: the weight store")
    parse_size: int = Field(512, ge=32, le=2048, multiple_of=32,
                            description="the parser's square input size (the checkpoints were trained at 512)")
    batch_size: int = Field(8, ge=1, description="frames per forward pass")
    keep_neck: bool = Field(False, description="keep the neck class")
    keep_hat: bool = Field(False, description="keep the hat class")
    matte: Literal["none", "rvm"] = Field(
        "none", description="'rvm': Robust Video Matting gives the fine person matte and the parser only removes "
                            "body classes (the paper's combination); 'none': the parser alone, background included")
    rvm_variant: Literal["mobilenetv3", "resnet50"] = Field("mobilenetv3", description="RVM backbone when matte=rvm")
    rvm_weights: str | None = Field(None, description="path of the RVM .torchscript file when matte=rvm")
