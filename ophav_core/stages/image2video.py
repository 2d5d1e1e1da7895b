"""Stage 1: one portrait -> a coarse talking-head video."""
from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING

from ophav_core.stages.base import Component
from ophav_core.stages.data import FrameSet, Portrait

if TYPE_CHECKING:  # the motion module imports the stage data; avoid a cycle at run time
    from ophav_core.stages.motion import Motion


class Image2Video(Component):
    stage = "image2video"

    @abstractmethod
    def generate(self, portrait: Portrait, motion: Motion) -> FrameSet:
        """Animate ``portrait`` by ``motion``; returns ``len(motion)`` frames at ``motion.fps``, square, at the
        profile's resolution unless the component's options say otherwise, with ``motion.driving_arrays()`` (and
        anything else that explains a frame) in ``FrameSet.driving``."""
