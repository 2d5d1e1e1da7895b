"""Registers the mesh-anchored Gaussian avatar field; imports nothing heavy."""
from ophav_core import hookimpl
from ophav_core.registry import ComponentSpec


@hookimpl
def register_avatar_field(register):
    register(ComponentSpec(
        stage="field", name="gaussians", factory="ophav_gaussians.field:GaussianField",
        options="ophav_gaussians.options:GaussianOptions",
        summary="3D Gaussians bound to the tracked mesh's triangles (GaussianAvatars-style local frames) plus a "
                "head-rigid shell for hair, ears and neck; Triton tile rasteriser on CUDA, pair compositing on the CPU",
        requires=("torch",), extra="torch"))
