"""A test-only third-party plugin: the tracker ``permuted``, MediaPipe's tracker with the mesh's vertices in
another order (triangles, UVs, vertex groups, mirror map, template and expression basis permuted with them).

It reaches MediaPipe's tracker only through the registry, as any third-party package would, and its topology has
another name, so a consumer that still assumed MediaPipe's vertex order or name would break on it."""
from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from ophav_core import hookimpl
from ophav_core.registry import ComponentSpec
from ophav_core.stages import FrameSet, Tracker, Tracking
from ophav_core.stages.motion import Motion

MESH_TYPE = "mediapipe468-permuted"
ORDER = np.random.default_rng(13).permutation(468)  # new vertex i is MediaPipe's vertex ORDER[i]
INVERSE = np.argsort(ORDER)
CALLS: Counter = Counter()


def reorder(tracking: Tracking, order: np.ndarray, name: str) -> Tracking:
    """The same tracking with its vertices in another order: new vertex i is old vertex ``order[i]``."""
    landmarks = None if tracking.landmarks is None else tracking.landmarks[:, order]
    return Tracking(K=tracking.K, image_size=tracking.image_size, rotation=tracking.rotation,
                    translation=tracking.translation, expression=tracking.expression,
                    vertices=tracking.vertices[:, order], canonical_vertices=tracking.canonical_vertices[order],
                    expression_basis=tracking.expression_basis[:, order], landmarks=landmarks, valid=tracking.valid,
                    **tracking.topology.permuted(order, name).tracking_fields())


class PermutedTracker(Tracker):
    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self._inner: Tracker | None = None

    def inner(self) -> Tracker:
        if self._inner is None:
            from ophav_core.plugins import get_host

            self._inner = get_host().registry.get("tracker", "mediapipe").create(None, self.context)
        return self._inner

    def track(self, frames: FrameSet, *, single_image: bool = False, reference: Tracking | None = None,
              source: str = "") -> Tracking:
        CALLS["track"] += 1
        original = None if reference is None else reorder(reference, INVERSE, "mediapipe468")
        tracking = self.inner().track(frames, single_image=single_image, reference=original, source=source)
        return reorder(tracking, ORDER, MESH_TYPE)

    def _original(self, motion: Motion, tracking: Tracking) -> tuple[Motion, Tracking]:
        if motion.offsets is not None:
            motion = dataclasses.replace(motion, offsets=motion.offsets[:, INVERSE], topology="mediapipe468")
        return motion, reorder(tracking, INVERSE, "mediapipe468")

    def expressions_for(self, motion: Motion, tracking: Tracking) -> np.ndarray:
        return self.inner().expressions_for(*self._original(motion, tracking))  # coefficients know no vertex order

    def expression_offsets(self, motion: Motion, tracking: Tracking) -> np.ndarray:
        CALLS["expression_offsets"] += 1
        return self.inner().expression_offsets(*self._original(motion, tracking))[:, ORDER]


@hookimpl
def register_tracker(register):
    register(ComponentSpec(stage="tracker", name="permuted", factory=PermutedTracker,
                           summary="test only: MediaPipe's tracker with the vertices in another order"))
