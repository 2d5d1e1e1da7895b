"""ophav plugin: talking-head image2video networks (face-vid2vid, FOMM) that load the public checkpoints."""
from __future__ import annotations

from ophav_core import hookimpl
from ophav_core.registry import ComponentSpec
from ophav_talkinghead.weights import FACEVID2VID_VOX, FOMM_VOX


@hookimpl
def register_image2video(register) -> None:
    register(ComponentSpec(
        stage="image2video", name="facevid2vid", factory="ophav_talkinghead.facevid2vid:FaceVid2Vid",
        options="ophav_talkinghead.options:FaceVid2VidOptions",
        summary="face-vid2vid (public reimplementation, 256x256): scripted yaw/pitch/roll and approximate "
                "named expressions from one portrait",
        requires=("torch",), weights=(FACEVID2VID_VOX.name,), extra="talkinghead"))
    register(ComponentSpec(
        stage="image2video", name="fomm", factory="ophav_talkinghead.fomm:FOMM",
        options="ophav_talkinghead.options:FOMMOptions",
        summary="First Order Motion Model (vox-256): relative motion transfer from a driving video (--driver)",
        requires=("torch",), weights=(FOMM_VOX.name,), extra="talkinghead"))


@hookimpl
def register_weights(register) -> None:
    register(FOMM_VOX)
    register(FACEVID2VID_VOX)
