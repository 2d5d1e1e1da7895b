"""The ``insta`` avatar field: fit / load / render, and the single-file checkpoint.

Checkpoint (``torch.save`` of plain containers, loadable with ``weights_only=True``)::

    {"format": "ophav-insta", "version": 1,
     "config": FieldConfig dict, "geometry": Geometry dict, "options": the options used,
     "field": EMA weights (state dict), "deformer": candidate grid, "occupancy": occupancy grid,
     "template": Tracking.to_arrays() of a few frames (numeric arrays as tensors, strings as str),
     "info": JSON-able summary}
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ophav_core.errors import InvalidData, UsageError
from ophav_core.stages.avatar_field import (AvatarCheckpoint, AvatarField, check_continuable,
                                            checkpoint_template, tracking_from_tensors, tracking_to_tensors)
from ophav_core.stages.data import FrameSet, MaskSet, RenderRequest, RenderResult, Tracking, atomic_write_bytes
from ophav_insta.options import InstaOptions

# A render frame's expression may go past the training's (the mesh follows it): its dilation may too.
RENDER_DILATION_CAP = 6

FORMAT, VERSION = "ophav-insta", 1


@dataclass
class _Loaded:
    """A checkpoint ready to render on one device."""

    field: Any
    deformer: Any
    geometry: Any
    occupancy: Any
    template: Tracking
    background: str
    samples_per_ray: int
    decode: Any = None  # torch.compile'd field.decode (option compile on CUDA)
    expression_range: Any = None  # (2, E) on the device: the expressions the colour network was trained on


class InstaField(AvatarField):
    """INSTA-style deformable hash-grid NeRF head avatar."""

    Options = InstaOptions
    options: InstaOptions

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self._cache: dict[tuple, _Loaded] = {}

    # ------------------------------------------------------------------ helpers

    def _backend(self, device) -> str:
        from ophav_insta.hashgrid import resolve_backend

        try:
            return resolve_backend(self.options.backend, device)
        except RuntimeError as exc:
            raise UsageError(f"insta: {exc}") from None

    def _deform_backend(self, deformer) -> str:
        try:
            return deformer.set_backend(self.options.deform_backend)
        except RuntimeError as exc:
            raise UsageError(f"insta: {exc}") from None

    # ------------------------------------------------------------------ fit

    def fit(self, frames: FrameSet, masks: MaskSet, tracking: Tracking, out: Path,
            init: AvatarCheckpoint | None = None, iterations: int | None = None) -> AvatarCheckpoint:
        from ophav_insta.train import Stopwatch, psnr

        device = self.torch_device()
        backend = self._backend(device)
        total = self.planned_iterations(init, iterations)
        trainer, previous = build_trainer(self.options, frames, masks, tracking, device, self.context.seed, backend,
                                          total, init.path if init is not None else None)
        deform_backend = trainer.deformer.backend
        watch = Stopwatch(device)
        last_loss, last_mse = float("nan"), float("nan")
        with self.context.progress(total, "fit") as bar:
            for i in range(total):
                loss, mse = trainer.step()
                if (i + 1) % self.options.progress_every == 0 or i + 1 == total:  # reading a loss syncs the GPU
                    last_loss, last_mse = float(loss), float(mse)
                    bar.advance(1, psnr=psnr(last_mse), loss=last_loss)
                else:
                    bar.advance(1)
        trainer.finalize()
        seconds = watch.elapsed()
        finite = math.isfinite(last_mse)
        info = {
            "component": "insta", "iterations": total,
            "total_iterations": int(previous.get("total_iterations", 0)) + total,
            "loss": last_loss if finite else None, "psnr": psnr(last_mse) if finite else None,
            "seconds": round(seconds, 3), "iterations_per_second": round(total / seconds, 2) if seconds > 0 else None,
            "device": str(device), "backend": backend, "deform_backend": deform_backend, "frames": len(frames),
            "image_size": [int(s) for s in frames.size], "background": trainer.options.background,
            "occupied_fraction": round(trainer.occupancy.fraction(), 4),
            "samples_per_ray": round(trainer.samples_evaluated / max(trainer.rays_traced, 1), 2),
            "samples_dropped": trainer.samples_dropped,
            "continued_from": str(init.path) if init is not None else None,
        }
        # A continued training keeps the avatar's own template (its camera and frontal frame), whatever frames the
        # round trained on: renders of it then frame the head as the first fit did.
        template = init.template if init is not None else checkpoint_template(tracking)
        write_checkpoint(Path(out), trainer, template, info, trainer.expression_range)
        return AvatarCheckpoint(path=Path(out), template=template, info=info)

    # ------------------------------------------------------------------ load

    def load(self, path: Path) -> AvatarCheckpoint:
        ckpt = read_checkpoint(path)
        return AvatarCheckpoint(path=Path(path), template=tracking_from_tensors(ckpt["template"]), info=dict(ckpt["info"]))

    def _loaded(self, path: Path) -> _Loaded:
        import torch

        from ophav_insta.model import CanonicalField, FieldConfig, Geometry
        from ophav_insta.render import OccupancyGrid

        device = self.torch_device()
        stat = Path(path).stat()
        key = (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size, str(device), self.options.backend,
               self.options.deform_backend, self.options.compile)
        if key in self._cache:
            return self._cache[key]
        ckpt = read_checkpoint(path)
        config, geometry = FieldConfig.from_dict(ckpt["config"]), Geometry.from_dict(ckpt["geometry"])
        field = CanonicalField(config, self._backend(device))
        field.load_state_dict(ckpt["field"])
        field.to(device).eval().requires_grad_(False)
        tensors = geometry.tensors(device)
        occupancy_state = ckpt["occupancy"]
        resolution = round(occupancy_state["density"].numel() ** (1 / 3))
        occupancy = OccupancyGrid(resolution, tensors["cube_min"], geometry.cube_side, int(occupancy_state["dilation"]))
        occupancy.load_state(occupancy_state)
        trained = ckpt["options"]
        if occupancy.opaque is None and occupancy.active:
            # A checkpoint from before the opaque voxels were stored: the same test on its densities.
            from ophav_insta.train import surface_points

            template = tracking_from_tensors(ckpt["template"])
            occupancy.mark_surface(surface_points(torch.as_tensor(template.canonical_vertices, device=device),
                                                  torch.as_tensor(template.faces, dtype=torch.int64, device=device)))
            step = geometry.sample_spacing(int(trained["samples_per_ray"]))
            occupancy.opaque = ((1.0 - torch.exp(-occupancy.density * step)) > float(trained["occupancy_threshold"])
                                ) | occupancy.surface
        deformer = _deformer_from_checkpoint(ckpt, device)
        self._deform_backend(deformer)
        decode = None
        if self.options.compile and device.type == "cuda":
            decode = torch.compile(field.decode, dynamic=True)
        trained_range = ckpt.get("expression_range")
        loaded = _Loaded(field, deformer, geometry, occupancy, tracking_from_tensors(ckpt["template"]),
                         str(trained.get("background", "white")), int(trained["samples_per_ray"]), decode,
                         None if trained_range is None else trained_range.to(device))
        self._cache = {key: loaded}  # one avatar at a time: a new checkpoint frees the previous one
        return loaded

    # ------------------------------------------------------------------ render

    def render(self, avatar: AvatarCheckpoint, request: RenderRequest) -> RenderResult:
        import torch

        from ophav_insta.model import FrameData
        from ophav_insta.render import displacement_radius
        from ophav_insta.train import background_rgb, render_image

        model = self._loaded(avatar.path)
        template = model.template
        if request.expression.shape[1] != template.num_expressions:
            raise InvalidData(f"RenderRequest.expression has {request.expression.shape[1]} coefficients, the avatar "
                              f"{template.num_expressions}")
        device = self.torch_device()
        width, height = (int(s) for s in request.resolution)
        n = len(request)
        rgb = np.zeros((n, height, width, 3), np.uint8)
        alpha = np.zeros((n, height, width), np.float32)
        depth = np.zeros((n, height, width), np.float32)
        options = self.options.resolved(device.type == "cuda").model_copy(
            update={"samples_per_ray": model.samples_per_ray})
        background = background_rgb(model.background, device)
        amp = bool(self.options.amp and device.type == "cuda")
        canonical = torch.as_tensor(template.canonical_vertices, device=device)
        basis = torch.as_tensor(template.expression_basis, device=device)
        f32 = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=device)  # noqa: E731
        beyond = _beyond_trained(request.expression, model.expression_range)
        if beyond:
            import warnings

            warnings.warn(beyond, stacklevel=2)
        faces = torch.as_tensor(template.faces, dtype=torch.int64, device=device)
        frame_occupancy: dict[bytes, Any] = {}
        for i in range(n):
            expression = f32(request.expression[i:i + 1])
            mesh = canonical[None] + torch.einsum("ne,evc->nvc", expression, basis)
            # Empty-space skipping dilated by this frame's own displacement: wide only where its mesh moves
            # (a turntable's frames share one expression, so one grid).
            key = request.expression[i].tobytes()
            if key not in frame_occupancy:
                frame_occupancy = {key: model.occupancy.with_radius(displacement_radius(
                    canonical, mesh, faces, model.geometry.far, model.occupancy.cube_min, model.geometry.cube_side,
                    model.occupancy.resolution, cap=RENDER_DILATION_CAP))}
            # The mesh (so the geometry) follows the whole expression; the colour network is asked only within
            # the range it was trained on: beyond it a small MLP extrapolates, and a face turns red.
            colour_expression = expression if model.expression_range is None else torch.maximum(
                torch.minimum(expression, model.expression_range[1]), model.expression_range[0])
            K_inv = f32(np.linalg.inv(request.K[i]))[None]
            out = render_image(model.field, model.deformer, model.geometry, frame_occupancy[key],
                               FrameData(mesh, colour_expression), K_inv, f32(request.rotation[i:i + 1]),
                               f32(request.translation[i:i + 1]), (width, height), options, background, amp,
                               model.decode)
            rgb[i] = (out[0] * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
            alpha[i], depth[i] = out[1].cpu().numpy(), out[2].cpu().numpy()
        return RenderResult(rgb=rgb, alpha=alpha, depth=depth)


def _beyond_trained(expression: np.ndarray, trained_range: Any) -> str:
    """A one-line note when requested expressions leave the trained range ('' otherwise)."""
    if trained_range is None or not len(expression):
        return ""
    lo, hi = (trained_range.detach().cpu().numpy().astype(np.float64))
    span = np.maximum(hi - lo, 1e-6)
    excess = np.maximum(expression - hi, lo - expression) / span  # in spans of the trained range; > 0 outside
    frames = excess.max(axis=1) > 0.05
    if not frames.any():
        return ""
    return (f"{int(frames.sum())} of {len(expression)} frames ask for expressions beyond what the avatar was trained "
            f"on (up to {float(excess.max()):.1f}x the trained range past its edge); the mesh follows them, the "
            f"colour is taken at the nearest trained expression")


# ---------------------------------------------------------------------------------------------- training setup


def field_config(options: InstaOptions, tracking: Tracking, device) -> Any:
    from ophav_insta.model import FieldConfig

    opt = options.resolved(device.type == "cuda")
    return FieldConfig(levels=opt.levels, features_per_level=opt.features_per_level, log2_table=opt.log2_table,
                       base_resolution=opt.base_resolution, finest_resolution=opt.finest_resolution,
                       hidden_dim=opt.hidden_dim, geo_features=opt.geo_features, color_layers=opt.color_layers,
                       expression_dim=tracking.num_expressions, expression_falloff=opt.expression_falloff)


def build_trainer(options: InstaOptions, frames: FrameSet, masks: MaskSet, tracking: Tracking, device, seed: int,
                  backend: str, iterations: int, init_path: Path | None = None) -> tuple[Any, dict[str, Any]]:
    """A :class:`~ophav_insta.train.Trainer` for the frames: geometry, candidate grid and weights either new or
    from the checkpoint ``init_path`` (whose architecture and head space are kept). Also returns the init's info."""
    import torch

    from ophav_insta.deform import MeshDeformer, reference_meshes, unposed_vertices
    from ophav_insta.model import FieldConfig, Geometry
    from ophav_insta.render import displacement_radius
    from ophav_insta.train import Scene, Trainer

    masks.check_matches(frames)
    tracking.check_matches(frames)
    device = torch.device(device)
    opt = options.resolved(device.type == "cuda")
    unposed = unposed_vertices(tracking.vertices, tracking.rotation, tracking.translation)
    field_state = occupancy_state = None
    previous: dict[str, Any] = {}
    if init_path is not None:
        ckpt = read_checkpoint(init_path)
        config, geometry = FieldConfig.from_dict(ckpt["config"]), Geometry.from_dict(ckpt["geometry"])
        check_continuable(ckpt["template"], tracking, "insta")
        deformer = _deformer_from_checkpoint(ckpt, device)
        field_state, occupancy_state, previous = ckpt["field"], ckpt["occupancy"], dict(ckpt["info"])
        trained_range = ckpt.get("expression_range")
    else:
        trained_range = None
        config = field_config(opt, tracking, device)
        geometry = Geometry.from_meshes(tracking.canonical_vertices, unposed, tracking.mesh_type, opt.box_margin,
                                        opt.box_extra_up, opt.box_extra_back, opt.deform_near, opt.deform_far)
        refs = reference_meshes(unposed, tracking.canonical_vertices)
        deformer = MeshDeformer.build(tracking.canonical_vertices, tracking.faces, refs, opt.candidate_grid,
                                      opt.candidates, geometry.near, geometry.far, device)
    # The occupancy test uses unposed points; canonical ones are at most the local expression displacement away:
    # the dilation follows it (wide at the mouth, one voxel where the mesh does not move or is far).
    dilation = displacement_radius(torch.as_tensor(tracking.canonical_vertices, dtype=torch.float32),
                                   torch.as_tensor(unposed), torch.as_tensor(tracking.faces, dtype=torch.int64),
                                   geometry.far, torch.as_tensor(geometry.cube_min, dtype=torch.float32),
                                   geometry.cube_side, opt.occupancy_resolution)
    try:  # before the Trainer: it compiles only the torch deformation
        deformer.set_backend(opt.deform_backend)
    except RuntimeError as exc:
        raise UsageError(f"insta: {exc}") from None
    scene = Scene.build(frames, masks, tracking, geometry, device, with_depth=opt.lambda_depth > 0)
    trainer = Trainer(opt, config, geometry, deformer, scene, device, seed, backend, iterations, field_state,
                      occupancy_state, dilation)
    # The expressions the colour network has seen: a continued training keeps the first fit's range (the coarse
    # video's), since the rounds' renders carry the same expressions.
    trainer.expression_range = trained_range if trained_range is not None else expression_range(tracking.expression)
    return trainer, previous


