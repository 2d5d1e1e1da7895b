"""Training: the frames on the device, one Adam optimisation of the Gaussians with an EMA, densification and
pruning, and the render of one expression from some views. Used by :class:`ophav_gaussians.field.GaussianField`
and by the benchmark."""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ophav_core.stages.data import FrameSet, MaskSet, Tracking
from ophav_gaussians.anchors import (camera_centres, place_packed, quat_to_matrix, rasteriser_intrinsics, sh_colours,
                                     triangle_frames, triangle_pack, view_matrices)
from ophav_gaussians.losses import add_regularisers, composited_target, photometric_loss
from ophav_gaussians.model import LEARNT, Gaussians, sh_count
from ophav_gaussians.options import GaussianOptions

SPLIT_SHRINK = 1.6  # a split Gaussian's two children are this much smaller (3DGS)
NEAR, FAR = 0.01, 1e4  # camera z culling range, in the tracker's units (a head at ~60 cm: far only excludes absurd)


def resolve_backend(backend: str, device) -> str:
    """The rasteriser for ``backend`` on ``device``: ``auto`` = triton on CUDA (when importable), the sparse
    pair compositing (:mod:`ophav_gaussians.sparse`) on the CPU; ``torch`` is the tile reference."""
    from ophav_gaussians.raster import resolve_backend as raster_backend

    device = torch.device(device)
    if backend == "sparse" or (backend == "auto" and device.type == "cpu"):
        return "sparse"
    return raster_backend(backend, device)


def _rasterise(backend: str, *args, **kwargs) -> dict:
    if backend == "sparse":
        from ophav_gaussians.sparse import render_gaussians_sparse

        return render_gaussians_sparse(*args, **kwargs)
    from ophav_gaussians.raster import render_gaussians

    return render_gaussians(*args, backend=backend, **kwargs)


def background_rgb(name: str, device) -> torch.Tensor:
    return torch.full((3,), 1.0 if name == "white" else 0.0, device=device)


