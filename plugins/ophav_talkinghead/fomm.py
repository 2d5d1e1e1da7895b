"""First Order Motion Model driven by a driving video (``motion.video``).

Relative motion transfer as in FOMM's demo (``--relative``): each frame moves the portrait's keypoints (and
Jacobians) by how the driver's keypoints moved since the driver's first frame; with ``adapt_movement_scale`` the
movement is scaled by the square root of the ratio of the keypoint convex-hull areas (``--adapt_scale``, off by
default). The driver should start in about the portrait's pose and expression, as FOMM's relative mode assumes.
"""
from __future__ import annotations

import numpy as np
import torch

from ophav_core.errors import UsageError
# stages before motion: importing ophav_core.stages.motion first hits a circular import in core.
from ophav_core.stages import FrameSet, Image2Video, Portrait  # isort: skip
from ophav_core.stages.motion import Motion  # isort: skip
from ophav_core.weights import require
from ophav_talkinghead.checkpoints import load_strict, read_checkpoint
from ophav_talkinghead.fomm_net import FOMMNetworks, Keypoints, build_fomm, relative_keypoints
from ophav_talkinghead.imageops import (NETWORK_SIZE, batches, cut_square, frame_indices, square_region, to_network,
                                        to_uint8)
from ophav_talkinghead.options import FOMMOptions
from ophav_talkinghead.weights import FOMM_VOX

CHECKPOINT_KEYS = ("generator", "kp_detector")


def load_fomm(path, model_params: dict | None = None) -> FOMMNetworks:
    """The networks of a FOMM checkpoint in the public format, loaded strictly (on the CPU, eval mode)."""
    states = read_checkpoint(path, CHECKPOINT_KEYS, FOMM_VOX.filename)
    try:
        networks = build_fomm(model_params)
    except (TypeError, ValueError, KeyError) as exc:
        raise UsageError(f"model_params do not describe a valid network: {exc}") from exc
    load_strict(networks.modules(), states, path, "FOMM")
    return networks


def verify_fomm(path) -> None:
    """Raise unless ``path`` loads strictly into the vox-256 FOMM networks (the component's own loader)."""
    load_fomm(path)


def hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2D points (0 for degenerate sets)."""
    try:
        from scipy.spatial import ConvexHull, QhullError
    except ImportError as exc:
        raise UsageError("fomm: adapt_movement_scale needs scipy (pip install 'ophav[talkinghead]')") from exc

    try:
        return float(ConvexHull(points).volume)  # in 2D, "volume" is the area
    except (QhullError, ValueError):
        return 0.0


def movement_scale(kp_source: Keypoints, kp_driving_initial: Keypoints) -> float:
    source = hull_area(kp_source["value"][0].float().cpu().numpy())
    driving = hull_area(kp_driving_initial["value"][0].float().cpu().numpy())
    return float(np.sqrt(source) / np.sqrt(driving)) if source > 0 and driving > 0 else 1.0


def _slice_keypoints(kp: Keypoints, batch: int) -> Keypoints:
    return {k: v.expand(batch, *v.shape[1:]) for k, v in kp.items()}


class FOMM(Image2Video):
    Options = FOMMOptions

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self._networks: FOMMNetworks | None = None

    @property
    def device(self) -> torch.device:
        return torch.device(self.context.device)

    def networks(self) -> FOMMNetworks:
        if self._networks is None:
            networks = load_fomm(require(FOMM_VOX, self.options.checkpoint), self.options.model_params)
            for module in networks.modules().values():
                module.to(self.device)
            self._networks = networks
        return self._networks

    def _square(self, images: np.ndarray, crop: str, face_box=None) -> torch.Tensor:
        h, w = images.shape[1:3]
        region = square_region(h, w, crop, face_box, self.options.face_margin)
        return to_network(np.stack([cut_square(image, region) for image in images]), self.device, NETWORK_SIZE)

    def generate(self, portrait: Portrait, motion: Motion) -> FrameSet:
        if motion.video is None:
            raise UsageError("FOMM needs a driving video: pass one with --driver (a scripted motion has no video; "
                             "use the facevid2vid image2video for scripted yaw/pitch/roll and expressions)")
        networks = self.networks()
        o = self.options
        size = o.size or self.context.profile.resolution
        video = motion.video.frames
        indices = frame_indices(len(video), len(motion))
        frames, keypoints = [], []
        with torch.inference_mode():
            source = self._square(portrait.image[None], o.crop, o.face_box)
            kp_source = networks.kp_detector(source)
            encoded = networks.generator.encode(source)
            kp_initial = networks.kp_detector(self._square(video[indices[:1]], o.driver_crop))
            scale = movement_scale(kp_source, kp_initial) if o.adapt_movement_scale else 1.0
            with self.context.progress(len(motion), "fomm") as bar:
                for part in batches(len(motion), o.batch_size):
                    driving = networks.kp_detector(self._square(video[indices[part]], o.driver_crop))
                    b = driving["value"].shape[0]
                    if o.relative:
                        driving = relative_keypoints(_slice_keypoints(kp_source, b), driving,
                                                     _slice_keypoints(kp_initial, b), scale)
                    images = networks.generator.decode(encoded, driving, _slice_keypoints(kp_source, b))
                    frames.append(to_uint8(images, size))
                    keypoints.append(driving["value"].float().cpu().numpy())
                    bar.advance(b)
        driving_arrays = dict(motion.driving_arrays())
        driving_arrays.update({"driver_frame": indices, "keypoints": np.concatenate(keypoints)})
        return FrameSet(np.concatenate(frames), motion.fps, driving_arrays)
