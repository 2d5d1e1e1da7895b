"""Stage 4: the deformable radiance field, learned from tracked frames."""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ophav_core.errors import UsageError
from ophav_core.stages.base import Component
from ophav_core.stages.data import FrameSet, MaskSet, RenderRequest, RenderResult, Tracking

#: Example frames a checkpoint's template keeps (besides camera, canonical mesh, faces, basis and groups).
TEMPLATE_FRAMES = 8


@dataclass
class AvatarCheckpoint:
    """A trained avatar: one file holding weights, config, canonical mesh and expression basis.

    path: the checkpoint file. template: the tracking it was trained with reduced to what rendering needs
    (camera, canonical mesh, faces, basis, semantic groups; one or more example poses). info: a small JSON-able
    description (component, iterations, final loss/PSNR, training time)."""

    path: Path
    template: Tracking
    info: dict[str, Any]


class AvatarField(Component):
    stage = "field"

    def torch_device(self):
        """The run's device as a ``torch.device``; a one-line error when it asks for CUDA that torch cannot see."""
        import torch

        device = torch.device(self.context.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("the run asks for CUDA but torch sees no GPU")
        return device

    def planned_iterations(self, init: "AvatarCheckpoint | None", iterations: int | None) -> int:
        """What :meth:`fit` trains for: ``iterations`` when given, else the component's ``iterations`` option,
        else the profile's (``refit_iterations`` when continuing from ``init``, else ``fit_iterations``)."""
        if iterations is not None:
            return int(iterations)
        option = getattr(self.options, "iterations", None)
        if option is not None:
            return int(option)
        profile = self.context.profile
        return int(profile.refit_iterations if init is not None else profile.fit_iterations)

    @abstractmethod
    def fit(self, frames: FrameSet, masks: MaskSet, tracking: Tracking, out: Path,
            init: AvatarCheckpoint | None = None, iterations: int | None = None) -> AvatarCheckpoint:
        """Train on the frames and write the checkpoint to ``out`` (atomically). With ``init``, continue from
        its weights (the iterative dataset update); ``iterations`` overrides the profile."""

    @abstractmethod
    def load(self, path: Path) -> AvatarCheckpoint:
        """Read a checkpoint written by :meth:`fit` (safely: no code from the file is executed)."""

    @abstractmethod
    def render(self, avatar: AvatarCheckpoint, request: RenderRequest) -> RenderResult:
        """Render ``len(request)`` images."""


# ---------------------------------------------------------------------------------------------- checkpoints
# What a field's one-file checkpoint holds of the tracking it was trained with, in torch's safe format
# (strings and tensors only, so ``torch.load(weights_only=True)`` reads it back).


def checkpoint_template(tracking: Tracking, frames: int = TEMPLATE_FRAMES) -> Tracking:
    """What rendering needs: camera, canonical mesh, faces, basis, semantic groups and a few example frames."""
    n = len(tracking)
    index = np.unique(np.linspace(0, n - 1, min(n, frames)).round().astype(np.int64))
    return tracking.subset(index)


def tracking_to_tensors(tracking: Tracking) -> dict[str, Any]:
    import torch

    return {key: str(value) if value.dtype.kind == "U" else torch.from_numpy(np.array(value, copy=True))
            for key, value in tracking.to_arrays().items()}


def tracking_from_tensors(data: dict[str, Any]) -> Tracking:
    arrays = {k: np.array(v) if isinstance(v, str) else v.numpy() for k, v in data.items()}
    return Tracking.from_arrays(arrays)


def check_continuable(template: dict[str, Any], tracking: Tracking, component: str) -> None:
    """A one-line error unless a checkpoint's template (:func:`tracking_to_tensors`) has the tracking's mesh
    topology and number of expression coefficients: what continuing a training (a restore round) needs."""
    faces = template["faces"]
    if tuple(faces.shape) != tracking.faces.shape or not np.array_equal(faces.numpy(), tracking.faces):
        raise UsageError(f"{component}: the checkpoint to continue from was trained on another mesh topology")
    count = int(template["expression_basis"].shape[0])
    if count != tracking.num_expressions:
        raise UsageError(f"{component}: the checkpoint has {count} expression coefficients, the tracking "
                         f"{tracking.num_expressions}")
