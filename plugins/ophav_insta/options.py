"""Options of the INSTA avatar field. Light module: pydantic only (imported to validate a config before any work)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


def device_defaults(cuda: bool) -> dict:
    """What the options left ``None`` become on a GPU or a CPU."""
    # The CPU values keep a 128x128 preview trainable in a few minutes on a 2-core laptop (about 7 it/s there);
    # the GPU values are the full INSTA-scale model.
    # On the CPU an occupancy update (the density of every grid cell) costs as much as ~6 training steps: every 64
    # steps instead of 16 trains the preview 35% faster with the same held-out PSNR (24.28 vs 24.27 dB after 900
    # steps on the astronaut's coarse video, benchmarks/RESULTS.md).
    return {"batch_rays": 4096 if cuda else 512, "samples_per_ray": 128 if cuda else 32,
            "log2_table": 19 if cuda else 15, "levels": 16 if cuda else 12, "candidates": 16 if cuda else 8,
            "occupancy_update_every": 16 if cuda else 64}


class InstaOptions(BaseModel):
    """INSTA-style deformable hash-grid radiance field. Options left ``None`` follow the run profile or the device."""

    model_config = ConfigDict(extra="forbid")

    # ---- schedule
    iterations: int | None = Field(None, ge=0, description="training iterations; None = profile.fit_iterations "
                                   "(refit_iterations when continuing from a checkpoint)")
    batch_rays: int | None = Field(None, ge=16, description="rays per training batch; None = 4096 on CUDA, "
                                   "512 on the CPU")
    frames_per_batch: int = Field(8, ge=1, description="frames the rays of one batch come from (per-frame mesh data "
                                  "is gathered once per frame and batch)")
    # ---- hash encoding (architecture; stored in the checkpoint)
    log2_table: int | None = Field(None, ge=8, le=24, description="log2 of the hash table entries per level; "
                                   "None = 19 on CUDA, 15 on the CPU")

    def resolved(self, cuda: bool) -> "InstaOptions":
        """A copy with the device-dependent options (left ``None``) filled in."""
        defaults = device_defaults(cuda)
        return self.model_copy(update={k: v for k, v in defaults.items() if getattr(self, k) is None})
    levels: int | None = Field(None, ge=1, le=32, description="hash grid levels; None = 16 on CUDA, 12 on the CPU")
    features_per_level: Literal[1, 2, 4, 8] = Field(2, description="features per level")
    base_resolution: int = Field(16, ge=2, description="coarsest grid resolution")
    finest_resolution: int = Field(2048, ge=4, description="finest grid resolution over the head cube")
    hidden_dim: int = Field(64, ge=8, description="width of the density and colour MLPs")
    geo_features: int = Field(15, ge=1, description="features passed from the density MLP to the colour MLP")
    color_layers: int = Field(2, ge=1, le=4, description="hidden layers of the colour MLP")
    expression_falloff: bool = Field(True, description="attenuate the expression input of the colour MLP with the "
                                     "distance from the mesh (hair and background ignore the expression)")
    # ---- optimisation
    lr_grid: float = Field(1e-2, gt=0, description="Adam learning rate of the hash tables")
    lr_mlp: float = Field(2e-3, gt=0, description="Adam learning rate of the MLPs")
    lr_final_ratio: float = Field(0.1, gt=0, le=1, description="learning rates decay exponentially to this fraction")
    ema_decay: float = Field(0.995, ge=0, lt=1, description="EMA of the weights (renders use the EMA weights)")
    huber_delta: float = Field(0.1, gt=0, description="Huber photometric loss threshold (colours in [0, 1])")
    lambda_alpha: float = Field(0.3, ge=0, description="weight of the alpha loss against the segmentation masks")
    lambda_distortion: float = Field(1e-3, ge=0, description="weight of the mip-NeRF 360 distortion loss")
    lambda_depth: float = Field(1.0, ge=0, description="weight of the mesh-depth loss: where the tracked face mesh "
                                "is seen, the ray's compositing weight farther than depth_tolerance from the "
                                "mesh's depth is penalised (the face becomes a surface, consistent between views)")
    depth_tolerance: float = Field(0.02, ge=0, description="distance from the mesh's depth, as a fraction of the "
                                   "head cube's side, within which the mesh-depth loss does not act (plus one "
                                   "sample spacing)")
    lambda_entropy: float = Field(1e-4, ge=0, description="weight of the binary entropy of the ray opacity")
    background: Literal["white", "black"] = Field("white", description="fixed colour the head is composited over "
                                                  "(training targets and renders)")
    # ---- geometry
    box_margin: float = Field(0.25, ge=0, description="ray box = mesh bounding box grown by this fraction of the "
                              "mesh size on every side (hair, ears)")
    box_extra_up: float | None = Field(None, ge=0, description="additional growth upwards; None = 0.35 for a "
                                       "face-only mesh (mediapipe), 0.15 for a full head")
    box_extra_back: float | None = Field(None, ge=0, description="additional growth backwards; None = 0.4 for a "
                                         "face-only mesh, 0.1 for a full head")
    deform_near: float = Field(0.02, ge=0, description="within this distance of the mesh (fraction of its size) a "
                               "point follows its nearest triangle")
    deform_far: float = Field(0.1, gt=0, description="beyond this distance a point moves rigidly with the head")
    candidate_grid: int = Field(32, ge=4, le=128, description="voxels per axis of the nearest-triangle candidate grid")
    candidates: int | None = Field(None, ge=1, le=64, description="candidate triangles kept per voxel; None = 16 on "
                                      "CUDA, 8 on the CPU")
    # ---- sampling
    samples_per_ray: int | None = Field(None, ge=8, description="candidate samples per ray inside the box "
                                        "(before empty-space skipping); None = 128 on CUDA, 32 on the CPU")
    occupancy_resolution: int = Field(64, ge=4, le=256, description="voxels per axis of the occupancy grid")
    occupancy_update_every: int | None = Field(None, ge=1, description="iterations between occupancy grid updates; "
                                               "None = 16 on CUDA, 64 on the CPU")
    occupancy_warmup: int = Field(256, ge=0, description="iterations before empty space is skipped")
    occupancy_threshold: float = Field(0.01, gt=0, lt=1, description="a voxel is empty below this opacity per sample")
    occupancy_decay: float = Field(0.95, ge=0, le=1, description="decay of the occupancy densities per update")
    carve_min_share: float = Field(0.05, ge=0, le=1, description="space carving: an occupancy voxel away from the "
                                   "face mesh stays empty (no density, skipped by renders) when it projects onto "
                                   "clear background in at least this share of the training frames; 0: off")
    # ---- rendering
    render_block: int = Field(8, ge=1, description="occupied samples per ray evaluated in the first round of a "
                              "render (the window doubles each round; rays that became opaque stop between rounds)")
    render_min_transmittance: float = Field(1e-3, ge=0, lt=1, description="a ray stops once its transmittance "
                                            "falls below this")
    render_canonical_skip: bool = Field(True, description="renders also skip samples whose canonical point (after "
                                        "the deformation) lies in an empty voxel: no hash grid or MLP there")
    render_colour_min_weight: float = Field(1e-4, ge=0, lt=1, description="renders run the colour MLP only for "
                                            "samples whose compositing weight exceeds this (0: for every sample)")
    render_chunk_rays: int = Field(1 << 18, ge=256, description="rays rendered at once")
    # ---- execution
    backend: Literal["auto", "torch", "triton", "tcnn"] = Field("auto", description="hash encoding backend; auto = "
                                                                "tcnn if importable, else triton on CUDA, else torch")
    deform_backend: Literal["auto", "torch", "triton"] = Field("auto", description="nearest-triangle deformation: "
                                                              "auto = the fused triton kernel on CUDA when "
                                                              "triton is importable, else torch (the reference)")
    amp: bool = Field(True, description="bf16 autocast for the MLPs on CUDA")
    compile: bool = Field(False, description="torch.compile the MLPs and the compositing + loss (and the torch "
                          "deformation); CUDA only, ignored on the CPU")
    progress_every: int = Field(25, ge=1, description="iterations between progress updates (each syncs the GPU)")
