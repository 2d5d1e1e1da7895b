"""The five stages of the method, their typed data, and the component base class."""
from ophav_core.stages.avatar_field import AvatarCheckpoint, AvatarField
from ophav_core.stages.base import Component, NoOptions, RunContext
from ophav_core.stages.data import (FrameSet, MaskSet, MeshTopology, Portrait, RenderRequest, RenderResult,
                                    RestoreInput, Tracking, scale_intrinsics)
from ophav_core.stages.image2video import Image2Video
from ophav_core.stages.restorer import Restorer
from ophav_core.stages.segmenter import Segmenter
from ophav_core.stages.tracker import Tracker

STAGES: dict[str, type[Component]] = {
    "image2video": Image2Video,
    "segmenter": Segmenter,
    "tracker": Tracker,
    "field": AvatarField,
    "restorer": Restorer,
}

__all__ = [
    "STAGES", "AvatarCheckpoint", "AvatarField", "Component", "FrameSet", "Image2Video", "MaskSet", "MeshTopology",
    "NoOptions",
    "Portrait", "RenderRequest", "RenderResult", "RestoreInput", "Restorer", "RunContext", "Segmenter", "Tracker",
    "Tracking", "scale_intrinsics",
]
