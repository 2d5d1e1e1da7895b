"""Stage 4: the deformable radiance field, learned from tracked frames."""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ophav_core.stages.base import Component
from ophav_core.stages.data import FrameSet, MaskSet, RenderRequest, RenderResult, Tracking


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

        from ophav_core.errors import UsageError

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
