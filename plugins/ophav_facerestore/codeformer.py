"""Restorer ``codeformer``: CodeFormer (network definition from ``codeformer-pip``) with fidelity weight ``w``."""
from __future__ import annotations

from ophav_core.weights import WeightFile
from ophav_facerestore import networks
from ophav_facerestore.base import FaceRestorer
from ophav_facerestore.options import CodeFormerOptions
from ophav_facerestore.weightfiles import CODEFORMER


class CodeFormerRestorer(FaceRestorer):
    """CodeFormer on FFHQ-aligned 512 crops; ``codeformer.pth`` (``params_ema``, S-Lab License 1.0)."""

    Options = CodeFormerOptions
    name = "codeformer"
    checkpoint_format = networks.CODEFORMER_FORMAT

    def weight(self) -> WeightFile:
        return CODEFORMER

    def forward(self, net, x):
        return networks.run_codeformer(net, x, self.options.w)
