"""The public weights files of the three restorers. Light module (no torch): the plugin registers these and the
components ask the weight store for them. Each ``verify`` is a strict structural load (``weights_only=True``)."""
from __future__ import annotations

from ophav_core.weights import WeightFile

_GFPGAN_TERMS = "Apache-2.0 (GFPGAN's licence; the release states no separate terms for the weights)"

GFPGAN_V13 = WeightFile(
    name="gfpgan-v1.3", filename="GFPGANv1.3.pth",
    url="https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.3.pth",
    license=_GFPGAN_TERMS, needed_by="restorer gfpgan (model=1.3)", restricted=False,
    description="GFPGAN v1.3 clean architecture, {'params_ema': state_dict}",
    verify="ophav_facerestore.networks:verify_gfpgan_v13")

GFPGAN_V14 = WeightFile(
    name="gfpgan-v1.4", filename="GFPGANv1.4.pth",
    url="https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.4.pth",
    license=_GFPGAN_TERMS, needed_by="restorer gfpgan (model=1.4)", restricted=False,
    description="GFPGAN v1.4 clean architecture, {'params_ema': state_dict}",
    verify="ophav_facerestore.networks:verify_gfpgan_v14")

CODEFORMER = WeightFile(
    name="codeformer", filename="codeformer.pth",
    url="https://github.com/sczhou/CodeFormer/releases/download/v0.1.0/codeformer.pth",
    license="S-Lab License 1.0 (non-commercial use only)", needed_by="restorer codeformer", restricted=True,
    description="CodeFormer (dim_embd=512, codebook 1024, 9 layers), {'params_ema': state_dict}",
    verify="ophav_facerestore.networks:verify_codeformer")

GPEN_BFR_512 = WeightFile(
    name="gpen-bfr-512", filename="GPEN-BFR-512.pth",
    url="https://public-vigen-video.oss-cn-shanghai.aliyuncs.com/robin/models/GPEN-BFR-512.pth",
    license="(c) Alibaba 2021, for academic and non-commercial use only (GPEN README)", needed_by="restorer gpen",
    restricted=True, description="GPEN FullGenerator(512, 512, 8, channel_multiplier=2), raw state_dict",
    verify="ophav_facerestore.networks:verify_gpen")

GFPGAN_BY_MODEL = {"1.3": GFPGAN_V13, "1.4": GFPGAN_V14}
ALL = (GFPGAN_V13, GFPGAN_V14, CODEFORMER, GPEN_BFR_512)
