"""ophav plugin: meshwarp, the embedded image2video (no downloaded weights)."""
from ophav_core import hookimpl
from ophav_core.registry import ComponentSpec


@hookimpl
def register_image2video(register):
    register(ComponentSpec(
        stage="image2video", name="meshwarp", factory="ophav_meshwarp.generator:MeshWarp",
        options="ophav_meshwarp.options:MeshwarpOptions",
        summary="re-poses the portrait's tracked face mesh (the run's tracker and segmenter) and warps the image "
                "with it (no weights)",
        requires=("cv2",), extra="meshwarp"))
