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
