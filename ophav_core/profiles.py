"""Run profiles: one knob that sizes every stage for the machine at hand.

Components read the profile from their :class:`~ophav_core.stages.base.RunContext` for every option the user
left unset, so ``--profile preview`` makes the whole pipeline small without touching any component's options.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    resolution: int = Field(gt=15, description="square frame and training resolution in pixels")
    fps: float = Field(gt=0)
    video_seconds: float = Field(gt=0, description="length of the coarse video")
    fit_iterations: int = Field(ge=0, description="iterations of the first training")
    refit_iterations: int = Field(ge=0, description="iterations of each retraining on restored renders")
    rounds: int = Field(ge=0, description="rounds of the iterative dataset update")
    restore_views: int = Field(gt=0, description="renders restored per round")
    preview_frames: int = Field(gt=0, description="frames of preview.mp4")
    widen_yaw: float = Field(12.0, ge=0, description="degrees of yaw each restore round adds on both sides of the "
                             "range the coarse video covers")
    widen_pitch: float = Field(5.0, ge=0, description="degrees of pitch each restore round adds on both sides")


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(name="tiny", description="seconds on a CPU; for tests only", resolution=32, fps=5, video_seconds=2,
                fit_iterations=20, refit_iterations=10, rounds=1, restore_views=4, preview_frames=6),
        Profile(name="preview", description="a laptop CPU, under 10 minutes: 128x128, a short coarse video",
                resolution=128, fps=10, video_seconds=12, fit_iterations=1800, refit_iterations=600, rounds=2,
                restore_views=16, preview_frames=48),
        Profile(name="standard", description="one GPU, under 15 minutes: 512x512, about a minute of coarse video",
                resolution=512, fps=25, video_seconds=60, fit_iterations=20000, refit_iterations=8000, rounds=2,
                restore_views=200, preview_frames=150),
        Profile(name="paper", description="the paper's settings: 512x512, 2.5 minutes at 25 fps, 30k iterations",
                resolution=512, fps=25, video_seconds=150, fit_iterations=30000, refit_iterations=30000, rounds=2,
                restore_views=500, preview_frames=150),
    )
}


def get_profile(name: str) -> Profile:
    from ophav_core.errors import UsageError

    try:
        return PROFILES[name]
    except KeyError:
        raise UsageError(f"unknown profile {name!r}; choose one of: {', '.join(PROFILES)}") from None
