"""Restorer ``gfpgan``: GFPGAN v1.3 / v1.4 (clean architecture from the ``gfpgan`` package), the paper's choice."""
from __future__ import annotations

from ophav_core.weights import WeightFile
from ophav_facerestore import networks
from ophav_facerestore.base import FaceRestorer
from ophav_facerestore.options import GFPGANOptions
from ophav_facerestore.weightfiles import GFPGAN_BY_MODEL


class GFPGANRestorer(FaceRestorer):
    """GFPGANv1Clean on FFHQ-aligned 512 crops; ``GFPGANv1.3.pth`` / ``GFPGANv1.4.pth`` (``params_ema``)."""

    Options = GFPGANOptions
    name = "gfpgan"
    checkpoint_format = networks.GFPGAN_FORMAT

    def weight(self) -> WeightFile:
        return GFPGAN_BY_MODEL[self.options.model]

    def forward(self, net, x):
        return networks.run_gfpgan(net, x)
