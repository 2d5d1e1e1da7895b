"""What the three restorers share: align with the known landmarks, restore 512x512 crops in batches, paste back."""
from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import numpy as np

from ophav_core.stages import Restorer
from ophav_core.stages.data import RestoreInput
from ophav_core.weights import WeightFile, require
from ophav_facerestore import networks
from ophav_facerestore.align import FFHQ_BORDER_RGB, align, ffhq_template, paste_faces, warp_faces
from ophav_facerestore.options import FaceRestoreOptions

FACE_SIZE = networks.FACE_SIZE


class FaceRestorer(Restorer):
    """A blind face restorer on 512x512 template-aligned crops. Subclasses name their weights file, checkpoint
    format and forward call; alignment, batching, precision and pasting live here."""

    Options: ClassVar[type[FaceRestoreOptions]] = FaceRestoreOptions
    name: ClassVar[str] = "face"
    checkpoint_format: ClassVar[networks.CheckpointFormat]
    #: value of the crop outside the image (the reference helpers' border colour)
    border_rgb: ClassVar[tuple[int, int, int]] = FFHQ_BORDER_RGB

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self._net: Any = None

    # --------------------------------------------------------------------------------- what subclasses set

    def weight(self) -> WeightFile:
        raise NotImplementedError

    def template(self) -> np.ndarray:
        """Landmark positions (image order) in the 512 crop the network was trained on."""
        return ffhq_template(FACE_SIZE)

    def forward(self, net, x):
        """RGB (N, 3, 512, 512) in [-1, 1] -> the same."""
        raise NotImplementedError

    # --------------------------------------------------------------------------------- the pipeline

    def restore(self, batch: RestoreInput) -> np.ndarray:
        images = batch.images
        if len(batch) == 0:
            return images.copy()
        alignment = align(batch.landmarks5, self.template(), FACE_SIZE)
        crops = warp_faces(images, alignment, self.border_rgb)
        restored = crops.copy()
        usable = np.flatnonzero(alignment.usable)
        restored[usable] = self.restore_aligned(crops[usable])
        alpha = batch.alpha if self.options.use_alpha else None
        return paste_faces(images, restored, alignment, alpha, soft=self.options.paste_back)

    def restore_aligned(self, faces: np.ndarray) -> np.ndarray:
        """uint8 RGB crops (N, 512, 512, 3) aligned to :meth:`template` -> restored crops, same shape."""
        import torch

        net = self.network()
        out = np.empty_like(faces)
        step = self.batch_size()
        with self.context.progress(len(faces), f"restore faces ({self.name})") as bar:
            for start in range(0, len(faces), step):
                chunk = np.ascontiguousarray(faces[start:start + step])
                x = torch.from_numpy(chunk).to(self.device).permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1.0
                with torch.inference_mode(), self._autocast(), self._seeded_noise():
                    y = self.forward(net, x)
                y = torch.nan_to_num(y.float(), nan=0.0).clamp(-1.0, 1.0)
                out[start:start + step] = ((y + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                bar.advance(len(chunk))
        return out

    # --------------------------------------------------------------------------------- helpers

    @property
    def device(self) -> str:
        return self.context.device

    def batch_size(self) -> int:
        if self.options.batch_size is not None:
            return self.options.batch_size
        return 8 if self.device.startswith("cuda") else 1

    def network(self):
        """The network with its weights, loaded once (strictly, without running code from the file)."""
        if self._net is None:
            weight = self.weight()
            path = require(weight, self.options.checkpoint)
            self._net = networks.load(self.checkpoint_format, path, weight).to(self.device)
        return self._net

    def _autocast(self):
        import torch

        if not self.device.startswith("cuda") or self.options.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.options.precision == "fp16" else torch.bfloat16
        return torch.autocast("cuda", dtype=dtype)

    @contextlib.contextmanager
    def _seeded_noise(self):
        """Seed the noise some networks draw (GFPGAN's StyleGAN noise) from the run's seed, without touching
        the caller's random state: the same renders restore to the same images."""
        import torch

        devices = [torch.device(self.device).index or 0] if self.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.context.seed)
            yield
