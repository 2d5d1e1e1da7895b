"""ophav plugin: the FLAME tracker (the user supplies the FLAME model)."""
from ophav_core import hookimpl
from ophav_core.registry import ComponentSpec

_SUMMARY = ("FLAME (5023-vertex full head) fitted to MediaPipe's landmarks: shared shape, per-frame expression, "
            "jaw, neck and head pose, batched Levenberg-Marquardt in PyTorch; landmark embedding derived from your "
            "model")


@hookimpl
def register_tracker(register):
    from ophav_flame.weights import REQUIREMENT, choose

    # The component needs one of the three FLAME files: it names the one it would use (the first present), so
    # `ophav plugins` reports it ready with any of them, and not ready (naming the file and its source) with none.
    register(ComponentSpec(
        stage="tracker", name="flame", factory="ophav_flame.tracker:FlameTracker",
        options="ophav_flame.options:FlameTrackerOptions", summary=f"{_SUMMARY}. {REQUIREMENT}",
        requires=("torch", "mediapipe", "cv2", "scipy"), weights=(choose("auto").name,), extra="mediapipe,torch"))


@hookimpl
def register_weights(register):
    from ophav_flame.weights import ALL_WEIGHTS

    for weight in ALL_WEIGHTS:
        register(weight)
