"""The three networks: how each is built, how its public checkpoint is wrapped, how it is called.

Every network takes and returns RGB tensors (N, 3, 512, 512) in [-1, 1], as their reference inference code
does (GFPGANer, CodeFormer's inference_codeformer.py, GPEN's FaceGAN).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ophav_core.weights import WeightFile
from ophav_facerestore import weightfiles
from ophav_facerestore.checkpoint import load_network, verify_structure

FACE_SIZE = 512


@dataclass(frozen=True)
class CheckpointFormat:
    """build: makes the network; wrapper: the key holding the state dict (None = raw state dict);
    fallbacks: other keys the reference loader also accepts."""

    build: Callable[[], Any]
    wrapper: str | None
    fallbacks: tuple[str, ...] = ()


def build_gfpgan():
    """GFPGANv1Clean as GFPGANer builds it for v1.3 and v1.4 (``arch='clean'``, ``channel_multiplier=2``)."""
    from ophav_facerestore.compat import gfpgan_clean_arch

    return gfpgan_clean_arch().GFPGANv1Clean(
        out_size=FACE_SIZE, num_style_feat=512, channel_multiplier=2, decoder_load_path=None, fix_decoder=False,
        num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True)


def build_codeformer():
    """CodeFormer as its inference script builds it."""
    from ophav_facerestore.compat import codeformer_arch

    return codeformer_arch().CodeFormer(dim_embd=512, codebook_size=1024, n_head=8, n_layers=9,
                                        connect_list=["32", "64", "128", "256"])


def build_gpen():
    """GPEN-BFR-512: FullGenerator(512, 512, 8, channel_multiplier=2)."""
    from ophav_facerestore.gpen_arch import FullGenerator

    return FullGenerator(FACE_SIZE, 512, 8, channel_multiplier=2)


# GFPGANer and CodeFormer read 'params_ema' (GFPGANer falls back to 'params'); GPEN's file is a raw state dict.
GFPGAN_FORMAT = CheckpointFormat(build_gfpgan, "params_ema", ("params",))
CODEFORMER_FORMAT = CheckpointFormat(build_codeformer, "params_ema")
GPEN_FORMAT = CheckpointFormat(build_gpen, None)


def load(fmt: CheckpointFormat, path: Path, weight: WeightFile):
    """The network with the file's weights, strictly loaded, in eval mode on the CPU."""
    return load_network(fmt.build, Path(path), weight, fmt.wrapper, fmt.fallbacks)


def _verify(fmt: CheckpointFormat, path: Path, weight: WeightFile) -> None:
    verify_structure(fmt.build, Path(path), weight, fmt.wrapper, fmt.fallbacks)


# ---------------------------------------------------------------------------------------------- verify hooks
# WeightFile.verify entries: raise on a file that is not the expected checkpoint (strict structural load).


def verify_gfpgan_v13(path: Path) -> None:
    _verify(GFPGAN_FORMAT, path, weightfiles.GFPGAN_V13)


def verify_gfpgan_v14(path: Path) -> None:
    _verify(GFPGAN_FORMAT, path, weightfiles.GFPGAN_V14)


def verify_codeformer(path: Path) -> None:
    _verify(CODEFORMER_FORMAT, path, weightfiles.CODEFORMER)


def verify_gpen(path: Path) -> None:
    _verify(GPEN_FORMAT, path, weightfiles.GPEN_BFR_512)


# ---------------------------------------------------------------------------------------------- forward


def run_gfpgan(net, x):
    # return_rgb=False: skip the intermediate RGB outputs. Noise is drawn fresh as in GFPGANer; the caller
    # seeds it for repeatable results.
    return net(x, return_rgb=False)[0]


def run_codeformer(net, x, w: float):
    # adain=True as in CodeFormer's inference script: re-colours the code features to the input's statistics.
    return net(x, w=w, adain=True)[0]


def run_gpen(net, x):
    return net(x)
