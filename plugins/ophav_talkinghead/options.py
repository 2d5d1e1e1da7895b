"""Options of the talking-head components (pydantic only: imported to validate a config before any work)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(None, description="path of the checkpoint file; unset = the weight store's copy")
    size: int | None = Field(None, ge=16, le=4096,
                             description="output frame size in pixels (square); unset = the run profile's resolution")
    batch_size: int = Field(4, ge=1, le=256, description="frames generated per network call")
    crop: Literal["center", "full"] = Field(
        "center", description="how the portrait becomes the square 256x256 network input when no face_box is "
                              "given: 'center' = the largest centred square, 'full' = the whole image padded square")
    face_box: tuple[float, float, float, float] | None = Field(
        None, description="face box (x0, y0, x1, y1) in portrait pixels; the input is a square around it")
    face_margin: float = Field(0.4, ge=0.0, le=3.0,
                               description="space added on each side of face_box, as a fraction of its larger side")
    model_params: dict[str, Any] | None = Field(
        None, description="overrides of the public config's model_params (same nested names as the YAML), for "
                          "checkpoints trained with another config")


class FaceVid2VidOptions(_Common):
    """face-vid2vid (the zhanglonghao1992 reimplementation), driven by yaw/pitch/roll and named expressions."""

    decoder: Literal["auto", "spade", "original"] = Field(
        "auto", description="generator variant; 'auto' picks it from the checkpoint's keys")
    pose_signs: tuple[float, float, float] = Field(
        (-1.0, 1.0, 1.0),
        description="factors from the motion's yaw/pitch/roll to the model's (Hopenet) angles: Hopenet's yaw > 0 "
                    "turns the face to image left, ophav's to image right; pitch and roll agree")
    expression_scale: float = Field(
        1.0, ge=0.0, le=5.0,
        description="strength of the named expressions (approximate: the model's keypoints are unsupervised); "
                    "0 keeps the portrait's own expression")


class FOMMOptions(_Common):
    """First Order Motion Model, driven by a driving video (motion.video)."""

    driver_crop: Literal["center", "full"] = Field(
        "center", description="how driving-video frames become square network inputs")
    relative: bool = Field(True, description="relative motion transfer (FOMM's --relative): move the portrait's "
                                             "keypoints as the driver moved since its first frame")
    adapt_movement_scale: bool = Field(
        False, description="scale the driver's movement by the ratio of keypoint convex-hull sizes (--adapt_scale)")
