"""Restorer ``gpen``: GPEN-BFR-512 with the pure-PyTorch network of :mod:`ophav_facerestore.gpen_arch`."""
from __future__ import annotations

import numpy as np

from ophav_core.weights import WeightFile
from ophav_facerestore import networks
from ophav_facerestore.align import gpen_template
from ophav_facerestore.base import FACE_SIZE, FaceRestorer
from ophav_facerestore.options import GPENOptions
from ophav_facerestore.weightfiles import GPEN_BFR_512


class GPENRestorer(FaceRestorer):
    """GPEN FullGenerator(512, 512, 8, channel_multiplier=2) on crops aligned to GPEN's own template;
    ``GPEN-BFR-512.pth`` (raw state dict)."""

    Options = GPENOptions
    name = "gpen"
    checkpoint_format = networks.GPEN_FORMAT
    border_rgb = (0, 0, 0)  # GPEN's warp_and_crop_face leaves the outside black

    def weight(self) -> WeightFile:
        return GPEN_BFR_512

    def template(self) -> np.ndarray:
        return gpen_template(FACE_SIZE)

    def forward(self, net, x):
        return networks.run_gpen(net, x)
