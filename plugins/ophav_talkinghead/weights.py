"""The public checkpoints this plugin uses, for the weight store (no torch import at module level)."""
from __future__ import annotations

from pathlib import Path

from ophav_core.weights import WeightFile

FOMM_VOX = WeightFile(
    name="fomm-vox-256",
    filename="vox-cpk.pth.tar",
    url="https://drive.google.com/open?id=1PyQJmkdCsAkOYwUyaj_l-l0as-iLDgeH (or https://yadi.sk/d/lEw8uRm140L_eQ)",
    license="CC BY-NC 4.0",
    restricted=True,
    needed_by="image2video fomm",
    description="First Order Motion Model, VoxCeleb 256x256 (config vox-256.yaml: 10 keypoints with Jacobians); "
                "from the README of AliaksandrSiarohin/first-order-model. Released with the repository under "
                "CC BY-NC 4.0 (non-commercial); trained on VoxCeleb.",
    verify="ophav_talkinghead.weights:verify_fomm",
)

FACEVID2VID_VOX = WeightFile(
    name="facevid2vid-vox-256",
    filename="00000189-checkpoint.pth.tar",
    url="https://www.mediafire.com/folder/fcvtkn21j57bb/TalkingHead_Update",
    license="unspecified (no licence in zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis; "
            "trained on VoxCeleb: research use only)",
    restricted=True,
    needed_by="image2video facevid2vid",
    description="face-vid2vid reimplementation 'Vox-256-New' (vox-256-spade.yaml: 15 3D keypoints, 66-bin head "
                "pose, SPADE decoder), from the README of zhanglonghao1992/"
                "One-Shot_Free-View_Neural_Talking_Head_Synthesis.",
    verify="ophav_talkinghead.weights:verify_facevid2vid",
)


def verify_fomm(path: Path) -> None:
    """Raise unless ``path`` loads strictly into the vox-256 FOMM networks."""
    from ophav_talkinghead.checkpoints import load_strict, read_checkpoint
    from ophav_talkinghead.fomm_net import build_fomm

    networks = build_fomm()
    states = read_checkpoint(path, tuple(networks.modules()), FOMM_VOX.filename)
    load_strict(networks.modules(), states, path, "FOMM vox-256")


def verify_facevid2vid(path: Path) -> None:
    """Raise unless ``path`` loads strictly into the vox-256 face-vid2vid networks (either decoder)."""
    from ophav_talkinghead.checkpoints import load_strict, read_checkpoint
    from ophav_talkinghead.fv2v_net import build_facevid2vid, detect_decoder

    states = read_checkpoint(path, ("generator", "kp_detector", "he_estimator"), FACEVID2VID_VOX.filename)
    networks = build_facevid2vid(decoder=detect_decoder(states["generator"]))
    load_strict(networks.modules(), states, path, "face-vid2vid vox-256")
