"""Stage 1: one portrait -> a coarse talking-head video."""
from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING

from ophav_core.stages.base import Component
from ophav_core.stages.data import FrameSet, Portrait

if TYPE_CHECKING:  # the motion module imports the stage data; avoid a cycle at run time
    from ophav_core.stages.motion import Motion


#: ``FrameSet.driving`` keys of a generator that knows the face mesh it drew each frame with: camera-space
#: vertices (N, V, 3) in the run tracker's topology, and the camera (N, 3, 3) they are seen through. The
#: pipeline then fits the tracked poses onto this geometry (:meth:`Tracking.posed_onto`) instead of trusting a
#: tracker re-estimating what the generator already knows (MediaPipe reads a 50 degree turn as 35-45).
GENERATED_VERTICES, GENERATED_CAMERA = "mesh_vertices", "mesh_camera"


class Image2Video(Component):
    stage = "image2video"

    @abstractmethod
    def generate(self, portrait: Portrait, motion: Motion) -> FrameSet:
        """Animate ``portrait`` by ``motion``; returns ``len(motion)`` frames at ``motion.fps``, square, at the
        profile's resolution unless the component's options say otherwise, with ``motion.driving_arrays()`` (and
        anything else that explains a frame) in ``FrameSet.driving``; a generator that moves a tracked mesh also
        puts that mesh there (:data:`GENERATED_VERTICES`, :data:`GENERATED_CAMERA`)."""
