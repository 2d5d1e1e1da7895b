"""ophav plugin: blind face restorers (GFPGAN, CodeFormer, GPEN) for the iterative dataset update."""
from __future__ import annotations

from ophav_core import hookimpl
from ophav_core.registry import ComponentSpec


@hookimpl
def register_restorer(register) -> None:
    register(ComponentSpec(
        stage="restorer", name="gfpgan", factory="ophav_facerestore.gfpgan:GFPGANRestorer",
        options="ophav_facerestore.options:GFPGANOptions",
        summary="GFPGAN v1.3/v1.4 (clean architecture, the paper's restorer) on faces aligned from known landmarks",
        requires=("torch", "cv2", "gfpgan", "basicsr"), weights=("gfpgan-v1.4", "gfpgan-v1.3"), extra="facerestore"))
    register(ComponentSpec(
        stage="restorer", name="codeformer", factory="ophav_facerestore.codeformer:CodeFormerRestorer",
        options="ophav_facerestore.options:CodeFormerOptions",
        summary="CodeFormer with fidelity weight w, on faces aligned from known landmarks (weights: non-commercial)",
        requires=("torch", "cv2", "codeformer"), weights=("codeformer",), extra="facerestore"))
    register(ComponentSpec(
        stage="restorer", name="gpen", factory="ophav_facerestore.gpen:GPENRestorer",
        options="ophav_facerestore.options:GPENOptions",
        summary="GPEN-BFR-512 in pure PyTorch, on faces aligned from known landmarks (weights: non-commercial)",
        requires=("torch", "cv2"), weights=("gpen-bfr-512",), extra="facerestore"))


@hookimpl
def register_weights(register) -> None:
    from ophav_facerestore.weightfiles import ALL

    for weight in ALL:
        register(weight)
