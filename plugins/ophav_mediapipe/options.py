"""Options of the MediaPipe tracker and segmenter (light module: no mediapipe, cv2 or scipy import)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class MediapipeTrackerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    focal_scale: float = Field(1.5, gt=0.1, le=20.0, description=(
        "assumed focal length in units of the larger image side: fx = fy = focal_scale * max(W, H), principal "
        "point at the image centre. 1.5 is about a 50 mm lens on a full-frame camera (a 37 degree field of view "
        "over the larger side), typical for portraits and talking-head videos"))
    focal_length: float | None = Field(None, gt=0, description="focal length in pixels; overrides focal_scale")
    num_expressions: int = Field(32, ge=4, le=256, description=(
        "expression coefficients per frame (E); the first four are the named expressions smile, mouth_open, "
        "blink, brows_up at intensity 1"))
    smooth: float = Field(1.0, ge=0.0, le=10.0, description=(
        "temporal smoothing strength for videos (0 = off): a zero-phase One-Euro filter over rotation, translation "
        "and expression, stronger on slow motion, so a still head does not jitter and fast turns do not lag"))
    max_gap: int = Field(12, ge=0, description=(
        "longest run of frames without a face that is interpolated from its neighbours; longer gaps hold the "
        "nearest tracked pose and are still reported as invalid"))
    min_detection_confidence: float = Field(0.5, ge=0.0, le=1.0, description="MediaPipe face detection threshold")
    min_detection_size: int = Field(256, ge=64, le=2048, description=(
        "frames whose larger side is smaller are upscaled to this size before detection (MediaPipe misses small "
        "faces)"))
    reference_expression: Literal["relative", "absolute"] = Field("relative", description=(
        "with reference=: 'relative' measures expressions from this video's own neutral face (rescaled to the "
        "reference's face width), so another person's face shape does not leak into the reference's mesh (for "
        "driving videos); 'absolute' measures them from the reference's neutral mesh (the same person again)"))


class MediapipeSegmenterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_selection: int = Field(0, ge=0, le=1, description=(
        "MediaPipe selfie segmentation model: 0 = general (256x256 input, for square portraits), 1 = landscape"))
    temporal: float = Field(0.6, ge=0.0, lt=1.0, description=(
        "temporal stability for videos: weight of the previous frame's matte in an exponential moving average run "
        "forwards and backwards (0 = off)"))
    hair_margin: float = Field(0.8, ge=0.0, le=2.0, description=(
        "how far above the forehead the head region reaches, in face heights (for hair)"))
    side_margin: float = Field(0.6, ge=0.0, le=2.0, description=(
        "how far beside the face the head region reaches, in face widths (for ears and hair)"))
    neck_margin: float = Field(0.12, ge=0.0, le=1.0, description=(
        "soft band below the jaw line, in face heights, over which alpha falls from 1 to 0 (the neck is cut)"))
    side_drop: float = Field(0.05, ge=0.0, le=1.0, description=(
        "how far below the ends of the jaw line the head region reaches beside the jaw (ear lobes), in face "
        "heights, on the sides where the jaw angle is the face's outer corner; more lets collars and the neck "
        "behind the jaw in, which the avatar learns as dark streaks behind and under the jaw"))
    feather: float = Field(0.03, ge=0.0, le=0.5, description="softness of the head region's other edges, in face widths")
