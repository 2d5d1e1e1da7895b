"""ophav plugin: MediaPipe tracker and segmenter (models inside the mediapipe==0.10.21 wheel, no downloads)."""
from ophav_core import hookimpl
from ophav_core.registry import ComponentSpec


@hookimpl
def register_tracker(register):
    register(ComponentSpec(
        stage="tracker", name="mediapipe", factory="ophav_mediapipe.tracker:MediapipeTracker",
        options="ophav_mediapipe.options:MediapipeTrackerOptions",
        summary="MediaPipe face mesh (468 vertices): PnP head pose, expression basis with named expressions, "
                "pinhole camera with a stated focal assumption; embedded model, no weights to download",
        requires=("mediapipe", "cv2", "scipy"), extra="mediapipe"))


@hookimpl
def register_segmenter(register):
    register(ComponentSpec(
        stage="segmenter", name="mediapipe", factory="ophav_mediapipe.segmenter:MediapipeSegmenter",
        options="ophav_mediapipe.options:MediapipeSegmenterOptions",
        summary="MediaPipe selfie segmentation cut to the head with the tracked face geometry (below the jaw, "
                "soft neck margin); embedded model, no weights to download",
        requires=("mediapipe", "cv2"), extra="mediapipe"))
