"""Options of the meshwarp image2video (light module: no numpy-heavy or OpenCV import)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class MeshwarpOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    resolution: int | None = Field(None, ge=16, le=4096, description=(
        "side of the square output frames in pixels; None: the run profile's resolution"))
    crop_scale: float = Field(2.2, ge=1.0, le=5.0, description=(
        "side of the square crop around the face as a multiple of the face's size (room for hair and shoulders)"))
    crop_shift: float = Field(0.08, ge=-0.5, le=0.5, description=(
        "how far the crop is moved up from the face's centre, as a fraction of the crop side"))
    min_crop_scale: float = Field(1.6, ge=1.0, le=5.0, description=(
        "the crop shrinks down to this multiple of the face's size, and moves, to stay inside the portrait "
        "before it pads it (replicated edges show as streaks)"))
    head_matte: bool = Field(True, description=(
        "segment the head (MediaPipe selfie segmentation) so that only the head moves and the background and "
        "body away from it stay still"))
    symmetry_fill: bool = Field(True, description=(
        "fill face parts the portrait shows too small for the frame (turned away, hidden by the nose): the inner "
        "face from its mirror side (brightness matched), the cheeks with a smooth continuation of the skin"))
    mouth_fill: bool = Field(True, description=(
        "paint a mouth interior (cavity, teeth) where the mouth opens wider than in the portrait"))
    eye_fill: bool = Field(True, description="cover closing eyes with the eyelid's skin colour and a lash line")
    expression_scale: float = Field(1.0, ge=0.0, le=3.0, description=(
        "multiplies every expression offset (named expressions and a driving video's offsets)"))
    neck_follow: float = Field(0.35, ge=0.0, le=1.0, description=(
        "how much the neck below the chin follows the head's motion (1 = fully, 0 = not at all)"))
    pivot_depth: float = Field(0.65, ge=0.0, le=2.0, description=(
        "the head turns about a point this many face widths behind the nose tip"))
    field_grid: int = Field(40, ge=8, le=256, description=(
        "lattice size of the thin-plate warp outside the face (finer is slower and no smoother)"))
    workers: int | None = Field(None, ge=1, le=64, json_schema_extra={"affects_result": False}, description=(
        "threads that draw frames at once; None: 1 (OpenCV spreads each frame over the cores; more threads helped "
        "only on a 2-core machine at 512x512, 1.27x with 3)"))
