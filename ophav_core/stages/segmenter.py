"""Stage 2: cut every frame to the head (face, hair, ears), dropping background, body and clothes."""
from __future__ import annotations

from abc import abstractmethod

from ophav_core.stages.base import Component
from ophav_core.stages.data import FrameSet, MaskSet, Tracking


class Segmenter(Component):
    stage = "segmenter"

    @abstractmethod
    def segment(self, frames: FrameSet, tracking: Tracking | None = None) -> MaskSet:
        """Per-frame head alpha (N, H, W). ``tracking`` (when the run has it) gives the face geometry, e.g. for
        cutting below the jaw; a segmenter must also work without it."""

    def prepare(self, frames: FrameSet) -> None:
        """Optional: the part of :meth:`segment` that needs only the frames, for a caller that tracks them
        meanwhile (``ophav preprocess`` calls it in a worker thread while the tracker runs). A following
        ``segment`` of the same ``frames`` object uses what it prepared. A segmenter with nothing to prepare
        ignores the call, as this default does."""
