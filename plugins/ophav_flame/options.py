"""Options of the FLAME tracker (light module: no torch import)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class FlameTrackerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Literal["auto", "flame-2020", "flame-2023", "flame-2023-open"] = Field("auto", description=(
        "which FLAME file of the weight store: 'auto' takes the first present of flame-2020, flame-2023, "
        "flame-2023-open"))
    model_path: str | None = Field(None, description="a FLAME .pkl (or .npz with the same keys) outside the store")
    embedding: str | None = Field(None, description=(
        "a MICA-style mediapipe_landmark_embedding.npz (lmk_face_idx, lmk_b_coords, landmark_indices) to use "
        "instead of the embedding derived from the model"))
    num_shape: int = Field(100, ge=0, le=300, description="identity components fitted (shared over the video)")
    num_expressions: int = Field(50, ge=1, le=100, description=(
        "FLAME expression components fitted per frame; the tracking's expression vector is these plus the "
        "components of the jaw, neck and eye motion (see the tracker's docstring)"))
    pose_components: int = Field(12, ge=0, le=64, description=(
        "extra expression-basis components that carry the jaw/neck rotation (linearised per video by PCA of the "
        "exact FLAME meshes), so R (canonical + basis . expression) + t reproduces the FLAME mesh"))
    iterations: int | None = Field(None, ge=1, le=100, description=(
        "Levenberg-Marquardt iterations of the batched fit (default: 4 tiny, 6 preview, 8 standard and paper)"))
    shape_prior: float = Field(0.003, ge=0, description="weight of |shape|^2 (FLAME units: standard deviations)")
    expression_prior: float = Field(0.001, ge=0, description="weight of |expression|^2 per frame")
    pose_prior: float = Field(1.0, ge=0, description="weight of |jaw|^2 per frame (radians^2; the neck's is 10x)")
    smooth: float = Field(0.3, ge=0.0, le=100.0, description=(
        "temporal smoothness for videos: weight of the first differences of every per-frame parameter (0 = off)"))
    focal_scale: float = Field(1.5, gt=0.1, le=20.0, description=(
        "assumed focal length in units of the larger image side (as the mediapipe tracker)"))
    focal_length: float | None = Field(None, gt=0, description="focal length in pixels; overrides focal_scale")
    device: str = Field("auto", description="torch device for the fit: auto (the run's device), cpu, cuda")
    threads: int = Field(0, ge=0, le=256, description=(
        "torch CPU threads of the fit (0 = one: its matrices are small, and more threads on a busy machine cost "
        "more than they bring)"))
