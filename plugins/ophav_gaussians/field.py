"""The ``gaussians`` avatar field: fit / load / render, and the single-file checkpoint.

Checkpoint (``torch.save`` of plain containers, loadable with ``weights_only=True``)::

    {"format": "ophav-gaussians", "version": 1, "options": the resolved options used,
     "gaussians": the EMA Gaussians (parent, bary, anchor, offset, rotation, log_scale, opacity, sh tensors),
     "shell_unit": float, "head_size": float, "sh_degree": the degree reached,
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
from ophav_gaussians.options import GaussianOptions

FORMAT, VERSION = "ophav-gaussians", 1


@dataclass
class _Loaded:
    """A checkpoint ready to render on one device."""

    gaussians: Any
    opacity: Any
    faces: Any
    canonical: Any
    basis: Any
    shell_unit: float
    degree: int
    background: str
    template: Tracking
    extend: Any  # a tracked mesh -> the vertices ``faces`` index (FieldMesh.extend)


class GaussianField(AvatarField):
    """3D Gaussians bound to the tracked mesh's triangles, plus a head-rigid shell."""

    Options = GaussianOptions
    options: GaussianOptions

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self._cache: dict[tuple, _Loaded] = {}

    # ------------------------------------------------------------------ helpers

    def _backend(self, device) -> str:
        from ophav_gaussians.train import resolve_backend

        try:
            return resolve_backend(self.options.backend, device)
        except (RuntimeError, ValueError) as exc:
            raise UsageError(f"gaussians: {exc}") from None

    # ------------------------------------------------------------------ fit

    def fit(self, frames: FrameSet, masks: MaskSet, tracking: Tracking, out: Path,
            init: AvatarCheckpoint | None = None, iterations: int | None = None) -> AvatarCheckpoint:
        from ophav_gaussians.train import Stopwatch, psnr

        device = self.torch_device()
        backend = self._backend(device)
        total = self.planned_iterations(init, iterations)
        trainer, previous = build_trainer(self.options, self.context.profile.name, frames, masks, tracking, device,
                                          self.context.seed, backend, total,
                                          init.path if init is not None else None)
        start_count = len(trainer)
        watch = Stopwatch(device)
        last_loss, last_mse = float("nan"), float("nan")
        with self.context.progress(total, "fit") as bar:
            for i in range(total):
                loss, mse = trainer.step()
                if (i + 1) % self.options.progress_every == 0 or i + 1 == total:  # reading a loss syncs the GPU
                    last_loss, last_mse = float(loss), float(mse)
                    bar.advance(1, psnr=psnr(last_mse), loss=last_loss, gaussians=len(trainer))
                else:
                    bar.advance(1)
        seconds = watch.elapsed()
        finite = math.isfinite(last_mse)
        on_mesh = int((trainer.fixed["parent"] >= 0).sum())
        info = {
            "component": "gaussians", "iterations": total,
            "total_iterations": int(previous.get("total_iterations", 0)) + total,
            "loss": last_loss if finite else None, "psnr": psnr(last_mse) if finite else None,
            "seconds": round(seconds, 3), "iterations_per_second": round(total / seconds, 2) if seconds > 0 else None,
            "device": str(device), "backend": backend, "frames": len(frames),
            "image_size": [int(s) for s in frames.size], "background": trainer.options.background,
            "gaussians": len(trainer), "gaussians_on_mesh": on_mesh, "gaussians_shell": len(trainer) - on_mesh,
            "gaussians_at_start": start_count, "densified": trainer.densified, "pruned": trainer.pruned,
            "sh_degree": trainer.degree, "continued_from": str(init.path) if init is not None else None,
        }
        # A continued training keeps the avatar's own template (its camera and frontal frame), whatever frames the
        # round trained on: renders of it then frame the head as the first fit did.
        template = init.template if init is not None else checkpoint_template(tracking)
        write_checkpoint(Path(out), trainer, template, info)
        return AvatarCheckpoint(path=Path(out), template=template, info=info)

    # ------------------------------------------------------------------ load

    def load(self, path: Path) -> AvatarCheckpoint:
        ckpt = read_checkpoint(path)
        return AvatarCheckpoint(path=Path(path), template=tracking_from_tensors(ckpt["template"]),
                                info=dict(ckpt["info"]))

    def _loaded(self, path: Path) -> _Loaded:
        import torch

        from ophav_gaussians.model import Gaussians

        device = self.torch_device()
        stat = Path(path).stat()
        key = (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size, str(device))
        if key in self._cache:
            return self._cache[key]
        ckpt = read_checkpoint(path)
        template = tracking_from_tensors(ckpt["template"])
        g = Gaussians.from_state(ckpt["gaussians"], device)
        mesh = field_mesh(template, trained_options(ckpt))
        if len(g) and int(g.parent.max()) >= len(mesh.faces):
            raise InvalidData(f"{path}: its Gaussians sit on triangles its mesh does not have")
        f32 = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=device)  # noqa: E731
        loaded = _Loaded(g, torch.sigmoid(g.opacity), torch.as_tensor(mesh.faces, device=device),
                         f32(template.canonical_vertices), f32(template.expression_basis),
                         float(ckpt["shell_unit"]), int(ckpt["sh_degree"]),
                         str(ckpt["options"].get("background", "white")), template, mesh.extend)
        self._cache = {key: loaded}  # one avatar at a time: a new checkpoint frees the previous one
        return loaded

    # ------------------------------------------------------------------ render

    def render(self, avatar: AvatarCheckpoint, request: RenderRequest) -> RenderResult:
        import torch

        from ophav_gaussians.train import background_rgb, render_views

        model = self._loaded(avatar.path)
        if request.expression.shape[1] != model.template.num_expressions:
            raise InvalidData(f"RenderRequest.expression has {request.expression.shape[1]} coefficients, the avatar "
                              f"{model.template.num_expressions}")
        device = self.torch_device()
        backend = self._backend(device)
        width, height = (int(s) for s in request.resolution)
        n = len(request)
        rgb = np.zeros((n, height, width, 3), np.uint8)
        alpha = np.zeros((n, height, width), np.float32)
        depth = np.zeros((n, height, width), np.float32)
        background = background_rgb(model.background, device)
        f32 = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=device)  # noqa: E731
        with torch.no_grad():
            for start, stop in _groups(request.expression, self.options.render_batch):
                expression = f32(request.expression[start])
                mesh = model.extend(model.canonical + torch.einsum("e,evc->vc", expression, model.basis))
                out = render_views(model.gaussians, model.opacity, model.faces, model.shell_unit, mesh,
                                   f32(request.rotation[start:stop]), f32(request.translation[start:stop]),
                                   f32(request.K[start:stop]), (width, height), background, model.degree, backend)
                rgb[start:stop] = (out["image"].clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
                alpha[start:stop] = out["alpha"].clamp(0, 1).cpu().numpy()
                depth[start:stop] = out["depth"].cpu().numpy()
        return RenderResult(rgb=rgb, alpha=alpha, depth=depth)


def _groups(expression: np.ndarray, most: int) -> list[tuple[int, int]]:
    """Consecutive runs of frames with the same expression (one mesh: one rasteriser call), at most ``most``."""
    out, start = [], 0
    for i in range(1, len(expression) + 1):
        if i == len(expression) or i - start >= most or not np.array_equal(expression[i], expression[start]):
            out.append((start, i))
            start = i
    return out


# ---------------------------------------------------------------------------------------------- training setup


def build_trainer(options: GaussianOptions, profile: str, frames: FrameSet, masks: MaskSet, tracking: Tracking,
                  device, seed: int, backend: str, iterations: int, init_path: Path | None = None
                  ) -> tuple[Any, dict[str, Any]]:
    """A :class:`~ophav_gaussians.train.Trainer` for the frames: Gaussians either new (on the mesh and the masks'
    visual hull) or those of the checkpoint ``init_path`` (whose options, shell unit and head size are kept).
    Also returns the init's info."""
    import torch

    from ophav_gaussians.model import Gaussians, head_box, initial_gaussians
    from ophav_gaussians.train import Scene, Trainer, unposed_vertices

    masks.check_matches(frames)
    tracking.check_matches(frames)
    device = torch.device(device)
    opt = options.resolved(profile)
    unposed = unposed_vertices(tracking.vertices, tracking.rotation, tracking.translation)
    previous: dict[str, Any] = {}
    start_degree = 0
    if init_path is not None:
        ckpt = read_checkpoint(init_path)
        check_continuable(ckpt["template"], tracking, "gaussians")
        gaussians = Gaussians.from_state(ckpt["gaussians"])
        shell_unit, head_size = float(ckpt["shell_unit"]), float(ckpt["head_size"])
        start_degree = int(ckpt["sh_degree"])
        trained = trained_options(ckpt)
        # The Gaussians' triangles are the checkpoint's: its SH degree at least, and its mouth.
        opt = opt.model_copy(update={"sh_degree": max(trained.sh_degree or 0, opt.sh_degree),
                                     "mouth_pocket": trained.mouth_pocket, "mouth_depth": trained.mouth_depth})
        previous = dict(ckpt["info"])
    mesh = field_mesh(tracking, opt)
    if init_path is None:
        rng = np.random.default_rng([seed, 17])
        gaussians, shell_unit = initial_gaussians(frames.frames, masks, tracking, mesh.extend(unposed), opt.per_face,
                                                  opt.shell_gaussians, opt.carve_resolution, opt.carve_tolerance,
                                                  opt.sh_degree, rng, faces=mesh.faces, interior=mesh.interior)
        head_size = head_box(tracking.canonical_vertices, unposed, tracking.mesh_type)[2]
    if len(gaussians) and int(gaussians.parent.max()) >= len(mesh.faces):
        raise InvalidData(f"{init_path}: its Gaussians sit on triangles this mesh does not have")
    torch.manual_seed(seed)
    scene = Scene.build(frames, masks, tracking, device, extend=mesh.extend)
    canonical = torch.as_tensor(mesh.extend(tracking.canonical_vertices))
    trainer = Trainer(opt, gaussians, torch.as_tensor(mesh.faces), canonical, shell_unit, head_size, scene, device,
                      seed, iterations, backend, start_degree)
    return trainer, previous


@dataclass(frozen=True)
class FieldMesh:
    """The triangles the Gaussians sit on and how to build the vertices they index from a tracked mesh: the
    tracker's own, or with the mouth pocket (:mod:`ophav_gaussians.mouth`) in place of the mouth opening."""

    faces: np.ndarray  # (F', 3) int64
    interior: np.ndarray | None  # (F',) bool: triangles inside the mouth, or None
    pocket: Any

    def extend(self, vertices):
        return vertices if self.pocket is None else self.pocket.extend(vertices)


def field_mesh(tracking: Tracking, options: GaussianOptions) -> FieldMesh:
    from ophav_gaussians.mouth import mouth_pocket

    pocket = mouth_pocket(tracking.faces, tracking.semantic.get("lips_inner"), tracking.canonical_vertices,
                          options.mouth_depth) if options.mouth_pocket else None
    if pocket is None:
        return FieldMesh(np.asarray(tracking.faces, np.int64), None, None)
    return FieldMesh(pocket.faces, pocket.interior(), pocket)


def trained_options(ckpt: dict[str, Any]) -> GaussianOptions:
    """The options a checkpoint was trained with. A checkpoint from before the mouth pocket has none."""
    stored = {k: v for k, v in ckpt["options"].items() if k in GaussianOptions.model_fields}
    stored.setdefault("mouth_pocket", False)
    return GaussianOptions(**stored)


# ---------------------------------------------------------------------------------------------- checkpoint


def write_checkpoint(out: Path, trainer: Any, template: Tracking, info: dict[str, Any]) -> None:
    """One file, written atomically: the EMA Gaussians, the options, the template tracking and the info."""
    import torch

    payload = {
        "format": FORMAT, "version": VERSION, "options": trainer.options.model_dump(),
        "gaussians": trainer.gaussians(ema=trainer.options.ema_decay > 0).state(),
        "shell_unit": float(trainer.shell_unit), "head_size": float(trainer.head_size),
        "sh_degree": int(trainer.degree), "template": tracking_to_tensors(template), "info": info,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(out, buffer.getvalue())


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (no code runs: ``weights_only=True``) and check its format."""
    from ophav_core.weights import load_tensors

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"avatar checkpoint {path} does not exist")
    ckpt = load_tensors(path, what="an ophav avatar (gaussians checkpoint)")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else "?"
        raise InvalidData(f"{path} is not a gaussians checkpoint (format {found})")
    if int(ckpt.get("version", 0)) > VERSION:
        raise InvalidData(f"{path} was written by a newer ophav-gaussians (version {ckpt['version']})")
    return ckpt