# ---------------------------------------------------------------------------------------------- checkpoint


EXPRESSION_PERCENTILES = (1.0, 99.0)


def expression_range(expression: np.ndarray) -> Any:
    """(2, E) float32 tensor: the 1st and 99th percentile of each expression coefficient over the training frames,
    widened by a tenth of its span (what the colour network may be asked without extrapolating)."""
    import torch

    lo, hi = np.percentile(expression, EXPRESSION_PERCENTILES, axis=0)
    margin = 0.1 * (hi - lo)
    return torch.from_numpy(np.stack([lo - margin, hi + margin]).astype(np.float32))


def write_checkpoint(out: Path, trainer: Any, template: Tracking, info: dict[str, Any],
                     trained_range: Any = None) -> None:
    """One file, written atomically: EMA weights, architecture, head space, candidate and occupancy grids,
    the template tracking and the info."""
    import torch

    payload = {
        "format": FORMAT, "version": VERSION, "config": trainer.config.to_dict(),
        "geometry": trainer.geometry.to_dict(), "options": trainer.options.model_dump(),
        "field": {k: v.detach().cpu().clone() for k, v in trainer.ema.state_dict().items()},
        "deformer": trainer.deformer.state(), "occupancy": trainer.occupancy.state(),
        "template": tracking_to_tensors(template), "info": info,
    }
    if trained_range is not None:
        payload["expression_range"] = trained_range
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(out, buffer.getvalue())


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (no code runs: ``weights_only=True``) and check its format."""
    from ophav_core.weights import load_tensors

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"avatar checkpoint {path} does not exist")
    ckpt = load_tensors(path, what="an ophav avatar (insta checkpoint)")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InvalidData(f"{path} is not an insta checkpoint (format {ckpt.get('format') if isinstance(ckpt, dict) else '?'})")
    if int(ckpt.get("version", 0)) > VERSION:
        raise InvalidData(f"{path} was written by a newer ophav-insta (version {ckpt['version']})")
    return ckpt


def _deformer_from_checkpoint(ckpt: dict[str, Any], device):
    import torch

    from ophav_insta.deform import MeshDeformer

    template = ckpt["template"]
    geometry = ckpt["geometry"]
    state = ckpt["deformer"]
    return MeshDeformer.from_tensors(
        template["canonical_vertices"].to(device=device, dtype=torch.float32),
        template["faces"].to(device=device, dtype=torch.int64), state["grid_min"].to(device),
        state["grid_max"].to(device), state["candidates"].to(device=device, dtype=torch.int64),
        geometry["near"], geometry["far"])
