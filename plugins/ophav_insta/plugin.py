"""Registers the INSTA avatar field; imports nothing heavy."""
from ophav_core import hookimpl
from ophav_core.registry import ComponentSpec


@hookimpl
def register_avatar_field(register):
    register(ComponentSpec(
        stage="field", name="insta", factory="ophav_insta.field:InstaField", options="ophav_insta.options:InstaOptions",
        summary="INSTA-style deformable hash-grid NeRF (nearest-triangle deformation, occupancy skipping; "
                "Triton/tiny-cuda-nn/PyTorch hash encoding)",
        requires=("torch",), extra="insta"))
