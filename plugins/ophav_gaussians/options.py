"""Options of the Gaussian avatar field. Light module: pydantic only (imported to validate a config before any work).

Options left ``None`` follow the run profile (:data:`PROFILE_DEFAULTS`): the Gaussian budget, how many Gaussians
start on each triangle and in the shell, the SH degree and the densification schedule grow from ``tiny`` (tests,
seconds on a CPU) to ``standard`` (one GPU, 512x512)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Per profile: what the options left None become. ``paper`` uses ``standard``'s with a larger budget.
PROFILE_DEFAULTS: dict[str, dict] = {
    "tiny": {"max_gaussians": 1500, "per_face": 1, "shell_gaussians": 300, "carve_resolution": 20, "sh_degree": 1,
             "sh_every": 10, "densify_from": 10, "densify_every": 5, "frames_per_batch": 1},
    "preview": {"max_gaussians": 24000, "per_face": 2, "shell_gaussians": 5000, "carve_resolution": 40,
                "sh_degree": 1, "sh_every": 400, "densify_from": 150, "densify_every": 100, "frames_per_batch": 1},
    "standard": {"max_gaussians": 120000, "per_face": 4, "shell_gaussians": 20000, "carve_resolution": 64,
                 "sh_degree": 2, "sh_every": 1000, "densify_from": 300, "densify_every": 200,
                 "frames_per_batch": 1},
    "paper": {"max_gaussians": 200000, "per_face": 4, "shell_gaussians": 30000, "carve_resolution": 64,
              "sh_degree": 2, "sh_every": 1000, "densify_from": 500, "densify_every": 300, "frames_per_batch": 1},
}


class GaussianOptions(BaseModel):
    """3D Gaussians anchored to the tracked mesh (and a head-rigid shell). Options left ``None`` follow the run
    profile."""

    model_config = ConfigDict(extra="forbid")

    # ---- schedule
    iterations: int | None = Field(None, ge=0, description="training iterations; None = profile.fit_iterations "
                                   "(refit_iterations when continuing from a checkpoint)")
    frames_per_batch: int | None = Field(None, ge=1, description="frames rendered per iteration (losses summed); "
                                         "None = the profile's")
    # ---- the Gaussians (architecture: a continued training keeps the checkpoint's)
    max_gaussians: int | None = Field(None, ge=16, description="Gaussian budget: densification stops here; "
                                      "None = the profile's (1.5k tiny, 24k preview, 120k standard)")
    per_face: int | None = Field(None, ge=1, le=16, description="Gaussians each mesh triangle starts with")
    shell_gaussians: int | None = Field(None, ge=0, description="Gaussians of the head-rigid shell (hair, ears, "
                                        "scalp, neck) at the start, seeded on the masks' visual hull")
    carve_resolution: int | None = Field(None, ge=8, le=160, description="voxels per axis of the visual hull "
                                         "that seeds the shell")
    carve_tolerance: float = Field(0.1, ge=0, lt=1, description="fraction of the views that may see a hull voxel "
                                   "outside the mask (segmentation noise)")
    mouth_pocket: bool = Field(True, description="replace the mesh's mouth-opening triangles with a pocket behind "
                               "the lips (a fan from the inner-lip contour to a point behind it), so an opened "
                               "mouth shows an inside instead of stretched Gaussians (ophav_gaussians.mouth)")
    mouth_depth: float = Field(0.5, gt=0, le=2, description="depth of the mouth pocket behind the lips, in mouth "
                               "widths")
    sh_degree: int | None = Field(None, ge=0, le=3, description="highest spherical-harmonics degree of the colour "
                                  "(reached progressively)")
    sh_every: int | None = Field(None, ge=1, description="iterations between SH degree increases")
    # ---- optimisation (positions and scales are in units of the parent triangle's size)
    lr_position: float = Field(5e-3, gt=0, description="Adam learning rate of the local offsets")
    lr_position_final_ratio: float = Field(0.02, gt=0, le=1, description="the offset learning rate decays "
                                           "exponentially to this fraction")
    lr_color: float = Field(5e-3, gt=0, description="learning rate of the SH DC term (higher terms: 1/20 of it)")
    lr_opacity: float = Field(0.05, gt=0, description="learning rate of the opacity logits")
    lr_scale: float = Field(0.017, gt=0, description="learning rate of the log scales")
    lr_rotation: float = Field(1e-3, gt=0, description="learning rate of the local rotations")
    ema_decay: float = Field(0.99, ge=0, lt=1, description="EMA of the parameters (renders use the EMA); 0 = off")
    lambda_dssim: float = Field(0.2, ge=0, le=1, description="weight of D-SSIM against L1 in the photometric loss")
    lambda_alpha: float = Field(0.3, ge=0, description="weight of the L1 between rendered alpha and the "
                                "segmentation mask (nothing floats outside the head)")
    lambda_scale: float = Field(1.0, ge=0, description="weight of the penalty on local scales above "
                                "scale_threshold (GaussianAvatars)")
    scale_threshold: float = Field(0.6, gt=0, description="largest unpenalised scale, in triangle sizes")
    shell_scale_threshold: float = Field(3.0, gt=0, description="the same for shell Gaussians, in mean triangle "
                                         "sizes")
    lambda_position: float = Field(1e-2, ge=0, description="weight of the penalty on offsets farther than "
                                   "position_threshold from the parent triangle")
    position_threshold: float = Field(1.0, gt=0, description="largest unpenalised offset, in triangle sizes")
    lambda_opacity: float = Field(2e-3, ge=0, description="weight of the mean opacity (sparsity: fewer, more "
                                  "decided Gaussians, less fog)")
    background: Literal["white", "black"] = Field("white", description="colour the head is composited over "
                                                  "(training targets and renders)")
    # ---- densification and pruning
    densify_from: int | None = Field(None, ge=0, description="first iteration of densification")
    densify_every: int | None = Field(None, ge=1, description="iterations between densify/prune passes")
    densify_until: float = Field(0.7, ge=0, le=1, description="no densification after this fraction of training")
    grad_threshold: float = Field(2e-4, gt=0, description="mean screen-space (NDC) gradient of a Gaussian's "
                                  "centre above which it is cloned (small) or split (large)")
    percent_dense: float = Field(0.01, gt=0, description="a Gaussian larger than this fraction of the head size "
                                 "is split, a smaller one cloned")
    min_opacity: float = Field(0.005, gt=0, lt=1, description="Gaussians below this opacity are pruned")
    max_size: float = Field(0.15, gt=0, description="Gaussians larger than this fraction of the head size are "
                            "pruned")
    # ---- execution
    backend: Literal["auto", "torch", "triton", "sparse", "gsplat"] = Field(
        "auto", description="rasteriser: auto = triton on CUDA, sparse (per Gaussian-pixel pair: compiled loops "
        "when Numba is installed, else PyTorch) on the CPU; torch = the tile reference; gsplat when importable")
    cuda_graphs: bool = Field(False, description="on CUDA with the triton rasteriser and one frame a step: replay "
                              "the training step's parts before and after the rasteriser as CUDA graphs, captured "
                              "again after each densification (the same arithmetic; about twice the iterations/s "
                              "on an H200). Off until its GPU agreement test has passed on the current code "
                              "(benchmarks/RESULTS.md)")
    render_batch: int = Field(16, ge=1, description="views of one expression rasterised in one call")
    progress_every: int = Field(10, ge=1, description="iterations between progress updates (each syncs the GPU)")

    def resolved(self, profile: str) -> "GaussianOptions":
        """A copy with the profile-dependent options (left ``None``) filled in."""
        defaults = PROFILE_DEFAULTS.get(profile, PROFILE_DEFAULTS["standard"])
        return self.model_copy(update={k: v for k, v in defaults.items() if getattr(self, k) is None})
