"""Stage 3: camera, head pose, expression and face mesh for every frame."""
from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING

import numpy as np

from ophav_core.stages.base import Component
from ophav_core.stages.data import FrameSet, Tracking

if TYPE_CHECKING:  # the motion module imports the stage data; avoid a cycle at run time
    from ophav_core.stages.motion import Motion


class Tracker(Component):
    stage = "tracker"

    @abstractmethod
    def track(self, frames: FrameSet, *, single_image: bool = False, reference: Tracking | None = None,
              source: str = "") -> Tracking:
        """Track ``frames``.

        single_image: the frames are one photo (the portrait): no temporal smoothing, and no face found is an
            error (:class:`~ophav_core.errors.NoFaceFound` naming ``source``) instead of an interpolated gap.
        reference: express the result in this tracking's camera model and expression basis (a driving video
            tracked into the avatar's basis); its canonical mesh is not changed.
        """

    def expressions_for(self, motion: Motion, tracking: Tracking) -> np.ndarray:
        """Expression coefficients (N, E) in ``tracking``'s basis for a motion's named expressions and offsets.
        Trackers whose mesh has no named-expression model raise NotImplementedError."""
        raise NotImplementedError(f"{type(self).__name__} cannot turn named expressions into coefficients")

    def expression_offsets(self, motion: Motion, tracking: Tracking) -> np.ndarray:
        """Head-space vertex offsets (N, V, 3) of ``tracking``'s mesh for a motion's named expressions and dense
        offsets, scaled to the tracked face: what a mesh-driven image2video adds to the portrait's neutral mesh.

        The default is :meth:`expressions_for` through the expression basis; a tracker with an exact model of
        named expressions returns it unprojected (a basis of a few dozen rows loses detail)."""
        coefficients = self.expressions_for(motion, tracking)
        return np.einsum("ne,evc->nvc", coefficients, tracking.expression_basis)
