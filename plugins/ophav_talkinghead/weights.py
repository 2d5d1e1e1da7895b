"""The public checkpoints this plugin uses, for the weight store (no torch import at module level). Each is verified
by its component's own strict loader, named here as ``module:function`` so this module imports neither."""
from __future__ import annotations

from ophav_core.weights import WeightFile

FOMM_VOX = WeightFile(
    name="fomm-vox-256",
    filename="vox-cpk.pth.tar",
    url="https://drive.google.com/open?id=1PyQJmkdCsAkOYwUyaj_l-l0as-iLDgeH",
    license="CC BY-NC 4.0",
    restricted=True,
    needed_by="image2video fomm",
    description="First Order Motion Model, VoxCeleb 256x256 (config vox-256.yaml: 10 keypoints with Jacobians); "
                "from the README of AliaksandrSiarohin/first-order-model (a folder link; also on Yandex Disk: "
                "https://yadi.sk/d/lEw8uRm140L_eQ). Released with the repository under CC BY-NC 4.0 "
                "(non-commercial); trained on VoxCeleb.",
    verify="ophav_talkinghead.fomm:verify_fomm",
)

FACEVID2VID_VOX = WeightFile(
    name="facevid2vid-vox-256",
    filename="00000189-checkpoint.pth.tar",
    url="https://www.mediafire.com/folder/fcvtkn21j57bb/TalkingHead_Update",
    license="unspecified (research use only)",
    restricted=True,
    needed_by="image2video facevid2vid",
    description="face-vid2vid reimplementation 'Vox-256-New' (vox-256-spade.yaml: 15 3D keypoints, 66-bin head "
                "pose, SPADE decoder), from the README of zhanglonghao1992/"
                "One-Shot_Free-View_Neural_Talking_Head_Synthesis (a MediaFire folder link). The repository "
                "states no licence and the model is trained on VoxCeleb: treat it as research use only.",
    verify="ophav_talkinghead.facevid2vid:verify_facevid2vid",
)
