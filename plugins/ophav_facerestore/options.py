"""Options of the face restorers. Light module: imported to validate a config before any work starts (no torch)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class FaceRestoreOptions(BaseModel):
    """What every face restorer here accepts."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(
        None, description="explicit path of the weights file; None = the weight store's copy")
    batch_size: int | None = Field(
        None, ge=1, description="faces per network call; None = 8 on CUDA, 1 on CPU")
    paste_back: bool = Field(
        True, description="blend the restored face into the render with a soft (eroded + blurred) mask; "
                          "False pastes the whole restored crop back with a hard edge")
    use_alpha: bool = Field(
        True, description="limit the pasted region to the render's head alpha, so the background stays as rendered")
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="autocast precision of the network on CUDA (CPU always runs fp32)")


class GFPGANOptions(FaceRestoreOptions):
    model: Literal["1.3", "1.4"] = Field("1.4", description="GFPGAN release: 1.3 (more natural) or 1.4 (more detail)")


class CodeFormerOptions(FaceRestoreOptions):
    w: float = Field(0.7, ge=0.0, le=1.0,
                     description="fidelity weight: 0 = most restoration (codebook only), 1 = closest to the input")


class GPENOptions(FaceRestoreOptions):
    pass
