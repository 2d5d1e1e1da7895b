"""face-vid2vid driven by a scripted motion: head pose (yaw/pitch/roll) and named expressions.

The portrait is cut square (a face box, the centre, or the whole image padded) and resized to 256x256. From it
the networks estimate the canonical keypoints, the head pose (yaw/pitch/roll), translation and expression of the
source. Frame i uses the source's angles plus the motion's (relative) angles, the source's translation and
expression, and the named expressions as keypoint offsets (see :mod:`ophav_talkinghead.expressions`; approximate,
because the public model's keypoints are unsupervised). Dense expression offsets from a tracked driver
(``motion.offsets``) are not used by this component.

Angles: the head-pose estimator was trained on Hopenet labels (yaw > 0 turns the face to image left, pitch > 0
looks up, roll > 0 is clockwise); ``pose_signs`` maps ophav's convention onto them (yaw flipped). The
reimplementation recommends staying within about +-45 (yaw), +-20 (pitch) and +-20 (roll) degrees of frontal.
``FrameSet.driving`` gets the motion's arrays plus ``model_yaw/pitch/roll`` (the absolute angles used, degrees)
and ``keypoints`` (N, K, 3).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ophav_core.errors import UsageError
# stages before motion: importing ophav_core.stages.motion first hits a circular import in core.
from ophav_core.stages import FrameSet, Image2Video, Portrait  # isort: skip
from ophav_core.stages.motion import Motion  # isort: skip
from ophav_core.weights import require
from ophav_talkinghead.checkpoints import load_strict, read_checkpoint
from ophav_talkinghead.expressions import EXPRESSION_NAMES, expression_offsets
from ophav_talkinghead.fv2v_net import (FaceVid2VidNetworks, bins_to_degrees, build_facevid2vid, detect_decoder,
                                        posed_keypoints, rotation_matrix)
from ophav_talkinghead.imageops import NETWORK_SIZE, batches, cut_square, square_region, to_network, to_uint8
from ophav_talkinghead.options import FaceVid2VidOptions
from ophav_talkinghead.weights import FACEVID2VID_VOX

CHECKPOINT_KEYS = ("generator", "kp_detector", "he_estimator")


@dataclass
class SourceState:
    """Everything about the portrait that every frame reuses."""

    canonical: torch.Tensor  # (1, K, 3)
    angles: torch.Tensor  # (3,) yaw, pitch, roll in the model's (Hopenet) convention, degrees
    translation: torch.Tensor  # (1, 3)
    expression: torch.Tensor  # (1, K, 3)
    keypoints: torch.Tensor  # (1, K, 3) posed source keypoints
    volume: torch.Tensor  # (1, C, D, H, W) appearance features


def load_facevid2vid(path, decoder: str = "auto", model_params: dict | None = None) -> FaceVid2VidNetworks:
    """The networks of a face-vid2vid checkpoint in the public format, loaded strictly (on the CPU, eval mode)."""
    states = read_checkpoint(path, CHECKPOINT_KEYS, FACEVID2VID_VOX.filename)
    chosen = detect_decoder(states["generator"]) if decoder == "auto" else decoder
    try:
        networks = build_facevid2vid(model_params, decoder=chosen)
    except (TypeError, ValueError, KeyError) as exc:
        raise UsageError(f"model_params do not describe a valid network: {exc}") from exc
    load_strict(networks.modules(), states, path, f"face-vid2vid ({chosen} decoder)")
    return networks


def verify_facevid2vid(path) -> None:
    """Raise unless ``path`` loads strictly into the vox-256 face-vid2vid networks (either decoder)."""
    load_facevid2vid(path)


class FaceVid2Vid(Image2Video):
    Options = FaceVid2VidOptions

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self._networks: FaceVid2VidNetworks | None = None

    @property
    def device(self) -> torch.device:
        return torch.device(self.context.device)

    def networks(self) -> FaceVid2VidNetworks:
        if self._networks is None:
            path = require(FACEVID2VID_VOX, self.options.checkpoint)
            networks = load_facevid2vid(path, self.options.decoder, self.options.model_params)
            for module in networks.modules().values():
                module.to(self.device)
            self._networks = networks
        return self._networks

    def source_image(self, portrait: Portrait) -> torch.Tensor:
        o = self.options
        h, w = portrait.image.shape[:2]
        square = cut_square(portrait.image, square_region(h, w, o.crop, o.face_box, o.face_margin))
        return to_network(square[None], self.device, NETWORK_SIZE)

    def source_state(self, networks: FaceVid2VidNetworks, source: torch.Tensor) -> SourceState:
        canonical = networks.kp_detector(source)
        head = networks.he_estimator(source)
        angles = torch.stack([bins_to_degrees(head[k])[0] for k in ("yaw", "pitch", "roll")])
        rotation = rotation_matrix(angles[0:1], angles[1:2], angles[2:3])
        keypoints = posed_keypoints(canonical, rotation, head["t"], head["exp"])
        return SourceState(canonical, angles, head["t"], head["exp"], keypoints, networks.generator.encode(source))

    def frame_angles(self, source: SourceState, motion: Motion, frames: slice) -> torch.Tensor:
        """(B, 3) model angles of ``frames``: the source's pose plus the motion's relative pose."""
        relative = np.stack([motion.yaw[frames], motion.pitch[frames], motion.roll[frames]], axis=1)
        relative = relative * np.asarray(self.options.pose_signs, np.float32)
        return source.angles[None, :] + torch.from_numpy(relative).to(source.angles)

    def driving_keypoints(self, source: SourceState, motion: Motion,
                          frames: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, 3) driving keypoints of ``frames`` and their (B, 3) model angles."""
        angles = self.frame_angles(source, motion, frames)
        b = angles.shape[0]
        levels = {name: torch.from_numpy(motion.expressions[name][frames]) for name in EXPRESSION_NAMES
                  if name in motion.expressions}
        offsets = (expression_offsets(source.canonical, levels, self.options.expression_scale)
                   if levels else torch.zeros_like(source.canonical))
        canonical = source.canonical.expand(b, -1, -1) + offsets.expand(b, -1, -1)
        rotation = rotation_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
        keypoints = posed_keypoints(canonical, rotation, source.translation.expand(b, -1),
                                    source.expression.expand(b, -1, -1))
        return keypoints, angles

    def generate(self, portrait: Portrait, motion: Motion) -> FrameSet:
        networks = self.networks()
        size = self.options.size or self.context.profile.resolution
        frames, keypoints, angles = [], [], []
        with torch.inference_mode():
            source = self.source_state(networks, self.source_image(portrait))
            with self.context.progress(len(motion), "face-vid2vid") as bar:
                for part in batches(len(motion), self.options.batch_size):
                    kp_driving, part_angles = self.driving_keypoints(source, motion, part)
                    b = kp_driving.shape[0]
                    images = networks.generator.decode(source.volume, kp_driving, source.keypoints.expand(b, -1, -1))
                    frames.append(to_uint8(images, size))
                    keypoints.append(kp_driving.float().cpu().numpy())
                    angles.append(part_angles.float().cpu().numpy())
                    bar.advance(b)
        angles_np = np.concatenate(angles)
        driving = dict(motion.driving_arrays())
        driving.update({"model_yaw": angles_np[:, 0], "model_pitch": angles_np[:, 1], "model_roll": angles_np[:, 2],
                        "keypoints": np.concatenate(keypoints)})
        return FrameSet(np.concatenate(frames), motion.fps, driving)