def unposed_vertices(vertices_cam: np.ndarray, rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """(N, V, 3) float32 ``R^T (v - t)``: the tracked meshes in head space (the pose removed)."""
    local = vertices_cam.astype(np.float32) - translation[:, None, :].astype(np.float32)
    return np.einsum("nji,nvj->nvi", rotation.astype(np.float32), local).astype(np.float32)


def _needs_grad(g: Gaussians, mesh: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (mesh.requires_grad or any(t.requires_grad for t in g.tensors().values()))


def render_views(g: Gaussians, opacity: torch.Tensor, faces: torch.Tensor, shell_unit: float, mesh: torch.Tensor,
                 rotation: torch.Tensor, translation: torch.Tensor, Ks: torch.Tensor, size: tuple[int, int],
                 background: torch.Tensor, degree: int, backend: str, pack: torch.Tensor | None = None) -> dict:
    """Rasterise the Gaussians on one head-space mesh (V, 3) from B views (head poses (B, 3, 3), (B, 3),
    intrinsics (B, 3, 3)): the rasteriser's dict (image (B, H, W, 3) over ``background``, alpha, depth (camera z,
    0 where empty), radii, means2d). Without gradients the triton backend places and shades the Gaussians in one
    launch (:mod:`ophav_gaussians.place_kernel`); ``pack``, the mesh's :func:`~ophav_gaussians.anchors.triangle_pack`
    when it was made once beforehand, makes the differentiable placement a gather and three products."""
    centres = camera_centres(rotation, translation)
    if backend == "triton" and not _needs_grad(g, mesh):
        from ophav_gaussians.place_kernel import place_and_shade

        means, quats, scales, colours = place_and_shade(mesh, faces, g.parent, g.bary, g.anchor, g.offset,
                                                        g.rotation, g.log_scale, g.sh, shell_unit, centres, degree)
    else:
        if pack is not None:
            means, quats, scales = place_packed(pack, g.parent, g.bary, g.anchor, g.offset, g.rotation, g.log_scale)
        else:
            means, quats, scales = g.place(mesh, faces, shell_unit)
        colours = sh_colours(g.sh, means, centres, degree)
    width, height = size
    return _rasterise(backend, means, quats, scales, opacity, colours, view_matrices(rotation, translation),
                      rasteriser_intrinsics(Ks), int(width), int(height), background=background, near=NEAR, far=FAR)


# ---------------------------------------------------------------------------------------------- losses


def psnr(mse: float) -> float:
    return float(-10.0 * np.log10(max(mse, 1e-12)))


# ---------------------------------------------------------------------------------------------- data


@dataclass
class Scene:
    """The training frames on the device: images uint8 (N, H, W, 3), masks uint8 (N, H, W), head poses, K, the
    head-space meshes (N, V, 3) and the usable frames."""

    images: torch.Tensor
    masks: torch.Tensor
    rotation: torch.Tensor
    translation: torch.Tensor
    K: torch.Tensor
    meshes: torch.Tensor
    usable: torch.Tensor

    @classmethod
    def build(cls, frames: FrameSet, masks: MaskSet, tracking: Tracking, device, extend=None) -> "Scene":
        """``extend``: what makes the field's vertices of a tracked mesh (the mouth pocket's point appended)."""
        extend = extend or (lambda vertices: vertices)
        n = len(tracking)
        usable = np.arange(n) if tracking.valid is None or not tracking.valid.any() else np.flatnonzero(tracking.valid)
        t = lambda a, dt=torch.float32: torch.as_tensor(np.ascontiguousarray(a), dtype=dt).to(device)  # noqa: E731
        return cls(t(frames.frames, torch.uint8), t(np.rint(masks.alpha * 255.0).astype(np.uint8), torch.uint8),
                   t(tracking.rotation), t(tracking.translation), t(np.broadcast_to(tracking.K, (n, 3, 3))),
                   t(extend(unposed_vertices(tracking.vertices, tracking.rotation, tracking.translation))),
                   t(usable, torch.int64))

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[1])

    def target(self, index: int, background: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W, 3) frame composited over the background with its mask, in [0, 1], and the (H, W) mask."""
        return composited_target(self.images[index], self.masks[index], background)


# ---------------------------------------------------------------------------------------------- trainer


class _GraphsOff(Exception):
    """A CUDA graph capture failed: the step goes through :func:`render_views` from now on."""


class Trainer:
    """One optimisation of the Gaussians on a :class:`Scene` (options resolved for the profile)."""

    def __init__(self, options: GaussianOptions, gaussians: Gaussians, faces: torch.Tensor,
                 canonical: torch.Tensor, shell_unit: float, head_size: float, scene: Scene, device, seed: int,
                 total_iterations: int, backend: str = "auto", start_degree: int = 0):
        self.options, self.scene, self.device = options, scene, torch.device(device)
        self.faces, self.canonical = faces.to(self.device), canonical.to(self.device)
        self.shell_unit, self.head_size = float(shell_unit), float(head_size)
        self.total = max(int(total_iterations), 1)
        self.backend = backend
        self.max_degree = int(options.sh_degree)
        self.degree = min(int(start_degree), self.max_degree)
        g = gaussians.to(self.device)
        if g.sh.shape[1] < sh_count(self.max_degree):  # a continued training may raise the degree
            g.sh = torch.cat([g.sh, g.sh.new_zeros(len(g), sh_count(self.max_degree) - g.sh.shape[1], 3)], 1)
        self.fixed = {k: getattr(g, k) for k in ("parent", "bary", "anchor")}
        self.params = {k: torch.nn.Parameter(getattr(g, k).detach().clone()) for k in LEARNT}
        self.ema = {k: v.detach().clone() for k, v in self.params.items()}
        lr = {"offset": options.lr_position, "rotation": options.lr_rotation, "log_scale": options.lr_scale,
              "opacity": options.lr_opacity, "sh": options.lr_color}
        self.optimizer = torch.optim.Adam([{"params": [self.params[k]], "lr": lr[k], "base_lr": lr[k], "name": k}
                                           for k in LEARNT], eps=1e-15, fused=self.device.type == "cuda")
        with torch.no_grad():
            self._face_size = triangle_frames(self.canonical, self.faces)[1]
        # Every training frame's triangles, packed once (all frames: 1500 x ~900 x 35 floats at the standard profile).
        self._packs = triangle_pack(scene.meshes, self.faces, self.shell_unit)
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.background = background_rgb(options.background, self.device)
        self.step_count = 0
        self._usable = scene.usable.tolist()  # on the host: picking a frame never syncs
        # With graphs on: the triton step in two dense halves (ophav_gaussians.step), each a CUDA graph. One frame a
        # step only (with more, a graph's gradient buffers would be overwritten before they are summed). Off, or
        # where a capture fails, the step goes through render_views as it always has.
        self._graphs = (backend == "triton" and options.cuda_graphs and self.device.type == "cuda"
                        and options.frames_per_batch == 1)
        self._halves: dict[str, tuple] = {}
        self._reset_stats()
        self.densified = 0
        self.pruned = 0

    # ------------------------------------------------------------------ views of the parameters

    def gaussians(self, ema: bool = False) -> Gaussians:
        source = self.ema if ema else self.params
        return Gaussians(**self.fixed, **{k: source[k] for k in LEARNT})

    def __len__(self) -> int:
        return int(self.fixed["parent"].shape[0])

    def _world_size(self, log_scale: torch.Tensor) -> torch.Tensor:
        parent = self.fixed["parent"]
        unit = torch.where(parent >= 0, self._face_size[parent.clamp_min(0)],
                           torch.full_like(self._face_size[:1].expand(parent.shape[0]), self.shell_unit))
        return torch.exp(log_scale).amax(1) * unit

    # ------------------------------------------------------------------ one iteration

    def _set_learning_rates(self) -> None:
        fraction = self.step_count / self.total
        for group in self.optimizer.param_groups:
            if group["name"] == "offset":
                group["lr"] = group["base_lr"] * self.options.lr_position_final_ratio ** fraction
            elif group["name"] == "sh":
                group["lr"] = group["base_lr"]

    def render(self, index: int, scene: Scene | None = None, ema: bool = False) -> dict:
        own = scene is None or scene is self.scene
        scene = scene or self.scene
        g = self.gaussians(ema)
        pick = slice(index, index + 1)
        return render_views(g, torch.sigmoid(g.opacity), self.faces, self.shell_unit, scene.meshes[index],
                            scene.rotation[pick], scene.translation[pick], scene.K[pick], scene.size,
                            self.background, self.degree, self.backend, self._packs[index] if own else None)

    def loss(self, index: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(loss, photometric MSE, the rasteriser's output: at least ``means2d`` with its gradient retained and
        ``radii``) of frame ``index``, with gradients."""
        if self._graphs:
            try:
                return self._loss_split(index)
            except _GraphsOff:
                pass
        return self._loss_rendered(index)

    def _half(self, name: str, build, live: tuple, staged: tuple, key: tuple):
        """The ``name`` half of the step for the Gaussians as they are (``key``), captured as CUDA graphs when
        graphs are on; built again when the key changes."""
        cached = self._halves.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        function = build()
        if self._graphs:
            from ophav_gaussians.step import graphed

            try:
                function = graphed(function, live, staged)
            except RuntimeError as error:  # a capture this torch or driver refuses: the step as it always was
                warnings.warn(f"gaussians: CUDA graph capture failed ({str(error).splitlines()[0]}); training "
                              f"continues without graphs", RuntimeWarning, stacklevel=3)
                self._graphs = False
                self._halves.clear()
                raise _GraphsOff from error
        self._halves[name] = (key, function)
        return function

    def _loss_split(self, index: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """:meth:`_loss_rendered` for the triton rasteriser, as front, binning and compositing (eager) and
        photometric: with graphs on, the halves are CUDA graph replays (the same arithmetic in about a tenth of
        the launches); off, the same halves op by op (what the CPU test compares with :meth:`_loss_rendered`)."""
        from ophav_gaussians.raster.projection import Projection, bin_gaussians
        from ophav_gaussians.raster.triton_kernels import rasterize_triton
        from ophav_gaussians.step import make_front, make_photometric

        scene, p = self.scene, self.params
        width, height = scene.size
        pick = slice(index, index + 1)
        live = tuple(p[k] for k in LEARNT)
        staged = (self._packs[index], scene.rotation[pick], scene.translation[pick], scene.K[pick])
        fixed = self.fixed
        front = self._half("front", lambda: make_front(fixed["parent"], fixed["bary"], fixed["anchor"], self.degree,
                                                       width, height, NEAR, FAR, self.options),
                           live, staged, (len(self), self.degree, tuple(t.data_ptr() for t in live)))
        means2d, conics, opacities, features, regularisers, depths, radii, box, visible = front(*live, *staged)
        if means2d.requires_grad:
            means2d.retain_grad()
        proj = Projection(means2d, conics, depths, radii, box, visible)
        composited, transmittance = rasterize_triton(proj, bin_gaussians(proj, width, height), opacities, features,
                                                     width, height)
        frame = (composited, transmittance, scene.images[index], scene.masks[index])
        photometric = self._half("photometric", lambda: make_photometric(self.background, self.options),
                                 (), frame, (width, height))
        loss, mse = photometric(*frame)
        return loss + regularisers, mse.detach(), {"means2d": means2d, "radii": radii}

    def _loss_rendered(self, index: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The loss through :func:`render_views` (every backend)."""
        out = self.render(index)
        if out["means2d"].requires_grad:
            out["means2d"].retain_grad()
        target, mask = self.scene.target(index, self.background)
        image, alpha = out["image"][0], out["alpha"][0]
        p = self.params
        loss = add_regularisers(photometric_loss(image, alpha, target, mask, self.options), p["log_scale"],
                                p["offset"], torch.sigmoid(p["opacity"]), self.fixed["parent"] >= 0, self.options)
        return loss, F.mse_loss(image.detach(), target), out

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One iteration (``frames_per_batch`` random frames); returns (loss, mse) as device tensors."""
        opt, scene = self.options, self.scene
        self._set_learning_rates()
        self.optimizer.zero_grad(set_to_none=True)
        picks = torch.randint(0, len(self._usable), (opt.frames_per_batch,), generator=self.generator)
        total_loss, total_mse = 0.0, 0.0
        for k in picks.tolist():
            index = self._usable[k]
            loss, mse, out = self.loss(index)
            (loss / opt.frames_per_batch).backward()
            self._accumulate(out)
            total_loss, total_mse = total_loss + loss.detach(), total_mse + mse
        self.optimizer.step()
        self.step_count += 1
        self._update_ema()
        until = int(opt.densify_until * self.total)
        if opt.densify_from <= self.step_count < until and self.step_count % opt.densify_every == 0:
            self.densify_and_prune()
        if self.degree < self.max_degree and self.step_count % opt.sh_every == 0:
            self.degree += 1
        n = opt.frames_per_batch
        return total_loss / n, total_mse / n

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.options.ema_decay, (1.0 + self.step_count) / (10.0 + self.step_count))
        torch._foreach_lerp_([self.ema[k] for k in LEARNT], [self.params[k].detach() for k in LEARNT], 1.0 - decay)

    # ------------------------------------------------------------------ densification

    def _reset_stats(self) -> None:
        n = len(self)
        self.grad_sum = torch.zeros(n, device=self.device)
        self.grad_count = torch.zeros(n, device=self.device)

    @torch.no_grad()
    def _accumulate(self, out: dict) -> None:
        """Screen-space gradient of each visible Gaussian's centre, in NDC units (pixels x (W/2, H/2))."""
        grad = out["means2d"].grad
        if grad is None:
            return
        width, height = self.scene.size
        scale = torch.tensor([width / 2.0, height / 2.0], device=grad.device)
        norm = (grad * scale).norm(dim=-1)  # (B, N)
        visible = out["radii"] > 0
        self.grad_sum += (norm * visible).sum(0)
        self.grad_count += visible.sum(0).float()

    @torch.no_grad()
    def densify_and_prune(self) -> None:
        """Clone small Gaussians and split large ones whose mean screen-space gradient passes the threshold (the
        largest gradients first, within the budget), then prune the transparent and the too big."""
        opt = self.options
        p = self.params
        mean_grad = self.grad_sum / self.grad_count.clamp_min(1)
        size = self._world_size(p["log_scale"])
        large = size > opt.percent_dense * self.head_size
        wanted = mean_grad >= opt.grad_threshold
        room = opt.max_gaussians - len(self)
        candidates = torch.nonzero(wanted).squeeze(1)
        if room <= 0:
            candidates = candidates[:0]
        elif candidates.numel() > room:  # each clone or split adds one Gaussian
            order = torch.argsort(mean_grad[candidates], descending=True)
            candidates = candidates[order[:room]]
        clone = candidates[~large[candidates]]
        split = candidates[large[candidates]]
        new_rows = [self._rows(clone)]
        if split.numel():
            for _ in range(2):
                child = self._rows(split)
                local = quat_to_matrix(child["rotation"]) @ (
                    torch.exp(child["log_scale"]) * torch.randn(split.numel(), 3, generator=self.generator)
                    .to(self.device))[..., None]
                child["offset"] = child["offset"] + local[..., 0]
                child["log_scale"] = child["log_scale"] - math.log(SPLIT_SHRINK)
                new_rows.append(child)
        keep = torch.ones(len(self), dtype=torch.bool, device=self.device)
        keep[split] = False
        opacity = torch.sigmoid(p["opacity"])
        prune = (opacity < opt.min_opacity) | (size > opt.max_size * self.head_size)
        keep &= ~prune
        if not bool(keep.any()) and not sum(r["parent"].numel() for r in new_rows):
            keep = ~keep  # never prune to nothing
        rows = {k: torch.cat([r[k] for r in new_rows]) for k in new_rows[0]}
        self.densified += clone.numel() + split.numel()
        self.pruned += int((~keep).sum()) - split.numel()
        self._rebuild(torch.nonzero(keep).squeeze(1), rows)

    def _rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {k: v[index].clone() for k, v in self.fixed.items()}
        out.update({k: self.params[k].detach()[index].clone() for k in LEARNT})
        return out

    def _rebuild(self, keep: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
        """Keep the rows ``keep`` of every per-Gaussian tensor and append ``rows`` (Adam moments of new rows 0;
        their EMA starts at their value)."""
        for k in self.fixed:
            self.fixed[k] = torch.cat([self.fixed[k][keep], rows[k]])
        for group in self.optimizer.param_groups:
            name = group["name"]
            old = group["params"][0]
            new = torch.nn.Parameter(torch.cat([old.detach()[keep], rows[name]]))
            state = self.optimizer.state.pop(old, None)
            if state:
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = torch.cat([state[key][keep], torch.zeros_like(rows[name])])
                self.optimizer.state[new] = state
            group["params"][0] = new
            self.params[name] = new
            self.ema[name] = torch.cat([self.ema[name][keep], rows[name]])
        self._reset_stats()


class Stopwatch:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.start = self.now()

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def elapsed(self) -> float:
        return self.now() - self.start
